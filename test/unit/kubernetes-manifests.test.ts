/**
 * deploy/kubernetes/ against the Kubernetes API schemas, offline: every object of every YAML file
 * is validated by kubernetes-models (validators generated from Kubernetes' OpenAPI schemas), the
 * KVM components' patches are applied to the Deployment and the result validated again, and the
 * manifests are checked against the server itself: the args are flags `supermachine serve`
 * accepts with values its parsers take, the probes are its public routes, the HPA's metric is a
 * gauge it exports and the Prometheus Adapter rule serves it.
 */
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { describe, it } from "node:test";
import { parseAllDocuments, parse as parseYaml } from "yaml";
import { positiveInt } from "../../src/cli/cli.ts";
import { buildProgram } from "../../src/cli/program.ts";
import { parseDuration, parseListen, parsePool } from "../../src/cli/serve.ts";
import type { Holdings } from "../../src/server/holdings.ts";
import { ServerMetrics } from "../../src/server/metrics.ts";
import { ROUTES } from "../../src/server/routes.ts";

const root = new URL("../../deploy/kubernetes/", import.meta.url).pathname;

// biome-ignore lint/suspicious/noExplicitAny: parsed YAML, whose shape the schemas check
type Obj = Record<string, any>;
interface Doc {
  file: string;
  object: Obj;
}

function yamlFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true })
    .flatMap((entry) => {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) return yamlFiles(path);
      return /\.ya?ml$/.test(entry.name) ? [path] : [];
    })
    .sort();
}

function loadDocs(): Doc[] {
  const docs: Doc[] = [];
  for (const path of yamlFiles(root)) {
    for (const doc of parseAllDocuments(readFileSync(path, "utf8"))) {
      const file = relative(root, path);
      assert.deepEqual(doc.errors, [], `${file}: YAML errors`);
      const object = doc.toJS() as Obj | null;
      if (object !== null) docs.push({ file, object });
    }
  }
  return docs;
}

/** Validates `object` with the kubernetes-models class of its apiVersion and kind; throws what is wrong. */
async function validateObject(object: Obj): Promise<void> {
  const { apiVersion, kind } = object;
  assert.equal(typeof apiVersion, "string", "apiVersion");
  assert.match(kind, /^[A-Z][A-Za-z]+$/, "kind");
  // Core objects are `kubernetes-models/v1/Kind`, the others `kubernetes-models/<group>/<version>/Kind`.
  let Model: new (data: Obj) => { validate(): void };
  try {
    Model = (await import(`kubernetes-models/${apiVersion}/${kind}`))[kind];
  } catch (error) {
    throw new Error(`no Kubernetes schema for ${apiVersion} ${kind}`, { cause: error });
  }
  new Model(object).validate();
}

const isKustomize = (object: Obj) => String(object.apiVersion).startsWith("kustomize.config.k8s.io/");

/** RFC 6902 `add` and `replace` (what the components use), on a copy. */
function applyJsonPatch(target: Obj, ops: { op: string; path: string; value?: unknown }[]): Obj {
  const out = structuredClone(target);
  for (const { op, path, value } of ops) {
    assert.ok(op === "add" || op === "replace", `patch op ${op} (add and replace only)`);
    const keys = path
      .split("/")
      .slice(1)
      .map((k) => k.replaceAll("~1", "/").replaceAll("~0", "~"));
    const last = keys.pop()!;
    let parent: Obj = out;
    for (const key of keys) {
      assert.ok(
        parent !== null && typeof parent === "object" && key in parent,
        `patch path ${path}: no ${key}`,
      );
      parent = parent[key];
    }
    if (Array.isArray(parent)) {
      assert.ok(last === "-" || /^\d+$/.test(last), `patch path ${path}: array index`);
      if (op === "add") parent.splice(last === "-" ? parent.length : Number(last), 0, value);
      else parent[Number(last)] = value;
    } else {
      if (op === "replace") assert.ok(last in parent, `patch path ${path}: replace of a missing ${last}`);
      parent[last] = value;
    }
  }
  return out;
}

const docs = loadDocs();
const apiObjects = docs.filter((d) => !isKustomize(d.object));
const only = (kind: string, name?: string) => {
  const found = apiObjects.filter(
    (d) => d.object.kind === kind && (name === undefined || d.object.metadata?.name === name),
  );
  assert.equal(found.length, 1, `one ${kind}${name === undefined ? "" : ` ${name}`}`);
  return found[0]!.object;
};
const deployment = only("Deployment", "supermachine");
const podSpec = deployment.spec.template.spec;
const server = podSpec.containers.find((c: Obj) => c.name === "supermachine");

describe("deploy/kubernetes", () => {
  it("every object validates against the Kubernetes API schema", async () => {
    const kinds = apiObjects.map((d) => `${d.object.apiVersion} ${d.object.kind}`).sort();
    for (const kind of [
      "apps/v1 Deployment",
      "autoscaling/v2 HorizontalPodAutoscaler",
      "networking.k8s.io/v1 NetworkPolicy",
      "policy/v1 PodDisruptionBudget",
      "v1 ConfigMap",
      "v1 Secret",
      "v1 Service",
    ])
      assert.ok(kinds.includes(kind), `a ${kind} among ${kinds.join(", ")}`);
    for (const { file, object } of apiObjects) {
      await validateObject(object).catch((error: Error) => {
        throw new Error(`${file}: ${object.kind} ${object.metadata?.name}: ${error.message}`, {
          cause: error,
        });
      });
    }
  });

  it("the validation finds what is wrong with a broken object", async () => {
    const broken = structuredClone(deployment);
    broken.spec.replicas = "two";
    delete broken.spec.template.spec.containers[0].name;
    await assert.rejects(validateObject(broken), (error: Error) => {
      assert.match(error.message, /spec\/replicas must be integer/);
      assert.match(error.message, /containers\/0 must have required property name/);
      return true;
    });
    const service = structuredClone(only("Service", "supermachine"));
    service.spec.ports[0].port = "http";
    await assert.rejects(validateObject(service), /port must be integer/);
    await assert.rejects(
      validateObject({ apiVersion: "apps/v1", kind: "Deploymnet" }),
      /no Kubernetes schema/,
    );
  });

  it("kustomization.yaml lists the namespaced objects, components exist, the patched Deployments validate", async () => {
    const kustomization = docs.find((d) => d.file === "kustomization.yaml")!.object;
    assert.equal(kustomization.kind, "Kustomization");
    const listed = new Set<string>(kustomization.resources);
    for (const { file } of apiObjects) {
      if (dirname(file) !== ".") continue;
      // Applied elsewhere, by design: the example token and the adapter's own ConfigMap.
      const elsewhere = file === "token-secret.example.yaml" || file === "prometheus-adapter-config.yaml";
      assert.equal(listed.has(file), !elsewhere, `${file} ${elsewhere ? "not " : ""}in kustomization.yaml`);
    }
    for (const file of listed) assert.ok(existsSync(join(root, file)), `${file} exists`);
    const components = docs.filter((d) => d.object.kind === "Component");
    assert.deepEqual(components.map((d) => dirname(d.file)).sort(), [
      "components/kvm-device-plugin",
      "components/kvm-hostpath",
    ]);
    const commented = readFileSync(join(root, "kustomization.yaml"), "utf8");
    for (const { file, object } of components) {
      assert.equal(object.apiVersion, "kustomize.config.k8s.io/v1alpha1", file);
      assert.ok(commented.includes(`- ${dirname(file)}`), `kustomization.yaml names ${dirname(file)}`);
      for (const patch of object.patches) {
        assert.deepEqual(patch.target, {
          group: "apps",
          version: "v1",
          kind: "Deployment",
          name: "supermachine",
        });
        const patched = applyJsonPatch(deployment, parseYaml(patch.patch));
        await validateObject(patched);
        const container = patched.spec.template.spec.containers[0];
        assert.ok(container.args.includes("--require-kvm"), `${file}: KVM pods are not ready without it`);
        const kvm =
          container.resources.limits["devices.kubevirt.io/kvm"] === "1" ||
          container.volumeMounts.some((m: Obj) => m.mountPath === "/dev/kvm");
        assert.ok(kvm, `${file} gives the server /dev/kvm`);
      }
    }
  });

  it("the server's args are flags `supermachine serve` accepts, with values its parsers take", () => {
    const cli = { out() {}, err() {}, note() {}, signal: new AbortController().signal };
    const program = buildProgram(cli, "0.0.0", () => {});
    const serve = program.commands.find((c) => c.name() === "serve")!;
    const { operands, unknown } = serve.parseOptions(server.args);
    assert.deepEqual({ operands, unknown }, { operands: [], unknown: [] }, "no unknown flags or operands");
    const flags = serve.opts();
    assert.equal(server.command, undefined, "the image's ENTRYPOINT runs `supermachine serve`");
    const { port } = parseListen(flags.listen);
    assert.equal(server.ports[0].containerPort, port);
    assert.equal(
      flags.tokenFile,
      `${server.volumeMounts.find((m: Obj) => m.name === "token").mountPath}/token`,
    );
    const maxVms = positiveInt(flags.maxVms, "--max-vms")!;
    const pools = (flags.pool as string[]).map(parsePool);
    assert.ok(pools.length > 0, "a declared pool");
    assert.ok(
      pools.reduce((n, p) => n + (p.max ?? 4), 0) <= maxVms,
      "the declared pools' max fit in --max-vms",
    );
    const graceMs = parseDuration(flags.gracePeriod, "--grace-period");
    for (const flag of ["idleTimeout", "maxLifetime"]) parseDuration(flags[flag], flag);
    // preStop + grace period + the 10 s wind-down of cancelled work fit in the pod's grace period.
    const preStop = Number(server.lifecycle.preStop.exec.command[1]);
    assert.ok(preStop + graceMs / 1000 + 10 < podSpec.terminationGracePeriodSeconds);

    // The init container bakes the pool's snapshot with `supermachine pull ... --name`.
    const bake = podSpec.initContainers[0];
    const pull = program.commands.find((c) => c.name() === "pull")!;
    assert.deepEqual(bake.command, ["supermachine"]);
    assert.equal(bake.args[0], "pull");
    const parsed = pull.parseOptions(bake.args.slice(1));
    assert.deepEqual(parsed.unknown, []);
    assert.equal(parsed.operands.length, 1, "one image reference");
    assert.deepEqual(
      pools.map((p) => p.snapshot),
      [pull.opts().name],
    );
    assert.deepEqual(bake.env, server.env, "the same data, cache and runtime dirs");
  });

  it("the probes are the server's public routes, on its port", () => {
    const publicPaths = ROUTES.filter((r) => r.public === true && r.method === "GET").map((r) => r.path);
    const port = server.ports[0];
    for (const probe of ["livenessProbe", "readinessProbe", "startupProbe"]) {
      const { path, port: probePort } = server[probe].httpGet;
      assert.ok(publicPaths.includes(path), `${probe} ${path} is one of ${publicPaths.join(", ")}`);
      assert.equal(probePort, port.name);
    }
    assert.equal(server.readinessProbe.httpGet.path, "/readyz");
    const annotations = deployment.spec.template.metadata.annotations;
    assert.ok(publicPaths.includes(annotations["prometheus.io/path"]));
    assert.equal(Number(annotations["prometheus.io/port"]), port.containerPort);
  });

  it("Services, PDB, NetworkPolicy and HPA point at the Deployment's pods", () => {
    const labels = deployment.spec.template.metadata.labels;
    const selects = (selector: Record<string, string>) =>
      Object.entries(selector).every(([k, v]) => labels[k] === v);
    assert.ok(selects(deployment.spec.selector.matchLabels));
    const service = only("Service", "supermachine");
    const headless = only("Service", "supermachine-pods");
    for (const s of [service, headless]) {
      assert.ok(selects(s.spec.selector), s.metadata.name);
      assert.equal(s.spec.ports[0].targetPort, server.ports[0].name);
    }
    assert.equal(headless.spec.clusterIP, "None");
    assert.equal(
      podSpec.subdomain,
      headless.metadata.name,
      "per-pod DNS names need subdomain = the headless Service",
    );
    assert.ok(selects(only("PodDisruptionBudget").spec.selector.matchLabels));
    const policy = only("NetworkPolicy");
    assert.ok(selects(policy.spec.podSelector.matchLabels));
    assert.ok(
      policy.spec.ingress.every((rule: Obj) =>
        rule.ports.every((p: Obj) => p.port === server.ports[0].containerPort),
      ),
    );
    const hpa = only("HorizontalPodAutoscaler");
    assert.deepEqual(hpa.spec.scaleTargetRef, {
      apiVersion: "apps/v1",
      kind: "Deployment",
      name: deployment.metadata.name,
    });
    assert.ok(hpa.spec.minReplicas >= 2, "two pods at least: a PDB with one pod blocks every drain");
    const token = only("Secret", "supermachine-token");
    assert.equal(podSpec.volumes.find((v: Obj) => v.name === "token").secret.secretName, token.metadata.name);
    assert.ok(
      token.stringData.token.length < 16,
      "the example token is refused by the server (16 characters at least)",
    );
  });

  it("the HPA scales on a gauge the server exports, which the Prometheus Adapter rule serves per pod", () => {
    const hpa = only("HorizontalPodAutoscaler");
    const [metric] = hpa.spec.metrics;
    assert.equal(metric.type, "Pods");
    const name: string = metric.pods.metric.name;
    const holdings = { pools: () => [], vms: () => [], directVms: [], options: { maxVms: 8 } };
    const metrics = new ServerMetrics(holdings as unknown as Holdings, {
      accelerator: () => "tcg",
      streams: () => 0,
      draining: () => false,
    });
    try {
      assert.equal(
        metrics.registry.getSingleMetric(name)?.constructor.name,
        "Gauge",
        `${name} is a gauge of the server`,
      );
    } finally {
      metrics.close();
    }
    const adapter = only("ConfigMap", "adapter-config");
    const config = parseYaml(adapter.data["config.yaml"]);
    const rule = config.rules.find((r: Obj) => r.name?.as === name);
    assert.ok(rule, `a rule whose name.as is ${name}`);
    assert.match(rule.seriesQuery, new RegExp(`^${name}\\{`));
    assert.ok(new RegExp(rule.name.matches).test(name));
    assert.deepEqual(rule.resources.overrides, {
      namespace: { resource: "namespace" },
      pod: { resource: "pod" },
    });
    for (const placeholder of ["<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"])
      assert.ok(rule.metricsQuery.includes(placeholder), `metricsQuery uses ${placeholder}`);
  });
});
