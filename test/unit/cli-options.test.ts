/** The CLI's docker-style options: -p, -v, --mount (parsing only; the VMs are in cli-service.test.ts). */
import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { UsageError } from "../../src/cli/cli.ts";
import { checkMounts, mountOrder, parseMount, parseVolume } from "../../src/cli/mounts.ts";
import { hostAddress, parsePublish, portColumn, portLine } from "../../src/cli/ports.ts";
import { stopSignalOf } from "../../src/cli/workload.ts";

const usage = (pattern: RegExp) => (error: unknown) =>
  error instanceof UsageError && pattern.test(error.message) && !error.message.includes("\n");

describe("-p", () => {
  it("takes docker's forms; the address defaults to 127.0.0.1 and a missing host port to 0 (any)", () => {
    const cases: [string, [string, number, number][]][] = [
      ["80", [["127.0.0.1", 0, 80]]],
      ["80/tcp", [["127.0.0.1", 0, 80]]],
      ["0:80", [["127.0.0.1", 0, 80]]],
      ["8080:80", [["127.0.0.1", 8080, 80]]],
      ["0.0.0.0:8080:80", [["0.0.0.0", 8080, 80]]],
      ["127.0.0.1::80", [["127.0.0.1", 0, 80]]],
      ["[::1]:8080:80/tcp", [["::1", 8080, 80]]],
      ["[::]::80", [["::", 0, 80]]],
      [
        "8000-8001:80-81",
        [
          ["127.0.0.1", 8000, 80],
          ["127.0.0.1", 8001, 81],
        ],
      ],
      [
        "80-81",
        [
          ["127.0.0.1", 0, 80],
          ["127.0.0.1", 0, 81],
        ],
      ],
    ];
    for (const [value, expected] of cases)
      assert.deepEqual(
        parsePublish(value),
        expected.map(([host, hostPort, guestPort]) => ({ host, hostPort, guestPort })),
        value,
      );
  });

  it("refuses anything else with one line", () => {
    const cases: [string, RegExp][] = [
      ["", /GUEST_PORT "" is not a port/],
      ["80/udp", /only TCP ports/],
      ["0", /GUEST_PORT 0 is out of range \(1-65535\)/],
      ["65536", /out of range/],
      ["x:80", /HOST_PORT "x" is not a port/],
      ["1.2.3:80:80", /"1.2.3" is not an IPv4 address/],
      ["localhost:80:80", /"localhost" is not an IPv4 address/],
      ["::1:80:80", /too many ':' \(an IPv6 address goes in brackets\)/],
      ["[::1]80", /followed by ':'/],
      ["[1.2.3.4]:80:80", /not an IPv6 address/],
      ["[::1]:80", /give HOST_PORT:GUEST_PORT after the address/],
      ["8000-8002:80-81", /the same length/],
      ["0:80-81", /host port 0 stands for one port/],
      ["81-80", /ends before it starts/],
      ["1-2000", /longer than 1024 ports/],
      ["0-3:80-83", /includes 0/],
    ];
    for (const [value, pattern] of cases)
      assert.throws(() => parsePublish(value), usage(pattern), JSON.stringify(value));
  });

  it("prints as docker port and docker ps do", () => {
    const v4 = { host: "127.0.0.1", hostPort: 49153, guestPort: 8080 };
    const v6 = { host: "::1", hostPort: 49153, guestPort: 80 };
    assert.equal(portLine(v4), "8080/tcp -> 127.0.0.1:49153");
    assert.equal(portColumn(v4), "127.0.0.1:49153->8080/tcp");
    assert.equal(hostAddress(v6), "[::1]:49153");
    assert.equal(portLine(v6), "80/tcp -> [::1]:49153");
  });
});

describe("-v and --mount", () => {
  it("-v HOST:GUEST[:ro|rw]: absolute host paths, or relative ones starting with .", () => {
    assert.deepEqual(parseVolume("/srv/data:/data").spec, {
      hostPath: "/srv/data",
      guestPath: "/data",
      readOnly: false,
    });
    assert.deepEqual(parseVolume("/srv:/srv:ro").spec, {
      hostPath: "/srv",
      guestPath: "/srv",
      readOnly: true,
    });
    assert.equal(parseVolume("/srv:/srv:ro,rw").spec.readOnly, false);
    assert.equal(parseVolume("./data:/data", "/home/me").spec.hostPath, "/home/me/data");
    assert.equal(parseVolume("../up:/data", "/home/me").spec.hostPath, "/home/up");
    assert.equal(parseVolume(".:/work", "/home/me").spec.hostPath, "/home/me");
    assert.equal(parseVolume("/srv:/data").given, "-v /srv:/data");
  });

  it("--mount: docker's long form, plus symlinks= and uid=/gid=", () => {
    assert.deepEqual(parseMount("type=bind,src=/srv,dst=/data").spec, {
      hostPath: "/srv",
      guestPath: "/data",
      readOnly: false,
    });
    assert.deepEqual(
      parseMount("type=bind,source=/srv,target=/data,readonly,symlinks=follow,uid=1000,gid=100").spec,
      {
        hostPath: "/srv",
        guestPath: "/data",
        readOnly: true,
        symlinks: "follow",
        owner: { uid: 1000, gid: 100 },
      },
    );
    assert.equal(parseMount("src=/a,destination=/b,ro=true").spec.readOnly, true);
    assert.equal(parseMount("src=/a,dst=/b,readonly=false").spec.readOnly, false);
    assert.equal(parseMount("src=./a,dst=/b", "/home/me").spec.hostPath, "/home/me/a");
    assert.deepEqual(parseMount("src=/a,dst=/b,uid=0,gid=0").spec.owner, { uid: 0, gid: 0 });
  });

  it("refuses anything else with one line", () => {
    const volumes: [string, RegExp][] = [
      ["data:/data", /"data" would be a named volume.*\.\/data/],
      ["/tmp", /give a host and a guest directory/],
      ["/a:/b:ro:x", /give a host and a guest directory/],
      [":/data", /the host directory is empty/],
      ["/tmp:data", /guest directory must be an absolute path below \//],
      ["/tmp:/", /guest directory must be an absolute path below \//],
      ["/tmp:/data:z", /unsupported option "z" \(ro or rw\)/],
    ];
    for (const [value, pattern] of volumes)
      assert.throws(() => parseVolume(value), usage(pattern), JSON.stringify(value));
    const mounts: [string, RegExp][] = [
      ["type=volume,src=/a,dst=/b", /only type=bind is supported/],
      ["type=tmpfs,dst=/b", /only type=bind is supported/],
      ["src=/a", /dst is missing/],
      ["dst=/b", /src is missing/],
      ["src=,dst=/b", /src needs a value/],
      ["src=/a,dst=/b,readonly=maybe", /readonly=maybe: use true or false/],
      ["src=/a,dst=/b,symlinks=sometimes", /symlinks=sometimes: use opaque, deny, follow/],
      ["src=/a,dst=/b,uid=1000", /give uid and gid together/],
      ["src=/a,dst=/b,uid=-1,gid=0", /uid=-1 is not a numeric id/],
      ["src=/a,dst=/b,uid=4294967295,gid=0", /not a numeric id/],
      ["src=/a,dst=/b,bind-propagation=shared", /unknown field "bind-propagation"/],
      ["src=data,dst=/b", /named volume/],
    ];
    for (const [value, pattern] of mounts)
      assert.throws(() => parseMount(value), usage(pattern), JSON.stringify(value));
  });

  it("mounts a parent directory before what is mounted in it, as docker does", () => {
    const order = mountOrder(
      ["/a/b/c", "/a", "/x/y", "/a/b"].map((guest) => parseVolume(`/srv:${guest}`)),
    ).map((spec) => spec.guestPath);
    assert.deepEqual(order, ["/a", "/x/y", "/a/b", "/a/b/c"], "by depth, else as given");
  });

  it("checks the host directory before a VM starts; as root, a writable root-owned one needs uid and gid", async () => {
    const dir = await mkdtemp(join(tmpdir(), "sm-cli-options-"));
    try {
      await assert.rejects(
        checkMounts([parseVolume(`${dir}/missing:/data`)]),
        usage(/missing is not a directory/),
      );
      await mkdir(join(dir, "d"));
      await checkMounts([parseVolume(`${dir}/d:/data:ro`)]);
      await checkMounts([parseMount(`src=${dir}/d,dst=/data,uid=0,gid=0`)]);
      const writable = checkMounts([parseVolume(`${dir}/d:/data`)]);
      if (process.geteuid?.() === 0)
        await assert.rejects(
          writable,
          usage(/belongs to root; .* --mount type=bind,src=.*\/d,dst=\/data,uid=N,gid=N .*read-only$/),
        );
      else await writable;
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("the stop signal", () => {
  it("is the image's StopSignal (a name, a bare name or a number), else SIGTERM", () => {
    const config = (stopSignal: string | undefined) =>
      ({ stopSignal }) as unknown as Parameters<typeof stopSignalOf>[0];
    assert.equal(stopSignalOf(undefined), "SIGTERM");
    assert.equal(stopSignalOf(config(undefined)), "SIGTERM");
    assert.equal(stopSignalOf(config("")), "SIGTERM");
    assert.equal(stopSignalOf(config("SIGQUIT")), "SIGQUIT");
    assert.equal(stopSignalOf(config("quit")), "QUIT");
    assert.equal(stopSignalOf(config("9")), 9);
  });
});
