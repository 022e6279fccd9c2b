import { SupermachineError } from "../index.ts";

/** One command-line option. `multi` options may repeat and collect into an array. */
export interface OptionSpec {
  readonly name: string;
  readonly short?: string;
  readonly kind: "boolean" | "string" | "multi";
  readonly help: string;
  readonly value?: string;
}

export interface ParsedArgs {
  readonly options: Record<string, string | boolean | string[] | undefined>;
  readonly positionals: string[];
}

/**
 * Parses `argv` against `specs`, docker-style: options come first; the first positional (or `--`)
 * ends option parsing when `stopAtPositional` is set, so `run IMAGE sh -c x` keeps `-c` for the
 * command. Short boolean flags combine (`-it`).
 */
export function parseArgs(
  argv: readonly string[],
  specs: readonly OptionSpec[],
  stopAtPositional = false,
): ParsedArgs {
  const options: Record<string, string | boolean | string[] | undefined> = {};
  const positionals: string[] = [];
  const byName = new Map(specs.map((s) => [s.name, s]));
  const byShort = new Map(specs.filter((s) => s.short).map((s) => [s.short!, s]));
  const set = (spec: OptionSpec, value: string | boolean) => {
    if (spec.kind === "multi") {
      const list = (options[spec.name] as string[] | undefined) ?? [];
      list.push(String(value));
      options[spec.name] = list;
    } else {
      options[spec.name] = value;
    }
  };
  let i = 0;
  const takeValue = (spec: OptionSpec, inline: string | undefined): string => {
    if (inline !== undefined) return inline;
    const next = argv[++i];
    if (next === undefined) throw usage(`option --${spec.name} needs a value`);
    return next;
  };
  for (; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === "--") {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (arg.startsWith("--") && arg.length > 2) {
      const eq = arg.indexOf("=");
      const name = eq === -1 ? arg.slice(2) : arg.slice(2, eq);
      const inline = eq === -1 ? undefined : arg.slice(eq + 1);
      const spec = byName.get(name);
      if (!spec) throw usage(`unknown option --${name}`);
      set(spec, spec.kind === "boolean" ? inline !== "false" : takeValue(spec, inline));
      continue;
    }
    if (arg.startsWith("-") && arg.length > 1) {
      for (let j = 1; j < arg.length; j++) {
        const spec = byShort.get(arg[j]!);
        if (!spec) throw usage(`unknown option -${arg[j]}`);
        if (spec.kind === "boolean") {
          set(spec, true);
          continue;
        }
        const rest = arg.slice(j + 1);
        set(spec, takeValue(spec, rest.length > 0 ? rest : undefined));
        break;
      }
      continue;
    }
    if (stopAtPositional) {
      positionals.push(...argv.slice(i));
      break;
    }
    positionals.push(arg);
  }
  return { options, positionals };
}

/** Formats the option list for `--help`. */
export function formatOptions(specs: readonly OptionSpec[]): string {
  return specs
    .map((s) => {
      const flag = `${s.short ? `-${s.short}, ` : "    "}--${s.name}${s.kind === "boolean" ? "" : ` ${s.value ?? "VALUE"}`}`;
      return `  ${flag.padEnd(30)} ${s.help}`;
    })
    .join("\n");
}

export function usage(message: string): SupermachineError {
  return new SupermachineError("INVALID_ARGUMENT", message);
}
