import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { SupermachineError } from "../../src/errors.ts";
import { parseReference } from "../../src/oci/reference.ts";

const D256 = `sha256:${"a".repeat(64)}`;
const D512 = `sha512:${"0123456789abcdef".repeat(8)}`;

// biome-ignore format: one case per line reads best
// input → [registry, repository, tag, digest, canonical, familiar]
const valid: [string, string, string, string | undefined, string | undefined, string, string][] = [
  ["alpine", "docker.io", "library/alpine", "latest", undefined, "docker.io/library/alpine:latest", "alpine:latest"],
  ["alpine:3.20", "docker.io", "library/alpine", "3.20", undefined, "docker.io/library/alpine:3.20", "alpine:3.20"],
  ["library/alpine:3.20", "docker.io", "library/alpine", "3.20", undefined, "docker.io/library/alpine:3.20", "alpine:3.20"],
  ["docker.io/alpine", "docker.io", "library/alpine", "latest", undefined, "docker.io/library/alpine:latest", "alpine:latest"],
  ["docker.io/library/alpine", "docker.io", "library/alpine", "latest", undefined, "docker.io/library/alpine:latest", "alpine:latest"],
  ["index.docker.io/alpine", "docker.io", "library/alpine", "latest", undefined, "docker.io/library/alpine:latest", "alpine:latest"],
  ["index.docker.io/user/app:v1", "docker.io", "user/app", "v1", undefined, "docker.io/user/app:v1", "user/app:v1"],
  ["user/app", "docker.io", "user/app", "latest", undefined, "docker.io/user/app:latest", "user/app:latest"],
  ["library/a/b", "docker.io", "library/a/b", "latest", undefined, "docker.io/library/a/b:latest", "library/a/b:latest"],
  ["localhost/app", "localhost", "app", "latest", undefined, "localhost/app:latest", "localhost/app:latest"],
  ["localhost:5000/a/b:tag", "localhost:5000", "a/b", "tag", undefined, "localhost:5000/a/b:tag", "localhost:5000/a/b:tag"],
  ["registry:5000/x@" + D256, "registry:5000", "x", undefined, D256, `registry:5000/x@${D256}`, `registry:5000/x@${D256}`],
  ["name:tag@" + D256, "docker.io", "library/name", "tag", D256, `docker.io/library/name:tag@${D256}`, `name:tag@${D256}`],
  ["alpine@" + D512, "docker.io", "library/alpine", undefined, D512, `docker.io/library/alpine@${D512}`, `alpine@${D512}`],
  ["[::1]:5000/x", "[::1]:5000", "x", "latest", undefined, "[::1]:5000/x:latest", "[::1]:5000/x:latest"],
  ["[::1]/x:t", "[::1]", "x", "t", undefined, "[::1]/x:t", "[::1]/x:t"],
  ["[2001:db8::1]:443/ns/img@" + D256, "[2001:db8::1]:443", "ns/img", undefined, D256, `[2001:db8::1]:443/ns/img@${D256}`, `[2001:db8::1]:443/ns/img@${D256}`],
  ["127.0.0.1:5000/busybox:1.36", "127.0.0.1:5000", "busybox", "1.36", undefined, "127.0.0.1:5000/busybox:1.36", "127.0.0.1:5000/busybox:1.36"],
  ["ghcr.io/owner/repo/sub:v1.2.3-rc.1", "ghcr.io", "owner/repo/sub", "v1.2.3-rc.1", undefined, "ghcr.io/owner/repo/sub:v1.2.3-rc.1", "ghcr.io/owner/repo/sub:v1.2.3-rc.1"],
  ["quay.io/a_b/c__d/e---f/g.h", "quay.io", "a_b/c__d/e---f/g.h", "latest", undefined, "quay.io/a_b/c__d/e---f/g.h:latest", "quay.io/a_b/c__d/e---f/g.h:latest"],
  ["Foo.example/app", "Foo.example", "app", "latest", undefined, "Foo.example/app:latest", "Foo.example/app:latest"],
  ["Foo/bar", "Foo", "bar", "latest", undefined, "Foo/bar:latest", "Foo/bar:latest"],
  ["example.com/app:_under", "example.com", "app", "_under", undefined, "example.com/app:_under", "example.com/app:_under"],
  ["a:UPPER.tag-ok_1", "docker.io", "library/a", "UPPER.tag-ok_1", undefined, "docker.io/library/a:UPPER.tag-ok_1", "a:UPPER.tag-ok_1"],
  ["x:" + "t".repeat(128), "docker.io", "library/x", "t".repeat(128), undefined, `docker.io/library/x:${"t".repeat(128)}`, `x:${"t".repeat(128)}`],
  ["localhost:5000", "docker.io", "library/localhost", "5000", undefined, "docker.io/library/localhost:5000", "localhost:5000"],
  ["sub-domain.example.com:65535/a", "sub-domain.example.com:65535", "a", "latest", undefined, "sub-domain.example.com:65535/a:latest", "sub-domain.example.com:65535/a:latest"],
  ["docker.io/library/library/x", "docker.io", "library/library/x", "latest", undefined, "docker.io/library/library/x:latest", "library/library/x:latest"],
  ["abcdef0123:tag", "docker.io", "library/abcdef0123", "tag", undefined, "docker.io/library/abcdef0123:tag", "abcdef0123:tag"],
];

// input → fragment of the error message
const invalid: [string, RegExp][] = [
  ["", /empty/],
  [" alpine", /whitespace/],
  ["alpine\n", /whitespace/],
  ["https://docker.io/alpine", /URL scheme/],
  ["Alpine", /must be lowercase/],
  ["library/Alpine", /must be lowercase/],
  ["docker.io/Library/alpine", /must be lowercase/],
  ["alpine:", /empty tag/],
  ["alpine:-tag", /invalid tag/],
  ["alpine:.tag", /invalid tag/],
  ["alpine:ta/g", /port "ta" is not a number/],
  ["alpine:t@g", /digest/],
  ["x:" + "t".repeat(129), /at most 128/],
  ["alpine@", /empty digest/],
  ["alpine@sha256", /no algorithm/],
  ["alpine@sha256:abc", /expected 64 lowercase hex/],
  ["alpine@sha256:" + "A".repeat(64), /expected 64 lowercase hex/],
  ["alpine@md5:" + "a".repeat(32), /unsupported digest algorithm/],
  ["alpine@1sha:" + "a".repeat(64), /invalid digest algorithm/],
  ["alpine@" + D256 + "@" + D256, /more than one '@'/],
  ["a".repeat(64), /image ID/],
  ["/alpine", /empty/],
  ["alpine/", /empty component/],
  ["a//b", /empty component/],
  ["-alpine", /invalid repository path component/],
  ["alpine-", /invalid repository path component/],
  ["a...b", /invalid repository path component/],
  ["a___b", /invalid repository path component/],
  ["a..b", /invalid repository path component/],
  ["a_.b", /invalid repository path component/],
  ["a$b", /invalid repository path component/],
  ["localhost:5000/", /empty/],
  ["localhost:abc/x", /port "abc" is not a number/],
  ["localhost:0/x", /out of range/],
  ["localhost:70000/x", /out of range/],
  ["-bad.example/x", /not a valid host name/],
  ["bad-.example/x", /not a valid host name/],
  ["bad..example/x", /not a valid host name/],
  ["under_score.example/x", /not a valid host name/],
  ["[::1/x", /unterminated IPv6/],
  ["[zz::1]:5000/x", /not a valid IPv6/],
  ["[::1]x/y", /after IPv6/],
  ["[::1]:5000", /invalid repository path component/],
  [":tag", /empty/],
  ["@" + D256, /empty/],
  [`example.com/${"a".repeat(250)}`, /at most 255/],
];

describe("parseReference", () => {
  for (const [input, registry, repository, tag, digest, canonical, familiar] of valid) {
    test(`valid: ${input.length > 60 ? `${input.slice(0, 60)}…` : input}`, () => {
      const ref = parseReference(input);
      assert.equal(ref.registry, registry);
      assert.equal(ref.repository, repository);
      assert.equal(ref.tag, tag);
      assert.equal(ref.digest, digest);
      assert.equal(ref.toString(), canonical);
      assert.equal(ref.familiar, familiar);
      assert.equal(ref.name, `${registry}/${repository}`);
      assert.equal(JSON.stringify({ ref }), JSON.stringify({ ref: canonical }));
      // the canonical form is a fixed point
      assert.equal(parseReference(canonical).toString(), canonical);
    });
  }

  for (const [input, message] of invalid) {
    test(`invalid: ${JSON.stringify(input.length > 60 ? `${input.slice(0, 60)}…` : input)}`, () => {
      assert.throws(
        () => parseReference(input),
        (err: unknown) => {
          assert.ok(err instanceof SupermachineError, "SupermachineError");
          assert.equal(err.code, "INVALID_REFERENCE");
          assert.match(err.message, message);
          assert.ok(err.message.includes(JSON.stringify(input)), "message quotes the input");
          return true;
        },
      );
    });
  }

  test("a name of exactly 255 characters is accepted", () => {
    const name = `example.com/${"a".repeat(255 - "example.com/".length)}`;
    assert.equal(parseReference(name).name, name);
  });
});
