/** Routes of pools and VMs: create, list, get, acquire, release, stop. */

import { Image, type PoolOptions } from "../index.ts";
import type { WireAcquired, WireCreateVm, WireStartConfig } from "../wire/index.ts";
import { booleanField, countField, invalid, queryFlag, readJson, sendJson, stringField } from "./http.ts";
import type { RequestContext } from "./router.ts";

const POOL_OPTIONS = ["min", "max", "prestarted", "idleTimeoutMs", "acquireTimeoutMs"] as const;

/** `POST /v1/pools`: a pool of a snapshot's clones. */
export async function createPool(ctx: RequestContext): Promise<void> {
  const body = await readJson(ctx.req, ctx.core.limits.maxBodyBytes);
  const snapshot = stringField(body, "snapshot", true);
  const options: Partial<PoolOptions> = {};
  for (const name of POOL_OPTIONS) {
    const value = countField(body, name);
    if (value !== undefined) options[name] = value;
  }
  const restoreOnRelease = booleanField(body, "restoreOnRelease");
  if (restoreOnRelease !== undefined) options.restoreOnRelease = restoreOnRelease;
  const held = await ctx.core.holdings.createPool(
    snapshot,
    options,
    (body.config ?? {}) as WireStartConfig,
    "client",
    ctx.signal,
  );
  ctx.note({ pool: held.id });
  sendJson(ctx.res, 201, ctx.core.holdings.poolInfo(held));
}

export async function listPools(ctx: RequestContext): Promise<void> {
  const { holdings } = ctx.core;
  sendJson(ctx.res, 200, { pools: holdings.pools().map((held) => holdings.poolInfo(held)) });
}

export async function getPool(ctx: RequestContext): Promise<void> {
  const { holdings } = ctx.core;
  sendJson(ctx.res, 200, holdings.poolInfo(holdings.pool(ctx.params.id!)));
}

/** `DELETE /v1/pools/{id}`: close it; its VMs stop (`force=1`: at once, leases revoked). */
export async function deletePool(ctx: RequestContext): Promise<void> {
  const { holdings } = ctx.core;
  const held = holdings.pool(ctx.params.id!);
  if (held.owner === "server") {
    throw invalid(`pool ${held.id} was declared by the server (--pool) and lives as long as it`);
  }
  await holdings.closePool(held, { force: queryFlag(ctx.url, "force") });
  ctx.res.writeHead(204).end();
}

/** `POST /v1/pools/{id}/acquire`: a VM on loan, held until released. */
export async function acquire(ctx: RequestContext): Promise<void> {
  const { holdings, metrics } = ctx.core;
  const pool = holdings.pool(ctx.params.id!);
  const started = performance.now();
  const held = await holdings.acquire(pool, ctx.signal);
  const acquireMs = performance.now() - started;
  metrics.acquireSeconds.observe({ pool: pool.id }, acquireMs / 1000);
  ctx.note({ pool: pool.id, vm: held.id });
  const body: WireAcquired = { vm: holdings.vmInfo(held), acquireMs };
  sendJson(ctx.res, 200, body);
}

/** `POST /v1/vms`: a VM of a snapshot (restored) or of a pulled image (booted). */
export async function createVm(ctx: RequestContext): Promise<void> {
  const body = (await readJson(ctx.req, ctx.core.limits.maxBodyBytes)) as WireCreateVm &
    Record<string, unknown>;
  const { holdings } = ctx.core;
  const snapshot = stringField(body, "snapshot");
  const reference = stringField(body, "image");
  if ((snapshot === undefined) === (reference === undefined)) {
    throw invalid("give either snapshot (a baked snapshot's name) or image (a pulled image's reference)");
  }
  const { snapshot: _s, image: _i, ...config } = body;
  const dataDir = holdings.options.dataDir;
  const image =
    snapshot !== undefined
      ? await holdings.image(snapshot)
      : await Image.pull(reference!, {
          pullPolicy: "never",
          signal: ctx.signal,
          ...(dataDir === undefined ? {} : { dataDir }),
        });
  const held = await holdings.startVm(image, snapshot, config as WireStartConfig, ctx.signal);
  ctx.note({ vm: held.id });
  sendJson(ctx.res, 201, holdings.vmInfo(held));
}

export async function listVms(ctx: RequestContext): Promise<void> {
  const { holdings } = ctx.core;
  sendJson(ctx.res, 200, { vms: holdings.vms().map((held) => holdings.vmInfo(held)) });
}

export async function getVm(ctx: RequestContext): Promise<void> {
  const { holdings } = ctx.core;
  sendJson(ctx.res, 200, holdings.vmInfo(holdings.vm(ctx.params.id!)));
}

/**
 * `DELETE /v1/vms/{id}`: stop the VM, or give a pool's VM back (`discard=1`: thrown away;
 * `kill=1`: at once).
 */
export async function deleteVm(ctx: RequestContext): Promise<void> {
  const { holdings } = ctx.core;
  const held = holdings.vm(ctx.params.id!);
  ctx.note({ vm: held.id });
  const how = queryFlag(ctx.url, "kill") ? "kill" : queryFlag(ctx.url, "discard") ? "discard" : "stop";
  await holdings.end(held, how);
  ctx.res.writeHead(204).end();
}

/** `POST /v1/vms/{id}/ping`: a round trip to the guest agent, in ms. */
export async function pingVm(ctx: RequestContext): Promise<void> {
  const ms = await ctx.core.holdings.using(ctx.params.id!, (held) => held.vm.ping());
  sendJson(ctx.res, 200, { ms });
}
