/** The CLI's progress output where it is not a terminal: one plain line per step; nothing when quiet. */
import assert from "node:assert/strict";
import { PassThrough } from "node:stream";
import { describe, it } from "node:test";
import { Progress, type ProgressMode } from "../../src/cli/progress.ts";

function render(mode: ProgressMode): string {
  const stream = new PassThrough();
  let text = "";
  stream.setEncoding("utf8").on("data", (chunk: string) => (text += chunk));
  const progress = new Progress(mode, stream as unknown as NodeJS.WriteStream);
  const digest = `sha256:${"ab".repeat(32)}`;
  progress.pull({
    type: "resolved",
    reference: "r",
    manifestDigest: digest,
    platform: "linux/amd64",
    layerCount: 1,
    totalBytes: 2_500_000,
  });
  for (const [state, bytesDone] of [
    ["downloading", 0],
    ["downloading", 1_000_000],
    ["done", 2_500_000],
  ] as const)
    progress.pull({
      type: "blob",
      reference: "r",
      kind: "layer",
      digest,
      bytesDone,
      totalBytes: 2_500_000,
      state,
    });
  progress.pull({
    type: "done",
    reference: "r",
    manifestDigest: digest,
    downloadedBytes: 2_500_000,
    durationMs: 1500,
  });
  progress.rootfs({
    phase: "layer",
    layerIndex: 0,
    layerCount: 1,
    digest,
    bytesRead: 0,
    bytesTotal: 10,
    entries: 0,
  });
  progress.rootfs({
    phase: "layer",
    layerIndex: 0,
    layerCount: 1,
    digest,
    bytesRead: 10,
    bytesTotal: 10,
    entries: 3,
  });
  progress.rootfs({ phase: "done", imagePath: "/x", durationMs: 200 });
  progress.finish();
  return text;
}

describe("CLI progress", () => {
  it("prints one line per step when not on a terminal", () => {
    assert.equal(
      render("lines"),
      [
        "r: 1 layers, 2.5 MB (linux/amd64)",
        "layer abababababab: 2.5 MB done",
        "pulled r: 2.5 MB in 1.5 s",
        "flattening layer 1/1",
        "root filesystem ready in 0.2 s",
        "",
      ].join("\n"),
    );
  });

  it("prints nothing when quiet", () => {
    assert.equal(render("quiet"), "");
  });
});
