/**
 * CRC-32C (Castagnoli), reflected, as ext4 and jbd2 use it: `crc32c(seed, data)` continues from
 * `seed` and applies no final inversion (callers start from `~0` where the format says so).
 * Slicing-by-8 tables: a few hundred MB/s in plain JavaScript, plenty for file-system metadata.
 */
const POLY = 0x82f63b78;
const TABLES: Uint32Array[] = [];
{
  const t0 = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ POLY : c >>> 1;
    t0[i] = c >>> 0;
  }
  TABLES.push(t0);
  for (let t = 1; t < 8; t++) {
    const prev = TABLES[t - 1]!;
    const next = new Uint32Array(256);
    for (let i = 0; i < 256; i++) next[i] = (prev[i]! >>> 8) ^ t0[prev[i]! & 0xff]!;
    TABLES.push(next);
  }
}
const [T0, T1, T2, T3, T4, T5, T6, T7] = TABLES as [
  Uint32Array,
  Uint32Array,
  Uint32Array,
  Uint32Array,
  Uint32Array,
  Uint32Array,
  Uint32Array,
  Uint32Array,
];

export function crc32c(seed: number, data: Uint8Array, start = 0, end = data.length): number {
  let crc = seed >>> 0;
  let i = start;
  const stop8 = end - ((end - i) & 7);
  while (i < stop8) {
    const a = (crc ^ (data[i]! | (data[i + 1]! << 8) | (data[i + 2]! << 16) | (data[i + 3]! << 24))) >>> 0;
    crc =
      T7[a & 0xff]! ^
      T6[(a >>> 8) & 0xff]! ^
      T5[(a >>> 16) & 0xff]! ^
      T4[a >>> 24]! ^
      T3[data[i + 4]!]! ^
      T2[data[i + 5]!]! ^
      T1[data[i + 6]!]! ^
      T0[data[i + 7]!]!;
    i += 8;
  }
  while (i < end) crc = (crc >>> 8) ^ T0[(crc ^ data[i++]!) & 0xff]!;
  return crc >>> 0;
}

const U32 = Buffer.alloc(4);

/** crc32c over a little-endian u32. */
export function crc32cU32(seed: number, value: number): number {
  U32.writeUInt32LE(value >>> 0, 0);
  return crc32c(seed, U32);
}
