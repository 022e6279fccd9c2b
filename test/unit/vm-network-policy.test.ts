/**
 * Network policies without a VM: parsing and validation (one-line INVALID_ARGUMENT errors),
 * resolving allow-lists into relay rules and /etc/hosts lines, the managed /etc/hosts block, what
 * a restore of a snapshot with or without a network device may ask for.
 */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { SupermachineError } from "../../src/errors.ts";
import type { Snapshot } from "../../src/snapshot/index.ts";
import { mergeHostsBlock } from "../../src/vm/guest-network.ts";
import { parseNetworkPolicy, resolveAllowList } from "../../src/vm/network-policy.ts";
import { restoreNetwork } from "../../src/vm/restore.ts";

function assertInvalid(fn: () => unknown, fragment: RegExp): void {
  assert.throws(fn, (error: unknown) => {
    assert.ok(SupermachineError.is(error, "INVALID_ARGUMENT"), String(error));
    assert.match(error.message, fragment);
    assert.ok(!error.message.includes("\n"), "one line");
    return true;
  });
}

describe("parseNetworkPolicy", () => {
  it("takes none, outbound and allow-lists of every rule form", () => {
    assert.deepEqual(parseNetworkPolicy("none"), { kind: "none" });
    assert.deepEqual(parseNetworkPolicy("outbound"), { kind: "outbound" });
    assert.deepEqual(parseNetworkPolicy({ allow: [] }), { kind: "allow-list", rules: [] });
    assert.deepEqual(
      parseNetworkPolicy({
        allow: ["10.1.2.0/24:443", "192.0.2.7:80", "Example.ORG.:8443", "host:8080", "0.0.0.0/0:53"],
      }),
      {
        kind: "allow-list",
        rules: [
          { kind: "cidr", net: 0x0a010200, prefix: 24, port: 443 },
          { kind: "cidr", net: 0xc0000207, prefix: 32, port: 80 },
          { kind: "name", name: "example.org", port: 8443 },
          { kind: "host", port: 8080 },
          { kind: "cidr", net: 0, prefix: 0, port: 53 },
        ],
      },
    );
  });

  it("refuses what it cannot enforce or does not understand, saying what to write instead", () => {
    const cases: [unknown, RegExp][] = [
      ["all", /must be "none", "outbound" or \{ allow/],
      [undefined, /got undefined/],
      [["10.0.0.0/8:443"], /got a list/],
      [{ allow: "10.0.0.0/8:443" }, /must be a list/],
      [{ allow: [], deny: [] }, /unknown field deny/],
      [{ allow: [443] }, /allow\[0\] must be a string/],
      [{ allow: ["10.1.2.0/24"] }, /write TARGET:PORT/],
      [{ allow: ["10.1.2.0/24:0"] }, /port must be a number from 1 to 65535/],
      [{ allow: ["10.1.2.0/24:65536"] }, /port must be/],
      [{ allow: ["10.1.2.0/24:https"] }, /port must be/],
      [{ allow: ["10.1.2.3/24:443"] }, /bits set beyond its \/24 prefix; write 10\.1\.2\.0\/24/],
      [{ allow: ["10.1.2.0/33:443"] }, /prefix length must be 0 to 32/],
      [{ allow: ["10.1.2.256:443"] }, /not an IPv4 address or CIDR/],
      [{ allow: ["127.0.0.1:8080"] }, /written "host:PORT"/],
      [{ allow: ["127.0.0.0/8:8080"] }, /written "host:PORT"/],
      [{ allow: ["10.0.2.2:80"] }, /guest's own network/],
      [{ allow: ["10.0.2.0/25:80"] }, /guest's own network/],
      [{ allow: ["[::1]:80"] }, /IPv6/],
      [{ allow: ["fe80::1:80"] }, /IPv6/],
      [{ allow: ["localhost:80"] }, /host's loopback is written "host:PORT"/],
      [{ allow: ["bad_name:80"] }, /not an IPv4 address, CIDR or host name/],
      [{ allow: [":80"] }, /write TARGET:PORT/],
      [{ allow: Array.from({ length: 257 }, (_, i) => `host:${i + 1}`) }, /at most 256/],
    ];
    for (const [policy, fragment] of cases) assertInvalid(() => parseNetworkPolicy(policy), fragment);
  });

  it("names where the bad entry is", () => {
    assertInvalid(
      () => parseNetworkPolicy({ allow: ["host:80", "nope"] }, "VmConfig.network"),
      /^VmConfig\.network\.allow\[1\] "nope"/,
    );
  });
});

describe("resolveAllowList", () => {
  const fakeDns = (table: Record<string, string[]>) => async (name: string) => {
    const found = table[name];
    if (found === undefined) throw Object.assign(new Error("not found"), { code: "ENOTFOUND" });
    return found;
  };

  it("turns rules into relay rules and names into /32 rules plus hosts lines", async () => {
    const parsed = parseNetworkPolicy({
      allow: ["host:8080", "10.1.2.0/24:443", "api.example:443", "api.example:80", "cdn.example:443"],
    });
    assert.equal(parsed.kind, "allow-list");
    if (parsed.kind !== "allow-list") return;
    const resolved = await resolveAllowList(
      parsed.rules,
      fakeDns({ "api.example": ["192.0.2.10", "192.0.2.11"], "cdn.example": ["192.0.2.10"] }),
    );
    assert.deepEqual(resolved.relayRules, [
      "127.0.0.1/32:8080",
      "10.1.2.0/24:443",
      "192.0.2.10/32:443",
      "192.0.2.11/32:443",
      "192.0.2.10/32:80",
      "192.0.2.11/32:80",
    ]);
    assert.deepEqual(resolved.hosts, [
      { address: "192.0.2.10", name: "api.example" },
      { address: "192.0.2.11", name: "api.example" },
      { address: "192.0.2.10", name: "cdn.example" },
    ]);
  });

  it("refuses names that do not resolve, resolve to loopback or into the guest's network", async () => {
    const rules = (allow: string[]) => {
      const parsed = parseNetworkPolicy({ allow });
      return parsed.kind === "allow-list" ? parsed.rules : [];
    };
    const dns = fakeDns({ "here.example": ["127.0.1.1"], "slirp.example": ["10.0.2.9"], none: [] });
    for (const [name, fragment] of [
      ["missing.example", /does not resolve on the host \(ENOTFOUND\)/],
      ["here.example", /resolves to the host's loopback \(127\.0\.1\.1\); write host:443/],
      ["slirp.example", /into the guest's own network/],
      ["none", /no IPv4 address/],
    ] as const) {
      await assert.rejects(resolveAllowList(rules([`${name}:443`]), dns), (error: unknown) => {
        assert.ok(SupermachineError.is(error, "INVALID_ARGUMENT"));
        assert.match(error.message, fragment);
        return true;
      });
    }
    // A name with many addresses can exceed the relay's limit.
    const many = Array.from({ length: 200 }, (_, i) => `192.0.2.${i}`);
    await assert.rejects(
      resolveAllowList(rules(["big.example:1", "big.example:2"]), fakeDns({ "big.example": many })),
      /resolve to 400 address:port rules; at most 256/,
    );
  });

  it("resolves with the host's own resolver by default (getaddrinfo: /etc/hosts, then DNS)", async () => {
    await assert.rejects(
      resolveAllowList([{ kind: "name", name: "localhost", port: 80 }]),
      /localhost resolves to the host's loopback \(127\.0\.0\.1\)/,
    );
  });
});

describe("the managed /etc/hosts block", () => {
  const hosts = [
    { address: "192.0.2.10", name: "api.example" },
    { address: "192.0.2.11", name: "api.example" },
  ];
  const block =
    "# supermachine network allow-list: managed by the host, rewritten at every start\n" +
    "192.0.2.10\tapi.example\n192.0.2.11\tapi.example\n" +
    "# end of the supermachine network allow-list\n";

  it("is appended, replaced in place of the old one, and removed", () => {
    const image = "127.0.0.1\tlocalhost\n::1\tlocalhost\n";
    const first = mergeHostsBlock(image, hosts);
    assert.equal(first, image + block);
    assert.equal(mergeHostsBlock(first, hosts), first, "idempotent");
    const other = mergeHostsBlock(`${first}10.9.9.9\tlater\n`, [
      { address: "192.0.2.99", name: "b.example" },
    ]);
    assert.equal(
      other,
      `${image}10.9.9.9\tlater\n# supermachine network allow-list: managed by the host, rewritten at every start\n` +
        "192.0.2.99\tb.example\n# end of the supermachine network allow-list\n",
    );
    assert.equal(mergeHostsBlock(first, []), image);
    assert.equal(mergeHostsBlock("", hosts), block);
    assert.equal(mergeHostsBlock("", []), "");
    assert.equal(mergeHostsBlock("no-newline", []), "no-newline\n");
  });
});

describe("restoring under a network policy", () => {
  const snapshotWith = (network: { device: boolean; policy: unknown }) =>
    ({
      name: "snap",
      dir: "/snap",
      assets: { kernel: "/k", initramfs: "/i", netRelay: "/opt/sm-net" },
      manifest: { network },
    }) as unknown as Snapshot;

  it("refuses a network for a snapshot made without a device, saying how to bake one", async () => {
    const snapshot = snapshotWith({ device: false, policy: "none" });
    for (const policy of ["outbound", { allow: ["host:80"] }] as const) {
      await assert.rejects(restoreNetwork(snapshot, policy), (error: unknown) => {
        assert.ok(SupermachineError.is(error, "INVALID_ARGUMENT"));
        assert.match(error.message, /made without a network device/);
        assert.match(error.message, /Image\.builder\(ref\)\.network\("outbound"\)/);
        return true;
      });
    }
    const none = await restoreNetwork(snapshot, undefined);
    assert.deepEqual([none.kind, none.device, none.machine], ["none", false, undefined]);
  });

  it("defaults to the snapshot's policy; none on a device cuts it off (restrict=on)", async () => {
    const snapshot = snapshotWith({ device: true, policy: "outbound" });
    const byDefault = await restoreNetwork(snapshot, undefined);
    assert.deepEqual(
      [byDefault.kind, byDefault.device, byDefault.machine],
      ["outbound", true, { restrict: false }],
    );
    const none = await restoreNetwork(snapshot, "none");
    assert.deepEqual(
      [none.kind, none.device, none.machine, none.relay],
      ["none", true, { restrict: true }, undefined],
    );
    const allow = await restoreNetwork(snapshot, { allow: ["host:8080"] });
    assert.equal(allow.kind, "allow-list");
    assert.deepEqual(allow.relay, { path: "/opt/sm-net", rules: ["127.0.0.1/32:8080"] });
    assert.deepEqual(allow.machine, { restrict: false });
  });
});
