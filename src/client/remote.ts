/**
 * `supermachine/client`: the library's API over the wire. `connect(url, { token })` gives an
 * `Image` with the same static methods as the library's (`pull`, `fromSnapshot`, `builder`), and
 * everything from there has the library's methods and types — so moving from embedded to remote
 * is one changed line:
 *
 * ```ts
 * import { Image } from "supermachine";                         // embedded
 * const { Image } = connect("http://sm:7070", { token });       // remote
 * ```
 *
 * Several URLs (each server of a deployment, e.g. the addresses of a Kubernetes headless
 * Service): new work goes to the next server in turn, a VM stays on the server that holds it.
 */

import { RemoteError } from "../errors.ts";
import type { ImageRecord, SnapshotInfo } from "../index.ts";
import type { WireImage, WirePool, WireServerInfo } from "../wire/index.ts";
import { Cluster } from "./cluster.ts";
import { Endpoint } from "./endpoint.ts";
import { type RemoteImage, type RemoteImageBuilder, remoteImage, remoteImageBuilder } from "./image.ts";
import { type RemotePool, remotePool } from "./pool.ts";

export interface ConnectOptions {
  /** The server's bearer token (`serve --token-file`). */
  token?: string;
}

/** `Image` of a connection: the library's static methods, against the servers. */
export interface RemoteImages {
  /** Pull (and flatten) on every server; `start()` of the result boots it there. */
  pull(reference: string, options?: { platform?: string; signal?: AbortSignal }): Promise<RemoteImage>;
  /** A baked snapshot by name, on the servers that have it (checked against each host). */
  fromSnapshot(name: string, options?: { signal?: AbortSignal }): Promise<RemoteImage>;
  /** Bake on every server. */
  builder(reference: string): RemoteImageBuilder;
}

/** `Store` of a connection: what the first server that answers holds. */
export interface RemoteStore {
  images(): Promise<ImageRecord[]>;
  snapshots(): Promise<SnapshotInfo[]>;
}

/** A connection to one or more `supermachine serve` servers. */
export class Remote implements AsyncDisposable {
  readonly Image: RemoteImages;
  readonly Store: RemoteStore;
  readonly #cluster: Cluster;

  constructor(urls: string | readonly string[], options: ConnectOptions = {}) {
    const list = typeof urls === "string" ? [urls] : [...urls];
    if (list.length === 0)
      throw new RemoteError("SERVER_UNAVAILABLE", "connect() needs at least one server URL");
    const cluster = new Cluster(list.map((url) => new Endpoint(url, options.token)));
    this.#cluster = cluster;
    const all = cluster.endpoints;
    this.Image = {
      async pull(reference, opts = {}) {
        const made = await cluster.each(all, (endpoint) =>
          endpoint.json<WireImage>("POST", "/v1/images/pull", {
            json: { reference, ...(opts.platform === undefined ? {} : { platform: opts.platform }) },
            signal: opts.signal,
          }),
        );
        return remoteImage(
          cluster,
          made.map((m) => m.endpoint),
          made[0]!.value,
        );
      },
      async fromSnapshot(name, opts = {}) {
        const found = await cluster.each(all, (endpoint) =>
          endpoint.json<WireImage>("GET", `/v1/snapshots/${encodeURIComponent(name)}`, {
            signal: opts.signal,
          }),
        );
        return remoteImage(
          cluster,
          found.map((m) => m.endpoint),
          found[0]!.value,
        );
      },
      builder: (reference) => remoteImageBuilder(cluster, reference),
    };
    this.Store = {
      images: async () =>
        (await cluster.first(all, (e) => e.json<{ images: ImageRecord[] }>("GET", "/v1/images"))).images,
      snapshots: async () =>
        (await cluster.first(all, (e) => e.json<{ snapshots: SnapshotInfo[] }>("GET", "/v1/snapshots")))
          .snapshots,
    };
  }

  /** The servers, as given. */
  get endpoints(): readonly string[] {
    return this.#cluster.endpoints.map((e) => e.url);
  }

  /** A pool the servers keep themselves (`serve --pool NAME`), on the servers that have it. */
  async pool(name: string, options: { signal?: AbortSignal } = {}): Promise<RemotePool> {
    const found = await this.#cluster.each(this.#cluster.endpoints, (endpoint) =>
      endpoint.json<WirePool>("GET", `/v1/pools/${encodeURIComponent(name)}`, { signal: options.signal }),
    );
    return remotePool(
      this.#cluster,
      found.map(({ endpoint, value }) => ({ endpoint, id: value.id })),
      found[0]!.value,
      false,
    );
  }

  /** What each server that answers says about itself. */
  async info(): Promise<WireServerInfo[]> {
    const all = await this.#cluster.each(this.#cluster.endpoints, (e) =>
      e.json<WireServerInfo>("GET", "/v1/info"),
    );
    return all.map((a) => a.value);
  }

  /** Ends what this client made: its VMs stop, its leases go back, its pools close. */
  close(): Promise<void> {
    return this.#cluster.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** Connects to one server, or several (new work spread over them). Nothing is sent until the first call. */
export function connect(urls: string | readonly string[], options: ConnectOptions = {}): Remote {
  return new Remote(urls, options);
}
