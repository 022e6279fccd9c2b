/** `Lazy`: the default pool of an image (library and client) is built once, retried after a failure, closed once. */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { Lazy } from "../../src/internal/index.ts";

class Resource {
  closedWith: { force?: boolean } | undefined;
  async close(options: { force?: boolean }): Promise<void> {
    this.closedWith = options;
  }
}

describe("Lazy", () => {
  it("builds on the first get and hands the same value to later ones", async () => {
    let builds = 0;
    const lazy = new Lazy(async () => {
      builds++;
      return new Resource();
    });
    assert.equal(builds, 0);
    const [a, b] = await Promise.all([lazy.get(), lazy.get()]);
    assert.equal(a, b);
    assert.equal(await lazy.get(), a);
    assert.equal(builds, 1);
  });

  it("forgets a failed build, so the next get builds again", async () => {
    let builds = 0;
    const lazy = new Lazy(async () => {
      builds++;
      if (builds === 1) throw new Error("first build fails");
      return new Resource();
    });
    await assert.rejects(lazy.get(), /first build fails/);
    assert.ok((await lazy.get()) instanceof Resource);
    assert.equal(builds, 2);
  });

  it("close closes what was built with the options given, and the next get builds anew", async () => {
    const lazy = new Lazy(async () => new Resource());
    await lazy.close(); // nothing built: nothing to close
    const first = await lazy.get();
    await lazy.close({ force: true });
    assert.deepEqual(first.closedWith, { force: true });
    const second = await lazy.get();
    assert.notEqual(second, first);
    assert.equal(second.closedWith, undefined);
  });

  it("close after a failed build resolves", async () => {
    const lazy = new Lazy<Resource>(async () => {
      throw new Error("no pool");
    });
    await assert.rejects(lazy.get(), /no pool/);
    await lazy.close();
  });
});
