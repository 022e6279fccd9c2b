/**
 * The API-level suite (test/helpers/api-suite.ts) against `supermachine serve` on loopback,
 * through `supermachine/client`: the same checks as the embedded run, over HTTP and WebSocket.
 */
import { join } from "node:path";
import { connect } from "../../src/client/index.ts";
import { startServer } from "../../src/server/index.ts";
import { apiSuite } from "../helpers/api-suite.ts";
import { busyboxOci } from "../helpers/busybox-oci.ts";
import { scratchDir } from "../helpers/scratch.ts";

apiSuite("remote", async () => {
  const dataDir = await scratchDir("sm-api-remote-");
  const token = "remote-suite-token-0123456789";
  const server = await startServer({ port: 0, token, dataDir });
  const remote = connect(server.url, { token });
  const image = await remote.Image.builder(`oci:${await busyboxOci(join(dataDir, "oci"))}`)
    .name("api-suite")
    .memoryMiB(256)
    .build();
  return {
    image,
    close: async () => {
      await remote.close();
      await server.close();
    },
  };
});
