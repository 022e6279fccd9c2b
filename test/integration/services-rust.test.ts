/**
 * Rust (Debian's rustc and cargo) as a toolchain image: baked without a workload, a clone runs the
 * compiler from the snapshot.
 */
import assert from "node:assert/strict";
import { describe } from "node:test";
import { serviceSuite } from "../helpers/services.ts";

describe("rust as a toolchain image", { timeout: 600_000 }, () => {
  const service = serviceSuite("rust", { memoryMiB: 512, workload: false });

  service.it("the image has the official image's config", async () => {
    assert.deepEqual(service.image().command(), ["bash"]);
  });

  service.it("rustc and cargo run in a restored clone", async (vm) => {
    const rustc = await vm.exec(["rustc", "--version"]);
    assert.match(rustc.stdoutText, /^rustc 1\.63\.\d+/);
    const cargo = await vm.exec(["cargo", "--version"]);
    assert.match(cargo.stdoutText, /^cargo 1\.\d+\.\d+/);
  });

  service.it("compiles and runs a program", async (vm) => {
    const out = await vm
      .execBuilder()
      .stageFile("/tmp/main.rs", 'fn main() { println!("hello from rust {}", 6 * 7); }\n')
      .argv(["rustc", "-o", "/tmp/main", "/tmp/main.rs"])
      .chain(["/tmp/main"])
      .timeout(120_000)
      .output();
    assert.equal(out.stdoutText, "hello from rust 42\n");
  });
});
