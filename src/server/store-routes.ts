/** Routes of the server itself and its store: info, health, metrics, images, snapshots. */

import { Image, type ImageConfig, Store, SupermachineError } from "../index.ts";
import type { WireImage, WireServerInfo } from "../wire/index.ts";
import { booleanField, countField, invalid, readJson, sendJson, stringField } from "./http.ts";
import type { RequestContext } from "./router.ts";

export async function getInfo(ctx: RequestContext): Promise<void> {
  const { core } = ctx;
  const info: WireServerInfo = {
    version: core.version,
    serverId: core.serverId,
    accelerator: core.accelerator(),
    limits: core.limits,
    draining: core.draining,
  };
  sendJson(ctx.res, 200, info);
}

/** Alive: the process answers (Kubernetes' liveness probe). */
export async function getHealthz(ctx: RequestContext): Promise<void> {
  sendJson(ctx.res, 200, { ok: true });
}

/**
 * Ready: the accelerator, QEMU and the guest assets check out, the declared pools are built, and
 * the server is not draining (Kubernetes' readiness probe). 503 otherwise, with the reasons.
 */
export async function getReadyz(ctx: RequestContext): Promise<void> {
  const readiness = await ctx.core.readiness();
  sendJson(ctx.res, readiness.ready ? 200 : 503, readiness);
}

export async function getMetrics(ctx: RequestContext): Promise<void> {
  const { contentType, body } = await ctx.core.metrics.text();
  ctx.res.writeHead(200, { "content-type": contentType, "content-length": Buffer.byteLength(body) });
  ctx.res.end(body);
}

function store(ctx: RequestContext): Store {
  const dataDir = ctx.core.holdings.options.dataDir;
  return new Store(dataDir === undefined ? {} : { dataDir });
}

export async function listImages(ctx: RequestContext): Promise<void> {
  sendJson(ctx.res, 200, { images: await store(ctx).images() });
}

function imageInfo(image: Image): WireImage {
  const manifest = image.snapshot?.manifest;
  return {
    reference: image.reference,
    digest: image.digest,
    platform: image.platform,
    config: image.config as ImageConfig,
    ...(manifest === undefined
      ? {}
      : { snapshot: manifest.name, memoryMiB: manifest.memoryMiB, vcpus: manifest.vcpus }),
  };
}

/** `POST /v1/images/pull`: pull and flatten an image into the server's store. */
export async function pullImage(ctx: RequestContext): Promise<void> {
  const body = await readJson(ctx.req, ctx.core.limits.maxBodyBytes);
  const reference = stringField(body, "reference", true);
  const platform = stringField(body, "platform");
  const dataDir = ctx.core.holdings.options.dataDir;
  const image = await Image.pull(reference, {
    signal: ctx.signal,
    insecureRegistries: ctx.core.insecureRegistries,
    ...(platform === undefined ? {} : { platform }),
    ...(dataDir === undefined ? {} : { dataDir }),
  });
  sendJson(ctx.res, 200, imageInfo(image));
}

export async function listSnapshots(ctx: RequestContext): Promise<void> {
  sendJson(ctx.res, 200, { snapshots: await store(ctx).snapshots() });
}

/** `GET /v1/snapshots/{name}`: the snapshot as an image, checked against this host. */
export async function getSnapshot(ctx: RequestContext): Promise<void> {
  const image = await ctx.core.holdings.image(ctx.params.name!);
  sendJson(ctx.res, 200, imageInfo(image));
}

export async function deleteSnapshot(ctx: RequestContext): Promise<void> {
  const name = ctx.params.name!;
  const force = ctx.url.searchParams.get("force") === "1" || ctx.url.searchParams.get("force") === "true";
  await store(ctx).removeSnapshot(name, { force });
  ctx.core.holdings.forgetImage(name);
  ctx.res.writeHead(204).end();
}

/** `POST /v1/snapshots`: bake — pull, boot, start the workload, run the warm-up commands, save. */
export async function bakeSnapshot(ctx: RequestContext): Promise<void> {
  const body = await readJson(ctx.req, ctx.core.limits.maxBodyBytes);
  const builder = Image.builder(stringField(body, "reference", true)).signal(ctx.signal);
  const name = stringField(body, "name");
  if (name !== undefined) builder.name(name);
  const memoryMiB = countField(body, "memoryMiB");
  if (memoryMiB !== undefined) builder.memoryMiB(memoryMiB);
  const vcpus = countField(body, "vcpus");
  if (vcpus !== undefined) builder.vcpus(vcpus);
  const platform = stringField(body, "platform");
  if (platform !== undefined) builder.platform(platform);
  const warmupTag = stringField(body, "warmupTag");
  if (warmupTag !== undefined) builder.warmupTag(warmupTag);
  const workload = booleanField(body, "workload");
  if (workload !== undefined) builder.workload(workload);
  if (booleanField(body, "force") === true) builder.force();
  if (body.env !== undefined) {
    if (typeof body.env !== "object" || body.env === null || Array.isArray(body.env)) {
      throw invalid("env must be a JSON object of strings");
    }
    builder.env(body.env as Record<string, string>);
  }
  if (body.warmup !== undefined) {
    const warmup = body.warmup;
    if (!Array.isArray(warmup) || !warmup.every((argv) => Array.isArray(argv))) {
      throw invalid("warmup must be an array of argv arrays");
    }
    builder.withWarmup(async (vm) => {
      for (const argv of warmup as string[][]) await vm.exec(argv, { signal: ctx.signal });
    });
  }
  const dataDir = ctx.core.holdings.options.dataDir;
  builder.pullOptions({
    insecureRegistries: ctx.core.insecureRegistries,
    ...(dataDir === undefined ? {} : { dataDir }),
  });
  const image = await builder.build();
  const snapshot = image.snapshot;
  if (snapshot === undefined) throw new SupermachineError("STORE_ERROR", "the bake made no snapshot");
  ctx.core.holdings.forgetImage(snapshot.manifest.name);
  ctx.note({ snapshot: snapshot.manifest.name });
  sendJson(ctx.res, 200, imageInfo(image));
}
