/**
 * Files: `vm.fs` over HTTP. File contents are streamed both ways (`GET`/`PUT
 * /v1/vms/{id}/files?path=`), bounded by `--max-upload-bytes`; every other `vm.fs` call is one
 * JSON request (`POST /v1/vms/{id}/fs`); watches are a WebSocket of events.
 */

import { Transform, type TransformCallback } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { GuestDirent, GuestStats, GuestWatchEvent } from "../index.ts";
import { RemoteError } from "../index.ts";
import {
  CLOSE_NORMAL,
  FILE_GID_HEADER,
  FILE_MODE_HEADER,
  FILE_SIZE_HEADER,
  FILE_UID_HEADER,
  FS_OPS,
  type WireDirent,
  type WireStats,
} from "../wire/index.ts";
import { sendStreamError } from "./exec-routes.ts";
import { guestPath, invalid, queryCount, queryFlag, readJson, sendJson } from "./http.ts";
import type { RequestContext, StreamContext } from "./router.ts";
import { peerOf } from "./ws-peer.ts";

/** `GET /v1/vms/{id}/files?path=`: the file's bytes, streamed. */
export async function readFileRoute(ctx: RequestContext): Promise<void> {
  const path = guestPath(ctx.url.searchParams.get("path"));
  await ctx.core.holdings.using(ctx.params.id!, async (held) => {
    const file = await held.vm.readFileStream(path, { signal: ctx.signal });
    ctx.res.writeHead(200, {
      "content-type": "application/octet-stream",
      [FILE_SIZE_HEADER]: String(file.size),
      [FILE_MODE_HEADER]: String(file.mode),
      [FILE_UID_HEADER]: String(file.uid),
      [FILE_GID_HEADER]: String(file.gid),
    });
    await pipeline(file.stream, ctx.res);
  });
}

/** Counts bytes through, failing past `max`. */
function byteLimit(max: number): Transform {
  let seen = 0;
  return new Transform({
    transform(chunk: Buffer, _encoding, callback: TransformCallback) {
      seen += chunk.length;
      if (seen > max) {
        callback(
          new RemoteError(
            "LIMIT_EXCEEDED",
            `the upload is larger than this server's limit of ${max} bytes (--max-upload-bytes)`,
            {
              httpStatus: 413,
            },
          ),
        );
      } else callback(null, chunk);
    },
  });
}

/** `PUT /v1/vms/{id}/files?path=&mode=&mkdirs=`: the body becomes the file (atomically replaced). */
export async function writeFileRoute(ctx: RequestContext): Promise<void> {
  const { url, req, core } = ctx;
  const path = guestPath(url.searchParams.get("path"));
  const max = core.limits.maxUploadBytes;
  const declared =
    req.headers["content-length"] === undefined ? undefined : Number(req.headers["content-length"]);
  if (declared !== undefined && declared > max) {
    throw new RemoteError(
      "LIMIT_EXCEEDED",
      `the upload of ${declared} bytes is larger than this server's limit of ${max} bytes (--max-upload-bytes)`,
      {
        httpStatus: 413,
      },
    );
  }
  const mode = url.searchParams.get("mode");
  const size = queryCount(url, "size") ?? declared;
  if (size !== undefined && size > max) {
    throw new RemoteError(
      "LIMIT_EXCEEDED",
      `the upload of ${size} bytes is larger than this server's limit of ${max} bytes (--max-upload-bytes)`,
      {
        httpStatus: 413,
      },
    );
  }
  const uid = queryCount(url, "uid");
  const gid = queryCount(url, "gid");
  const options = {
    signal: ctx.signal,
    mkdirs: queryFlag(url, "mkdirs"),
    ...(mode === null ? {} : { mode: /^[0-7]{1,4}$/.test(mode) ? Number.parseInt(mode, 8) : -1 }),
    ...(size === undefined ? {} : { sizeBytes: size }),
    ...(uid === undefined ? {} : { uid }),
    ...(gid === undefined ? {} : { gid }),
  };
  if (options.mode !== undefined && !(options.mode >= 0 && options.mode <= 0o7777)) {
    throw invalid(`mode must be octal permission bits, got ${JSON.stringify(mode)}`);
  }
  await core.holdings.using(ctx.params.id!, async (held) => {
    const body = req.pipe(byteLimit(max));
    req.once("error", (error) => body.destroy(error));
    await held.vm.fs.writeFile(path, body, options);
  });
  ctx.res.writeHead(204).end();
}

export function statsToWire(stats: GuestStats): WireStats {
  return {
    dev: stats.dev,
    ino: stats.ino,
    mode: stats.mode,
    nlink: stats.nlink,
    uid: stats.uid,
    gid: stats.gid,
    rdev: stats.rdev,
    size: stats.size,
    blksize: stats.blksize,
    blocks: stats.blocks,
    atimeNs: String(stats.atimeNs),
    mtimeNs: String(stats.mtimeNs),
    ctimeNs: String(stats.ctimeNs),
  };
}

function direntToWire(entry: GuestDirent): WireDirent {
  return { name: entry.name, parentPath: entry.parentPath, type: entry.type };
}

const num = (body: Record<string, unknown>, name: string): number => {
  const value = body[name];
  if (typeof value !== "number" || !Number.isFinite(value)) throw invalid(`${name} must be a number`);
  return value;
};
const opt = (body: Record<string, unknown>, name: string): number | undefined =>
  body[name] === undefined ? undefined : num(body, name);

/** `POST /v1/vms/{id}/fs`: one `vm.fs` call; the answer is `{ result }`. */
export async function fsCallRoute(ctx: RequestContext): Promise<void> {
  const body = await readJson(ctx.req, ctx.core.limits.maxBodyBytes);
  const op = body.op;
  if (typeof op !== "string" || !(FS_OPS as readonly string[]).includes(op)) {
    throw invalid(`op must be one of ${FS_OPS.join(", ")}`);
  }
  const path = guestPath(body.path);
  const call = { signal: ctx.signal };
  const result = await ctx.core.holdings.using(ctx.params.id!, async ({ vm }): Promise<unknown> => {
    const fs = vm.fs;
    switch (op) {
      case "stat":
        return statsToWire(await fs.stat(path, call));
      case "lstat":
        return statsToWire(await fs.lstat(path, call));
      case "readlink":
        return fs.readlink(path, call);
      case "realpath":
        return fs.realpath(path, call);
      case "exists":
        return fs.exists(path, call);
      case "readdir":
        return body.withFileTypes === true
          ? (await fs.readdir(path, { ...call, withFileTypes: true })).map(direntToWire)
          : fs.readdir(path, call);
      case "mkdir":
        return (
          (await fs.mkdir(path, {
            ...call,
            recursive: body.recursive === true,
            ...(body.mode === undefined ? {} : { mode: num(body, "mode") }),
          })) ?? null
        );
      case "rm":
        return fs.rm(path, { ...call, recursive: body.recursive === true, force: body.force === true });
      case "rename":
        return fs.rename(path, guestPath(body.newPath, "newPath"), call);
      case "chmod":
        return fs.chmod(path, typeof body.mode === "string" ? body.mode : num(body, "mode"), call);
      case "chown":
        return fs.chown(path, num(body, "uid"), num(body, "gid"), call);
      case "lchown":
        return fs.lchown(path, num(body, "uid"), num(body, "gid"), call);
      case "symlink":
        if (typeof body.target !== "string") throw invalid("target must be a string");
        return fs.symlink(body.target, path, call);
      case "truncate":
        return fs.truncate(path, opt(body, "length"), call);
      case "utimes":
        return fs.utimes(path, num(body, "atime"), num(body, "mtime"), call);
      case "lutimes":
        return fs.lutimes(path, num(body, "atime"), num(body, "mtime"), call);
      case "access":
        return fs.access(path, opt(body, "mode"), call);
    }
    return undefined;
  });
  sendJson(ctx.res, 200, { result: result ?? null });
}

/** Most bytes of events a watch buffers for a client that does not read them: then `overflow`. */
const WATCH_BUFFER_BYTES = 1024 * 1024;

/** `WS /v1/vms/{id}/fs/watch?path=&recursive=`: `{ type: "event", event }` messages. */
export async function watchStream(ctx: StreamContext): Promise<void> {
  const { ws, core, url } = ctx;
  const peer = peerOf(ws, {
    control: () => {
      throw invalid("a watch takes no messages");
    },
    data: () => {
      throw invalid("a watch takes no data");
    },
  });
  await core.holdings.using(ctx.params.id!, async (held) => {
    const path = guestPath(url.searchParams.get("path"));
    const watcher = held.vm.fs.watch(path, { recursive: queryFlag(url, "recursive"), signal: ctx.signal });
    void peer.ended.then(() => watcher.close());
    try {
      await watcher.ready;
      peer.sendControl({ type: "ready" });
      for await (const event of watcher as AsyncIterable<GuestWatchEvent>) {
        if (peer.isEnded) break;
        if (ws.bufferedAmount > WATCH_BUFFER_BYTES) {
          peer.sendControl({
            type: "event",
            event: { eventType: "overflow", filename: null, isDirectory: false },
          });
          break;
        }
        peer.sendControl({ type: "event", event });
      }
      peer.close(CLOSE_NORMAL, "watch ended");
    } catch (error) {
      if (!peer.isEnded) sendStreamError(peer, core, error);
    } finally {
      watcher.close();
    }
  });
}
