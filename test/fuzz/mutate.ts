/**
 * Structure-aware mutations of a valid qcow2 image: the seed's layout is parsed once (header, L1
 * and L2 tables of the active image and of snapshots, compressed descriptors, refcount table and
 * blocks, snapshot table, header extensions), then 1–3 targeted mutations are applied to a copy:
 * header fields, L1/L2 entries, compressed descriptors, refcount table and block entries, snapshot
 * table fields, raw bytes of metadata clusters, truncation — with values chosen to hit the checks
 * (offsets of other metadata, unaligned, past the end of the file, reserved bits, flags, extremes).
 */
import type { FuzzRng } from './prng.js';

const OFFSET_MASK = 0x00fffffffffffe00n;
const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;

export interface SeedInfo {
  fileBytes: number;
  clusterSize: number;
  clusterBits: number;
  version: number;
  l2EntryBytes: number;
  l1Offset: number;
  l1Entries: number;
  reftableOffset: number;
  reftableEntries: number;
  refblocks: number[];
  /** L2 tables of the active image and the snapshots. */
  l2Tables: number[];
  /** Byte positions of non-zero L2 entries (first word), standard and compressed. */
  l2Entries: number[];
  compressedEntries: number[];
  snapshotsOffset: number;
  /** Byte positions of snapshot table entries, and their L1 tables. */
  snapshotEntries: number[];
  snapshotL1s: { offset: number; entries: number }[];
  /** Host offsets of metadata clusters and of data clusters (targets for pointers). */
  metadataOffsets: number[];
  dataOffsets: number[];
}

function u64(buf: Buffer, pos: number): bigint {
  return pos + 8 <= buf.length ? buf.readBigUInt64BE(pos) : 0n;
}

/** Parse the layout of a valid seed image. */
export function parseSeed(image: Buffer): SeedInfo {
  const clusterBits = image.readUInt32BE(20);
  const clusterSize = 2 ** clusterBits;
  const version = image.readUInt32BE(4);
  const incompatible = version >= 3 ? image.readBigUInt64BE(72) : 0n;
  const l2EntryBytes = (incompatible & 0x10n) !== 0n ? 16 : 8;
  const info: SeedInfo = {
    fileBytes: image.length,
    clusterSize,
    clusterBits,
    version,
    l2EntryBytes,
    l1Offset: Number(image.readBigUInt64BE(40)),
    l1Entries: image.readUInt32BE(36),
    reftableOffset: Number(image.readBigUInt64BE(48)),
    reftableEntries: (image.readUInt32BE(56) * clusterSize) / 8,
    refblocks: [],
    l2Tables: [],
    l2Entries: [],
    compressedEntries: [],
    snapshotsOffset: Number(image.readBigUInt64BE(64)),
    snapshotEntries: [],
    snapshotL1s: [],
    metadataOffsets: [0],
    dataOffsets: [],
  };
  for (let i = 0; i < info.reftableEntries; i++) {
    const block = Number(u64(image, info.reftableOffset + i * 8));
    if (block !== 0) info.refblocks.push(block);
  }
  let pos = info.snapshotsOffset;
  for (let i = 0; i < image.readUInt32BE(60) && pos + 40 <= image.length; i++) {
    info.snapshotEntries.push(pos);
    info.snapshotL1s.push({ offset: Number(u64(image, pos)), entries: image.readUInt32BE(pos + 8) });
    const bytes = 40 + image.readUInt32BE(pos + 36) + image.readUInt16BE(pos + 12) + image.readUInt16BE(pos + 14);
    pos += Math.ceil(bytes / 8) * 8;
  }
  const l1s = [{ offset: info.l1Offset, entries: info.l1Entries }, ...info.snapshotL1s];
  const tables = new Set<number>();
  for (const l1 of l1s) {
    for (let i = 0; i < l1.entries; i++) {
      const l2 = Number(u64(image, l1.offset + i * 8) & OFFSET_MASK);
      if (l2 !== 0) tables.add(l2);
    }
  }
  info.l2Tables = [...tables];
  const cShift = BigInt(62 - (clusterBits - 8));
  for (const table of info.l2Tables) {
    for (let j = 0; j < clusterSize / l2EntryBytes; j++) {
      const at = table + j * l2EntryBytes;
      const e = u64(image, at);
      if (e === 0n) continue;
      info.l2Entries.push(at);
      if ((e & COMPRESSED) !== 0n) {
        info.compressedEntries.push(at);
        info.dataOffsets.push(Number(e & ((1n << cShift) - 1n)));
      } else if ((e & OFFSET_MASK) !== 0n) {
        info.dataOffsets.push(Number(e & OFFSET_MASK));
      }
    }
  }
  info.metadataOffsets.push(info.l1Offset, info.reftableOffset, ...info.refblocks, ...info.l2Tables, ...info.snapshotL1s.map((s) => s.offset));
  if (info.snapshotEntries.length > 0) info.metadataOffsets.push(info.snapshotsOffset);
  return info;
}

/** Offsets worth pointing a table entry at. */
function pickOffset(rng: FuzzRng, info: SeedInfo): bigint {
  const cs = info.clusterSize;
  switch (rng.int(9)) {
    case 0: return BigInt(rng.pick(info.metadataOffsets));
    case 1: return info.dataOffsets.length > 0 ? BigInt(rng.pick(info.dataOffsets)) : 0n;
    case 2: return BigInt(Math.ceil(info.fileBytes / cs) * cs + cs * rng.int(4));
    case 3: return BigInt(rng.int(Math.ceil(info.fileBytes / cs) + 2) * cs + 512 * (1 + rng.int(3)));
    case 4: return BigInt(rng.int(Math.ceil(info.fileBytes / cs) + 2)) * BigInt(cs);
    case 5: return (rng.u64() & OFFSET_MASK);
    case 6: return 1n << BigInt(40 + rng.int(16));
    case 7: return 0n;
    default: return BigInt(rng.pick(info.metadataOffsets)) + 512n * BigInt(1 + rng.int(8));
  }
}

/** Interesting 64-bit values for a header field of `bytes` bytes. */
function pickValue(rng: FuzzRng, info: SeedInfo, current: bigint, bytes: number): bigint {
  const max = bytes === 8 ? 0xffffffffffffffffn : (1n << BigInt(bytes * 8)) - 1n;
  let v: bigint;
  switch (rng.int(10)) {
    case 0: v = 0n; break;
    case 1: v = max; break;
    case 2: v = current ^ (1n << BigInt(rng.int(bytes * 8))); break;
    case 3: v = current + BigInt(rng.int(5)) - 2n; break;
    case 4: v = pickOffset(rng, info); break;
    case 5: v = 1n << BigInt(rng.int(bytes * 8)); break;
    case 6: v = current * 2n + 1n; break;
    case 7: v = BigInt(rng.int(64)); break;
    case 8: v = current + BigInt(info.clusterSize) * BigInt(rng.int(5) - 2); break;
    default: v = rng.u64();
  }
  return ((v % (max + 1n)) + (max + 1n)) % (max + 1n);
}

function write(image: Buffer, pos: number, bytes: number, value: bigint): boolean {
  if (pos < 0 || pos + bytes > image.length) return false;
  for (let i = bytes - 1; i >= 0; i--) {
    image[pos + i] = Number(value & 0xffn);
    value >>= 8n;
  }
  return true;
}

function read(image: Buffer, pos: number, bytes: number): bigint {
  let v = 0n;
  for (let i = 0; i < bytes && pos + i < image.length; i++) v = (v << 8n) | BigInt(image[pos + i]);
  return v;
}

const HEADER_FIELDS: [string, number, number][] = [
  ['version', 4, 4], ['backing_file_offset', 8, 8], ['backing_file_size', 16, 4], ['cluster_bits', 20, 4], ['size', 24, 8],
  ['crypt_method', 32, 4], ['l1_size', 36, 4], ['l1_table_offset', 40, 8], ['refcount_table_offset', 48, 8],
  ['refcount_table_clusters', 56, 4], ['nb_snapshots', 60, 4], ['snapshots_offset', 64, 8], ['incompatible_features', 72, 8],
  ['compatible_features', 80, 8], ['autoclear_features', 88, 8], ['refcount_order', 96, 4], ['header_length', 100, 4],
  ['compression_type', 104, 1],
];

type Mutator = (image: Buffer, info: SeedInfo, rng: FuzzRng) => string | undefined;

/** Set an entry (8 bytes at `pos`) to a pointer-ish value, keeping or changing its flags. */
function mutateEntry(image: Buffer, pos: number, info: SeedInfo, rng: FuzzRng): string {
  const old = read(image, pos, 8);
  let v: bigint;
  switch (rng.int(8)) {
    case 0: v = old ^ COPIED; break;
    case 1: v = old ^ COMPRESSED; break;
    case 2: v = old ^ 1n; break;
    case 3: v = old | (1n << BigInt(1 + rng.int(8))) | (1n << BigInt(56 + rng.int(6))); break;
    case 4: v = (old & ~OFFSET_MASK) | (pickOffset(rng, info) & OFFSET_MASK); break;
    case 5: v = old + 512n * BigInt(1 + rng.int(4)); break;
    case 6: v = rng.u64(); break;
    default: v = COPIED | pickOffset(rng, info);
  }
  write(image, pos, 8, v);
  return `entry@${pos}: 0x${old.toString(16)} -> 0x${v.toString(16)}`;
}

const MUTATORS: [number, string, Mutator][] = [
  [4, 'header field', (image, info, rng) => {
    const [name, pos, bytes] = rng.pick(HEADER_FIELDS);
    if (info.version < 3 && pos >= 72) return undefined;
    const old = read(image, pos, bytes);
    const v = pickValue(rng, info, old, bytes);
    write(image, pos, bytes, v);
    return `header ${name}: ${old} -> ${v}`;
  }],
  [1, 'header extension bytes', (image, info, rng) => {
    const start = info.version >= 3 ? 104 : 72;
    const pos = start + rng.int(Math.min(info.clusterSize, 1024) - start);
    const old = image[pos];
    image[pos] = rng.chance(0.5) ? old ^ (1 << rng.int(8)) : rng.int(256);
    return `header byte ${pos}: ${old} -> ${image[pos]}`;
  }],
  [4, 'L1 entry', (image, info, rng) => {
    const l1 = rng.chance(0.8) || info.snapshotL1s.length === 0 ? { offset: info.l1Offset, entries: info.l1Entries } : rng.pick(info.snapshotL1s);
    if (l1.entries === 0) return undefined;
    return `L1 ${mutateEntry(image, l1.offset + 8 * rng.int(Math.min(l1.entries, 8)), info, rng)}`;
  }],
  [6, 'L2 entry', (image, info, rng) => {
    if (info.l2Entries.length === 0) return undefined;
    const pos = rng.chance(0.8) ? rng.pick(info.l2Entries) : rng.pick(info.l2Tables) + info.l2EntryBytes * rng.int(info.clusterSize / info.l2EntryBytes);
    if (info.l2EntryBytes === 16 && rng.chance(0.3)) {
      const old = read(image, pos + 8, 8);
      const v = rng.chance(0.5) ? rng.u64() : old ^ (1n << BigInt(rng.int(64)));
      write(image, pos + 8, 8, v);
      return `L2 bitmap@${pos + 8}: 0x${old.toString(16)} -> 0x${v.toString(16)}`;
    }
    return `L2 ${mutateEntry(image, pos, info, rng)}`;
  }],
  [4, 'compressed descriptor', (image, info, rng) => {
    if (info.compressedEntries.length === 0) return undefined;
    const pos = rng.pick(info.compressedEntries);
    const old = read(image, pos, 8);
    const shift = BigInt(62 - (info.clusterBits - 8));
    const offsetMask = (1n << shift) - 1n;
    const sectorMask = ((1n << BigInt(info.clusterBits - 8)) - 1n) << shift;
    let v: bigint;
    switch (rng.int(5)) {
      case 0: v = (old & ~sectorMask) | (BigInt(rng.int(2 ** (info.clusterBits - 8))) << shift); break;
      case 1: v = (old & ~offsetMask) | ((old & offsetMask) + BigInt(rng.int(4 * info.clusterSize)) - BigInt(info.clusterSize)); break;
      case 2: v = (old & ~offsetMask) | (pickOffset(rng, info) & offsetMask); break;
      case 3: v = old | sectorMask; break;
      default: v = (old & ~offsetMask) | (BigInt(info.fileBytes - rng.int(256)) & offsetMask);
    }
    write(image, pos, 8, v);
    return `compressed@${pos}: 0x${old.toString(16)} -> 0x${v.toString(16)}`;
  }],
  [3, 'refcount table entry', (image, info, rng) => {
    const index = rng.chance(0.7) ? 0 : rng.int(Math.min(info.reftableEntries, 16));
    const pos = info.reftableOffset + index * 8;
    const old = read(image, pos, 8);
    const v = rng.chance(0.2) ? old | BigInt(1 + rng.int(0x1ff)) : pickOffset(rng, info);
    write(image, pos, 8, v);
    return `reftable[${index}]: 0x${old.toString(16)} -> 0x${v.toString(16)}`;
  }],
  [4, 'refcount block entry', (image, info, rng) => {
    if (info.refblocks.length === 0) return undefined;
    const block = rng.pick(info.refblocks);
    const pos = block + rng.int(Math.min(info.clusterSize, Math.max(8, Math.ceil(info.fileBytes / info.clusterSize) * 8)));
    if (pos >= image.length) return undefined;
    const old = image[pos];
    image[pos] = rng.pick([0, 1, 2, 0xff, old ^ (1 << rng.int(8)), rng.int(256)]);
    return `refblock byte ${pos}: ${old} -> ${image[pos]}`;
  }],
  [3, 'snapshot table field', (image, info, rng) => {
    if (info.snapshotEntries.length === 0) return undefined;
    const entry = rng.pick(info.snapshotEntries);
    const [name, rel, bytes] = rng.pick<[string, number, number]>([
      ['l1_table_offset', 0, 8], ['l1_size', 8, 4], ['id_str_size', 12, 2], ['name_size', 14, 2], ['vm_state_size', 32, 4],
      ['extra_data_size', 36, 4], ['extra vm_state_size', 40, 8], ['extra disk_size', 48, 8], ['extra icount', 56, 8],
    ]);
    const old = read(image, entry + rel, bytes);
    const v = pickValue(rng, info, old, bytes);
    write(image, entry + rel, bytes, v);
    return `snapshot@${entry} ${name}: ${old} -> ${v}`;
  }],
  [2, 'snapshot L1 entry', (image, info, rng) => {
    const l1 = info.snapshotL1s.find((s) => s.entries > 0);
    if (!l1) return undefined;
    return `snapshot L1 ${mutateEntry(image, l1.offset + 8 * rng.int(Math.min(l1.entries, 8)), info, rng)}`;
  }],
  [2, 'metadata cluster bytes', (image, info, rng) => {
    const cluster = rng.pick(info.metadataOffsets);
    const flips = 1 + rng.int(8);
    for (let i = 0; i < flips; i++) {
      const pos = cluster + rng.int(Math.min(info.clusterSize, 4096));
      if (pos < image.length) image[pos] = rng.int(256);
    }
    return `${flips} random bytes in metadata cluster ${cluster}`;
  }],
  [1, 'dirty bit', (image, info) => {
    if (info.version < 3) return undefined;
    image[79] = image[79] | 0x01;
    return 'dirty bit set';
  }],
];

const TOTAL_WEIGHT = MUTATORS.reduce((n, [w]) => n + w, 0);

/**
 * Mutate a copy of `seed` (1–3 mutations; sometimes the dirty bit too, so a writable open runs the
 * repair, and sometimes a truncation). Returns the bytes and what was done.
 */
export function mutate(seed: Buffer, info: SeedInfo, rng: FuzzRng): { image: Buffer; description: string[] } {
  let image = Buffer.from(seed);
  const description: string[] = [];
  const count = 1 + rng.int(3);
  for (let attempts = 0; description.length < count && attempts < 50; attempts++) {
    let pick = rng.int(TOTAL_WEIGHT);
    let i = 0;
    while (pick >= MUTATORS[i][0]) pick -= MUTATORS[i++][0];
    const done = MUTATORS[i][2](image, info, rng);
    if (done !== undefined) description.push(done);
  }
  if (info.version >= 3 && rng.chance(0.15)) {
    image[79] = image[79] | 0x01;
    description.push('dirty bit set');
  }
  if (rng.chance(0.05)) {
    const bytes = rng.int(image.length);
    image = image.subarray(0, bytes);
    description.push(`truncated to ${bytes} bytes`);
  }
  return { image, description };
}
