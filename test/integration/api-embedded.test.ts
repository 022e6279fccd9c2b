/** The API-level suite (test/helpers/api-suite.ts) against the embedded library. */
import { join } from "node:path";
import { Image } from "../../src/index.ts";
import { apiSuite } from "../helpers/api-suite.ts";
import { busyboxOci } from "../helpers/busybox-oci.ts";
import { scratchDir } from "../helpers/scratch.ts";

apiSuite("embedded", async () => {
  const dataDir = await scratchDir("sm-api-embedded-");
  const image = await Image.builder(`oci:${await busyboxOci(join(dataDir, "oci"))}`)
    .name("api-suite")
    .memoryMiB(256)
    .pullOptions({ dataDir })
    .build();
  return { image, close: () => image.close() };
});
