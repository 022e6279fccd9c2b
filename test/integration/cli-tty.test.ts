/**
 * `run -it` as a person uses it, in a real terminal: tmux runs the CLI, the test types with
 * send-keys, reads what the terminal shows (pipe-pane streams it; capture-pane reads the screen),
 * resizes the window, presses Ctrl-C, and reads the exit code the shell prints afterwards.
 */
import assert from "node:assert/strict";
import { execFile, spawnSync } from "node:child_process";
import { createReadStream } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import { cliPath } from "../helpers/cli.ts";
import { scratchDir } from "../helpers/scratch.ts";
import { busyboxRootfs, vmTest } from "../helpers/vm.ts";

const run = promisify(execFile);

/** What the terminal printed so far, and a wait for text that has not been matched yet. */
class TerminalOutput {
  #text = "";
  #from = 0;
  #waiters: (() => void)[] = [];

  constructor(stream: NodeJS.ReadableStream) {
    stream.setEncoding("utf8");
    stream.on("data", (chunk: string) => {
      this.#text += chunk;
      for (const wake of this.#waiters.splice(0)) wake();
    });
  }

  /** Resolves with the match once `pattern` appears after the previous match; fails after 60 s. */
  async waitFor(pattern: RegExp): Promise<RegExpExecArray> {
    const deadline = Date.now() + 60_000;
    for (;;) {
      const match = pattern.exec(this.#text.slice(this.#from));
      if (match) {
        this.#from += match.index + match[0].length;
        return match;
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`the terminal never showed ${pattern}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.#waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  get text(): string {
    return this.#text;
  }
}

vmTest(
  "run -it in a terminal: typing, the screen, resizing, Ctrl-C in the guest, the exit code",
  async ({ t }) => {
    const rootfs = await busyboxRootfs();
    const dir = await scratchDir("sm-tty-");
    const socket = join(dir, "tmux.sock");
    const fifo = join(dir, "terminal.fifo");
    const tmux = (...args: string[]) => run("tmux", ["-S", socket, ...args]);
    await run("mkfifo", [fifo]);

    const command = `${cliPath} run -it --rootfs ${rootfs} sh; echo "EXIT=$?"; sleep 120`;
    await tmux("new-session", "-d", "-s", "sm", "-x", "80", "-y", "24", command);
    // The tmux server is a daemon: end it after the test, and also if this process ends first.
    const killServer = () => spawnSync("tmux", ["-S", socket, "kill-server"], { stdio: "ignore" });
    process.once("exit", killServer);
    t.after(() => {
      killServer();
      process.off("exit", killServer);
    });
    await tmux("pipe-pane", "-t", "sm", "-o", `cat > ${fifo}`);
    const out = new TerminalOutput(createReadStream(fifo));
    const type = (text: string) =>
      tmux("send-keys", "-t", "sm", "-l", text).then(() => tmux("send-keys", "-t", "sm", "Enter"));
    try {
      // Typed before the guest's shell is up: the terminal holds the keys until it reads them.
      await type("echo READY$((40 + 2))");
      await out.waitFor(/READY42/);
      const screen = (await tmux("capture-pane", "-p", "-t", "sm")).stdout;
      assert.match(screen, /^READY42\s*$/m, `the screen shows the output:\n${screen}`);

      await type("stty size");
      await out.waitFor(/\n24 80\r*\n/);
      await tmux("resize-window", "-t", "sm", "-x", "100", "-y", "30");
      await type("stty size");
      await out.waitFor(/\n30 100\r*\n/);

      await type("sleep 600");
      await tmux("send-keys", "-t", "sm", "C-c");
      await type("echo INT=$?");
      await out.waitFor(/INT=130/);

      await type("exit 7");
      await out.waitFor(/EXIT=7/);
    } catch (error) {
      t.diagnostic(`terminal output so far:\n${out.text}`);
      throw error;
    }
  },
  { timeout: 180_000 },
);
