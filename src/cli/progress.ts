/**
 * Pull, flatten and bake progress for people. On a terminal: cli-progress draws one bar per layer
 * (bytes, percentage, ETA) and a bar while layers are flattened, with status lines printed above them.
 * Elsewhere (a pipe, a log file, CI): one plain line per step. With `--quiet`: nothing.
 */
import { MultiBar, type SingleBar } from "cli-progress";
import type { PullProgress, RootfsProgress } from "../index.ts";
import { bytes } from "./output.ts";

export type ProgressMode = "tty" | "lines" | "quiet";

/** The mode for standard error, given `--quiet` (and `--json`, which keeps stderr for errors). */
export function progressMode(quiet: boolean): ProgressMode {
  if (quiet) return "quiet";
  return process.stderr.isTTY ? "tty" : "lines";
}

export class Progress {
  readonly #mode: ProgressMode;
  readonly #stream: NodeJS.WriteStream;
  #bars: MultiBar | undefined;
  readonly #blobs = new Map<string, SingleBar>();
  #flatten: SingleBar | undefined;

  constructor(mode: ProgressMode, stream: NodeJS.WriteStream = process.stderr) {
    this.#mode = mode;
    this.#stream = stream;
  }

  /** A status line: above the bars on a terminal, a line of its own elsewhere. */
  step(text: string): void {
    if (this.#mode === "quiet") return;
    if (this.#bars) this.#bars.log(`${text}\n`);
    else this.#stream.write(`${text}\n`);
  }

  pull = (event: PullProgress): void => {
    if (event.type === "resolved") {
      this.step(
        `${event.reference}: ${event.layerCount} layers, ${bytes(event.totalBytes)} (${event.platform})`,
      );
      return;
    }
    if (event.type === "done") {
      this.#stopBars();
      this.step(`pulled ${event.reference}: ${bytes(event.downloadedBytes)} in ${seconds(event.durationMs)}`);
      return;
    }
    const name = `${event.kind} ${event.digest.replace(/^sha256:/, "").slice(0, 12)}`;
    if (this.#mode !== "tty") {
      if (event.state === "cached") this.step(`${name}: already stored`);
      else if (event.state === "done") this.step(`${name}: ${bytes(event.totalBytes)} done`);
      return;
    }
    let bar = this.#blobs.get(event.digest);
    if (bar === undefined) {
      bar = this.#multibar().create(event.totalBytes, 0, { name, state: "" });
      this.#blobs.set(event.digest, bar);
    }
    const state = event.state === "cached" ? "already stored" : event.state === "done" ? "done" : "";
    bar.setTotal(Math.max(event.totalBytes, 1));
    bar.update(event.state === "downloading" ? event.bytesDone : event.totalBytes, { name, state });
  };

  rootfs = (event: RootfsProgress): void => {
    if (event.phase === "layer") {
      const name = `flattening layer ${event.layerIndex + 1}/${event.layerCount}`;
      if (this.#mode !== "tty") {
        if (event.bytesRead === 0) this.step(name);
        return;
      }
      this.#flatten ??= this.#multibar().create(Math.max(event.bytesTotal, 1), 0, { name, state: "" });
      this.#flatten.setTotal(Math.max(event.bytesTotal, 1));
      this.#flatten.update(event.bytesRead, { name, state: "" });
    } else if (event.phase === "done") {
      this.#stopBars();
      this.step(`root filesystem ready in ${seconds(event.durationMs)}`);
    } else if (event.phase === "scan") {
      this.step(`reading ${event.dir}`);
    } else {
      this.step(`root filesystem: ${event.phase}`);
    }
  };

  /** Removes the bars (their last state stays on screen). */
  finish(): void {
    this.#stopBars();
  }

  #multibar(): MultiBar {
    this.#bars ??= new MultiBar({
      stream: this.#stream,
      format: "{name} {bar} {percentage}% {value}/{total} ETA {eta_formatted} {state}",
      formatValue: (value, _options, type) =>
        type === "value" || type === "total"
          ? bytes(value)
          : type === "percentage"
            ? String(value).padStart(3)
            : String(value),
      barsize: 24,
      hideCursor: true,
      gracefulExit: false,
      etaBuffer: 20,
    });
    return this.#bars;
  }

  #stopBars(): void {
    // Draw once more: status lines logged since the last frame are written by a redraw.
    this.#bars?.update();
    this.#bars?.stop();
    this.#bars = undefined;
    this.#blobs.clear();
    this.#flatten = undefined;
  }
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`;
}
