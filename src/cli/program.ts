/**
 * The command line's grammar (commander): commands, options, help. Each action imports its
 * command's module when it runs, so that `--help`, `--version` and a mistyped flag never load the
 * library.
 */
import { Command, Option } from "commander";
import type { Cli } from "./cli.ts";

const collect = (value: string, previous: string[]) => [...previous, value];

/** Options of every command that may pull an image. */
function pullOptions(command: Command): Command {
  return command
    .option("--platform <OS/ARCH[/VARIANT]>", "platform to pull (default linux/amd64)")
    .option(
      "--insecure-registry <HOST[:PORT]>",
      "registry reachable over plain HTTP (loopback always is; repeatable)",
      collect,
      [],
    )
    .option("-q, --quiet", "no progress output");
}

/** Options that shape a command run in a VM (run and exec). */
function commandOptions(command: Command): Command {
  return command
    .option("-i, --interactive", "forward standard input")
    .option("-t, --tty", "run the command on a pseudo-terminal")
    .option("-e, --env <KEY=VALUE>", "set an environment variable (repeatable)", collect, [])
    .option("-w, --workdir <DIR>", "working directory in the guest")
    .option("-u, --user <USER>", "user: name, uid, name:group or uid:gid");
}

/**
 * The program. `setExitCode` receives each action's exit code; `version` is printed by --version
 * and the version command.
 */
export function buildProgram(cli: Cli, version: string, setExitCode: (code: number) => void): Command {
  const program = new Command("supermachine")
    .description("Run OCI/Docker images and root filesystems as isolated microVMs.")
    .usage("COMMAND [OPTIONS]")
    .version(version, "-v, --version", "print the version")
    .helpOption("-h, --help", "show help")
    .helpCommand("help [COMMAND]", "show help for a command")
    .enablePositionalOptions()
    .showSuggestionAfterError(true)
    .configureHelp({ sortSubcommands: false, subcommandTerm: (command) => command.name() })
    // Set before the commands are added: they inherit both.
    .exitOverride()
    .configureOutput({
      // commander's errors in our one-line form: "supermachine: unknown option '--jsn' (Did you mean --json?)".
      outputError: (text, write) =>
        write(
          `supermachine: ${text
            .replace(/^error: /, "")
            .trim()
            .replace(/\n+/g, " ")}\n`,
        ),
    });

  const action =
    <A extends unknown[]>(fn: (...args: A) => Promise<number>) =>
    async (...args: A) => {
      setExitCode(await fn(...args));
    };

  commandOptions(
    pullOptions(
      program
        .command("run")
        .description("start a microVM and run a command in it")
        .usage(
          "[OPTIONS] IMAGE|SNAPSHOT [--] [ARG...]\n       supermachine run [OPTIONS] --rootfs PATH [--] COMMAND [ARG...]",
        )
        .argument("[IMAGE_AND_ARGS...]")
        .passThroughOptions()
        .option("--rootfs <PATH>", "boot this root filesystem (ext4 image or directory) instead of an IMAGE")
        .option("--entrypoint <CMD>", "replace the image's Entrypoint (and drop its Cmd)")
        .option("-d, --detach", "run in the background: print the VM's name and return")
        .option("--name <NAME>", "name the detached VM (default: vm-<random>)")
        .option("--rm", "remove the detached VM's state when it ends (a foreground VM always is)")
        .option(
          "--network <POLICY>",
          "none (default: no network device), outbound, or allow:RULE[,RULE...] with RULE CIDR:PORT, NAME:PORT or host:PORT",
        )
        .option("--hostname <NAME>", "the guest's hostname (default: the VM's id)")
        .option(
          "-p, --publish <[IP:][HOST:]GUEST>",
          "publish a guest TCP port on the host (default 127.0.0.1, any free port; repeatable)",
          collect,
          [],
        )
        .option(
          "-v, --volume <HOST:GUEST[:ro]>",
          "mount a host directory in the guest, live (repeatable)",
          collect,
          [],
        )
        .option(
          "--mount <SPEC>",
          "mount, long form: type=bind,src=DIR,dst=DIR[,readonly][,symlinks=opaque|deny|follow][,uid=N,gid=N]",
          collect,
          [],
        )
        .addOption(
          new Option("--pull <POLICY>", "when to pull the IMAGE")
            .choices(["missing", "always", "never"])
            .default("missing"),
        ),
    ),
  )
    .option("-m, --memory <MiB>", "guest memory in MiB (default 512)")
    .option("--vcpus <N>", "number of vCPUs (default 1)")
    .option("--timeout <MS>", "kill the command after this many milliseconds")
    .addHelpText(
      "after",
      `
IMAGE is a registry reference (alpine, localhost:5000/app:1, host/x@sha256:…), oci:DIR[:TAG] or
docker-archive:FILE[:NAME:TAG]; it is pulled when missing, flattened and booted, and docker's rules
apply: ARGs replace Cmd, --entrypoint replaces Entrypoint. A SNAPSHOT baked by
'supermachine pull --name NAME' is restored instead; without a command, run follows the workload
its bake started (the image's Entrypoint + Cmd): its output, and its exit code.

-p 8080:80 listens on 127.0.0.1:8080 and carries each connection to guest port 80 (-p 80 or
-p 0:80: any free host port; -p 0.0.0.0:8080:80: every interface); the chosen ports are printed
on stderr as '80/tcp -> 127.0.0.1:49153'. -v /srv/data:/data[:ro] and --mount mount host
directories (absolute, or starting with ./); as root, a writable mount of a root-owned directory
needs --mount …,uid=N,gid=N for the files the guest creates.

Standard streams pass through (stdin with -i, or when it is not a terminal). Ctrl-C or SIGTERM
stops the command as 'stop' does: the image's StopSignal (default SIGTERM), 10 s, then SIGKILL.
The exit code is the command's (128+N when signal N killed it); 125 for supermachine's own
errors; 126 when the command cannot be run, 127 when it is not found. With -d the VM keeps
running after this command returns: see ps, port, exec, logs, stop and rm.`,
    )
    .action(
      action(async (words: string[], flags) => {
        const { runCommand } = await import("./run.ts");
        return runCommand(cli, words, flags);
      }),
    );

  commandOptions(
    program
      .command("exec")
      .description("run a command in a running detached VM")
      .usage("[OPTIONS] NAME [--] COMMAND [ARG...]")
      .argument("<NAME_AND_COMMAND...>")
      .passThroughOptions(),
  ).action(
    action(async (words: string[], flags) => {
      const { execCommand } = await import("./vms.ts");
      return execCommand(cli, words, flags);
    }),
  );

  program
    .command("ps")
    .description("list detached VMs")
    .option("-a, --all", "also list VMs that have exited")
    .option("--json", "print JSON")
    .action(
      action(async (flags) => {
        const { psCommand } = await import("./vms.ts");
        return psCommand(cli, flags);
      }),
    );

  program
    .command("port")
    .description("list a detached VM's published ports")
    .argument("<NAME>")
    .argument("[GUEST_PORT]", "only this guest port's host addresses")
    .action(
      action(async (name: string, guest: string | undefined) => {
        const { portCommand } = await import("./vms.ts");
        return portCommand(cli, name, guest);
      }),
    );

  program
    .command("logs")
    .description("print the output of a detached VM's command")
    .argument("<NAME>")
    .option("-f, --follow", "keep printing new output until the command ends")
    .action(
      action(async (name: string, flags) => {
        const { logsCommand } = await import("./vms.ts");
        return logsCommand(cli, name, flags);
      }),
    );

  program
    .command("stop")
    .description("stop detached VMs gracefully (the StopSignal, 10 s, then SIGKILL)")
    .argument("<NAME...>")
    .action(
      action(async (names: string[]) => {
        const { stopCommand } = await import("./vms.ts");
        return stopCommand(cli, names);
      }),
    );

  program
    .command("rm")
    .description("remove detached VMs that have exited")
    .argument("<NAME...>")
    .option("-f, --force", "stop running ones first")
    .action(
      action(async (names: string[], flags) => {
        const { rmCommand } = await import("./vms.ts");
        return rmCommand(cli, names, flags);
      }),
    );

  pullOptions(
    program
      .command("pull")
      .description("pull an image into the local store (and with --name, bake a snapshot of it)")
      .argument("<REFERENCE>")
      .option("--name <NAME>", "also bake a snapshot named NAME: boot, start the workload, snapshot")
      .option("-m, --memory <MiB>", "guest memory of the snapshot (default 512)")
      .option("--vcpus <N>", "vCPUs of the snapshot (default 1)")
      .option("--json", "print JSON"),
  ).action(
    action(async (reference: string, flags) => {
      const { pullCommand } = await import("./images.ts");
      return pullCommand(cli, reference, flags);
    }),
  );

  program
    .command("images")
    .description("list stored images")
    .option("--json", "print JSON")
    .action(
      action(async (flags) => {
        const { imagesCommand } = await import("./images.ts");
        return imagesCommand(cli, flags);
      }),
    );

  program
    .command("rmi")
    .description("remove stored images (their blobs go with the next prune)")
    .argument("<REFERENCE...>")
    .option("--platform <OS/ARCH>", "remove only this platform")
    .action(
      action(async (references: string[], flags) => {
        const { rmiCommand } = await import("./images.ts");
        return rmiCommand(cli, references, flags);
      }),
    );

  program
    .command("prune")
    .description("delete blobs and root filesystems no stored image uses")
    .option("--json", "print JSON")
    .action(
      action(async (flags) => {
        const { pruneCommand } = await import("./images.ts");
        return pruneCommand(cli, flags);
      }),
    );

  const listSnapshots = action(async (flags: { json?: boolean }) => {
    const { snapshotsCommand } = await import("./images.ts");
    return snapshotsCommand(cli, flags);
  });
  program
    .command("snapshots")
    .description("list baked snapshots")
    .option("--json", "print JSON")
    .action(listSnapshots);
  const snapshot = program.command("snapshot").description("manage baked snapshots: ls, rm");
  snapshot
    .command("ls")
    .description("list baked snapshots")
    .option("--json", "print JSON")
    .action(listSnapshots);
  snapshot
    .command("rm")
    .description("remove baked snapshots (VMs restored from them are not affected)")
    .argument("<NAME...>")
    .option("-f, --force", "remove even when other snapshots are layered on it")
    .action(
      action(async (names: string[], flags) => {
        const { snapshotRmCommand } = await import("./images.ts");
        return snapshotRmCommand(cli, names, flags);
      }),
    );

  program
    .command("serve")
    .description("serve this host's images, pools and VMs over HTTP and WebSocket (docs/server.md)")
    .option("--listen <HOST:PORT>", "address to listen on", "127.0.0.1:7070")
    .option("--token-file <FILE>", "bearer token clients must send (required beyond loopback)")
    .option("--max-vms <N>", "most VMs at once, counting every pool's max (default 16)")
    .option("--idle-timeout <DURATION>", "stop a VM unused this long, e.g. 10m (default 10m; 0: never)")
    .option("--max-lifetime <DURATION>", "kill a VM older than this, e.g. 1h (default 1h; 0: never)")
    .option("--max-streams <N>", "most WebSocket streams at once (default 256)")
    .option("--max-body-bytes <N>", "largest JSON request body (default 8 MiB)")
    .option("--max-upload-bytes <N>", "largest file upload (default 1 GiB)")
    .option("--max-output-bytes <N>", "most output a one-shot exec collects per stream (default 16 MiB)")
    .option("--mount-root <DIR>", "let clients mount host directories under DIR (default: no mounts)")
    .option(
      "--pool <SNAPSHOT[:min=N,max=N,prestarted=N]>",
      "keep a pool of a snapshot's clones (repeatable)",
      collect,
      [],
    )
    .option(
      "--insecure-registry <HOST[:PORT]>",
      "registry reachable over plain HTTP for pulls (repeatable)",
      collect,
      [],
    )
    .option("--grace-period <DURATION>", "on SIGTERM, how long in-flight work may finish", "25s")
    .option("--require-kvm", "report not ready (/readyz) under TCG")
    .option("--server-id <NAME>", "this server's name in logs and /v1/info (default $HOSTNAME)")
    .option("--verbose", "debug log lines too")
    .action(
      action(async (flags) => {
        const { serveCommand } = await import("./serve.ts");
        return serveCommand(cli, flags, version);
      }),
    );

  program
    .command("doctor")
    .description("check this host: accelerator, QEMU, sandbox, guest assets, dirs")
    .option("--json", "print JSON")
    .action(
      action(async (flags) => {
        const { doctorCommand } = await import("./doctor.ts");
        return doctorCommand(cli, flags);
      }),
    );

  program
    .command("version")
    .description("print the version")
    .option("--json", "print JSON (with Node's version and platform)")
    .action(
      action(async (flags: { json?: boolean }) => {
        if (flags.json)
          cli.out(
            JSON.stringify({
              supermachine: version,
              node: process.versions.node,
              platform: `${process.platform}/${process.arch}`,
            }),
          );
        else cli.out(version);
        return 0;
      }),
    );

  return program;
}
