/**
 * Linux signal numbers as the guest kernel uses them (x86-64 and arm64 share this numbering). The
 * host's own `os.constants.signals` is not used: the guest is always Linux, the host may not be.
 */

const NAMES: readonly string[] = [
  "",
  "SIGHUP",
  "SIGINT",
  "SIGQUIT",
  "SIGILL",
  "SIGTRAP",
  "SIGABRT",
  "SIGBUS",
  "SIGFPE",
  "SIGKILL",
  "SIGUSR1",
  "SIGSEGV",
  "SIGUSR2",
  "SIGPIPE",
  "SIGALRM",
  "SIGTERM",
  "SIGSTKFLT",
  "SIGCHLD",
  "SIGCONT",
  "SIGSTOP",
  "SIGTSTP",
  "SIGTTIN",
  "SIGTTOU",
  "SIGURG",
  "SIGXCPU",
  "SIGXFSZ",
  "SIGVTALRM",
  "SIGPROF",
  "SIGWINCH",
  "SIGIO",
  "SIGPWR",
  "SIGSYS",
];

const ALIASES: Record<string, number> = { SIGIOT: 6, SIGPOLL: 29, SIGCLD: 17 };
const SIGRTMIN = 34;
const SIGRTMAX = 64;

/** `"SIGKILL"` for 9; `"SIGRTMIN+2"` for 36; `"SIG99"` for numbers Linux does not define. */
export function signalName(signo: number): string {
  const name = NAMES[signo];
  if (name) return name;
  if (signo === SIGRTMIN) return "SIGRTMIN";
  if (signo > SIGRTMIN && signo < SIGRTMAX) return `SIGRTMIN+${signo - SIGRTMIN}`;
  if (signo === SIGRTMAX) return "SIGRTMAX";
  return `SIG${signo}`;
}

/**
 * The Linux number of a signal given by name (`"SIGTERM"`, `"TERM"`, `"SIGRTMIN+1"`) or number;
 * `undefined` if unknown.
 */
export function signalNumber(signal: string | number): number | undefined {
  if (typeof signal === "number") {
    return Number.isInteger(signal) && signal >= 1 && signal <= SIGRTMAX ? signal : undefined;
  }
  let name = signal.trim().toUpperCase();
  if (/^\d+$/.test(name)) return signalNumber(Number(name));
  if (!name.startsWith("SIG")) name = `SIG${name}`;
  const index = NAMES.indexOf(name);
  if (index > 0) return index;
  if (ALIASES[name] !== undefined) return ALIASES[name];
  const rt = /^SIGRT(MIN|MAX)(?:([+-])(\d+))?$/.exec(name);
  if (rt) {
    const base = rt[1] === "MIN" ? SIGRTMIN : SIGRTMAX;
    const offset = rt[3] ? Number(rt[3]) * (rt[2] === "-" ? -1 : 1) : 0;
    const n = base + offset;
    return n >= SIGRTMIN && n <= SIGRTMAX ? n : undefined;
  }
  return undefined;
}
