import type { PullProgress, RootfsProgress } from "../index.ts";

interface BlobLine {
  digest: string;
  kind: string;
  done: number;
  total: number;
  state: string;
  startedAt: number;
}

/**
 * Renders pull and flatten progress on a terminal: one line per layer (bytes, speed, ETA), redrawn
 * in place at most every 100 ms. Prints nothing when the stream is not a terminal.
 */
export class ProgressDisplay {
  readonly #stream: NodeJS.WriteStream;
  readonly #enabled: boolean;
  readonly #blobs = new Map<string, BlobLine>();
  #status = "";
  #drawnLines = 0;
  #lastDraw = 0;

  constructor(stream: NodeJS.WriteStream = process.stderr, enabled = stream.isTTY === true) {
    this.#stream = stream;
    this.#enabled = enabled;
  }

  pull = (event: PullProgress): void => {
    if (event.type === "resolved") {
      this.#status = `${event.reference}: ${event.layerCount} layers, ${bytes(event.totalBytes)} (${event.platform})`;
    } else if (event.type === "blob") {
      const line = this.#blobs.get(event.digest) ?? {
        digest: event.digest,
        kind: event.kind,
        done: 0,
        total: event.totalBytes,
        state: event.state,
        startedAt: Date.now(),
      };
      line.done = event.bytesDone;
      line.total = event.totalBytes;
      line.state = event.state;
      this.#blobs.set(event.digest, line);
    } else {
      this.#status = `pulled ${event.reference}: ${bytes(event.downloadedBytes)} in ${(event.durationMs / 1000).toFixed(1)} s`;
    }
    this.#draw(event.type !== "blob");
  };

  rootfs = (event: RootfsProgress): void => {
    if (event.phase === "layer") {
      this.#status = `flattening layer ${event.layerIndex + 1}/${event.layerCount} (${bytes(event.bytesRead)}/${bytes(event.bytesTotal)})`;
    } else if (event.phase === "done") {
      this.#status = `root filesystem ready in ${(event.durationMs / 1000).toFixed(1)} s`;
    } else {
      this.#status = `building root filesystem: ${event.phase}`;
    }
    this.#draw(event.phase === "done");
  };

  /** Leaves the last frame on screen. */
  finish(): void {
    this.#draw(true);
  }

  #draw(force: boolean): void {
    if (!this.#enabled) return;
    const now = Date.now();
    if (!force && now - this.#lastDraw < 100) return;
    this.#lastDraw = now;
    const lines = [...this.#blobs.values()].map((b) => {
      const short = b.digest.replace(/^sha256:/, "").slice(0, 12);
      if (b.state === "cached") return `${short} ${b.kind}: already stored`;
      if (b.state === "done") return `${short} ${b.kind}: done ${bytes(b.total)}`;
      const seconds = Math.max((now - b.startedAt) / 1000, 0.001);
      const speed = b.done / seconds;
      const eta = speed > 0 ? Math.max(0, (b.total - b.done) / speed) : Number.NaN;
      return `${short} ${b.kind}: ${bytes(b.done)}/${bytes(b.total)} ${bytes(speed)}/s ETA ${Number.isFinite(eta) ? `${eta.toFixed(0)} s` : "?"}`;
    });
    if (this.#status) lines.push(this.#status);
    let out = this.#drawnLines > 0 ? `\x1b[${this.#drawnLines}F` : "";
    for (const line of lines) out += `\x1b[2K${line.slice(0, (this.#stream.columns || 100) - 1)}\n`;
    this.#stream.write(out);
    this.#drawnLines = lines.length;
  }
}

export function bytes(n: number): string {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i++;
  }
  return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}
