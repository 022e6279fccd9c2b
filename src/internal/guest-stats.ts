/**
 * `fs.Stats` and `fs.Dirent` of guest files, one class each for the library (which decodes them
 * from the agent's frames) and the client (which parses them from a server's JSON): each edge
 * turns what it received into the plain record these classes are made from.
 */

const S_IFMT = 0o170000;

/** Milliseconds from nanoseconds the way Node computes `Stats` times (seconds, then the rest). */
function msFromNs(ns: bigint): number {
  return Number(ns / 1_000_000_000n) * 1000 + Number(ns % 1_000_000_000n) / 1e6;
}

/** What a {@link GuestStats} is made from: `stat(2)`'s fields, times in nanoseconds. */
export interface GuestStatsInit {
  dev: number;
  ino: number;
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  rdev: number;
  size: number;
  blksize: number;
  blocks: number;
  atimeNs: bigint;
  mtimeNs: bigint;
  ctimeNs: bigint;
}

let makeStats: (init: GuestStatsInit) => GuestStats;

/** The {@link GuestStats} of a guest file's `stat(2)` fields. */
export function guestStats(init: GuestStatsInit): GuestStats {
  return makeStats(init);
}

/** `fs.Stats` of a guest file (without `birthtime`, which the guest does not report). */
export class GuestStats {
  readonly dev: number;
  readonly ino: number;
  readonly mode: number;
  readonly nlink: number;
  readonly uid: number;
  readonly gid: number;
  readonly rdev: number;
  readonly size: number;
  readonly blksize: number;
  readonly blocks: number;
  readonly atimeMs: number;
  readonly mtimeMs: number;
  readonly ctimeMs: number;
  /** Nanosecond timestamps, exact. */
  readonly atimeNs: bigint;
  readonly mtimeNs: bigint;
  readonly ctimeNs: bigint;

  static {
    makeStats = (init) => new GuestStats(init);
  }

  private constructor(init: GuestStatsInit) {
    this.dev = init.dev;
    this.ino = init.ino;
    this.mode = init.mode;
    this.nlink = init.nlink;
    this.uid = init.uid;
    this.gid = init.gid;
    this.rdev = init.rdev;
    this.size = init.size;
    this.blksize = init.blksize;
    this.blocks = init.blocks;
    this.atimeNs = init.atimeNs;
    this.mtimeNs = init.mtimeNs;
    this.ctimeNs = init.ctimeNs;
    this.atimeMs = msFromNs(init.atimeNs);
    this.mtimeMs = msFromNs(init.mtimeNs);
    this.ctimeMs = msFromNs(init.ctimeNs);
  }

  get atime(): Date {
    return new Date(Math.round(this.atimeMs));
  }
  get mtime(): Date {
    return new Date(Math.round(this.mtimeMs));
  }
  get ctime(): Date {
    return new Date(Math.round(this.ctimeMs));
  }
  isFile(): boolean {
    return (this.mode & S_IFMT) === 0o100000;
  }
  isDirectory(): boolean {
    return (this.mode & S_IFMT) === 0o040000;
  }
  isSymbolicLink(): boolean {
    return (this.mode & S_IFMT) === 0o120000;
  }
  isBlockDevice(): boolean {
    return (this.mode & S_IFMT) === 0o060000;
  }
  isCharacterDevice(): boolean {
    return (this.mode & S_IFMT) === 0o020000;
  }
  isFIFO(): boolean {
    return (this.mode & S_IFMT) === 0o010000;
  }
  isSocket(): boolean {
    return (this.mode & S_IFMT) === 0o140000;
  }
}

/** `fs.Dirent` of a guest directory entry. */
export class GuestDirent {
  readonly name: string;
  /** The directory listed. */
  readonly parentPath: string;
  /** `d_type`: the `S_IFMT` bits >> 12 (8 file, 4 directory, 10 symlink, ...), 0 if unknown. */
  readonly type: number;

  constructor(name: string, parentPath: string, type: number) {
    this.name = name;
    this.parentPath = parentPath;
    this.type = type;
  }

  isFile(): boolean {
    return this.type === 8;
  }
  isDirectory(): boolean {
    return this.type === 4;
  }
  isSymbolicLink(): boolean {
    return this.type === 10;
  }
  isBlockDevice(): boolean {
    return this.type === 6;
  }
  isCharacterDevice(): boolean {
    return this.type === 2;
  }
  isFIFO(): boolean {
    return this.type === 1;
  }
  isSocket(): boolean {
    return this.type === 12;
  }
}
