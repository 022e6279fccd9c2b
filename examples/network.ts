import { createServer, type Server } from "node:http";
import { Vm } from "supermachine";

const rootfs = process.argv[2] ?? "/path/to/rootfs";

// Two services on the host's loopback: the VM may reach the first one only.
const serve = (body: string) =>
  new Promise<Server>((resolve) => {
    const server = createServer((_, res) => res.end(body));
    server.listen(0, "127.0.0.1", () => resolve(server));
  });
const api = await serve("hello from the host\n");
const admin = await serve("secret\n");
const portOf = (server: Server) => (server.address() as { port: number }).port;

try {
  // The default is network "none": no network device at all.
  await using vm = await Vm.start({
    rootfs,
    memoryMiB: 256,
    network: { allow: [`host:${portOf(api)}`] }, // the host's loopback port, at 10.0.2.2 in the guest
  });
  const get = (server: Server) =>
    vm.exec(["wget", "-q", "-O-", `http://10.0.2.2:${portOf(server)}/`], { reject: false });
  process.stdout.write((await get(api)).stdoutText); // hello from the host
  console.log((await get(admin)).ok ? "admin reached" : "admin refused"); // admin refused
} finally {
  api.close();
  admin.close();
}
