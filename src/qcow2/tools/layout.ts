/**
 * What every host cluster of the image file holds (layout.txt in the mount): header, L1, L2,
 * refcount table/blocks, snapshot table and L1s, bitmap directory, data (with the guest offset it
 * serves), compressed chunks, clusters with a refcount nothing refers to, free space.
 *
 * Streamed in host order, consecutive clusters of the same kind merged into one entry. Memory stays
 * bounded for huge images: host space is classified in windows of `windowClusters` clusters (every
 * table is re-read per window; one window covers 64 GiB of 64 KiB clusters by default). Tables are
 * read from the file after the image's caches are written back; a live image may change between
 * windows; with internal snapshots, compressed chunks are counted once through a set of their offsets.
 * Hostile offsets (past the end of the file, unaligned) are ignored, never followed.
 */
import type { LayoutEntry } from '../engine/block-device.js';
import { nextNonZeroEntry } from '../format/table-scan.js';
import { imageState, type Qcow2Image } from '../engine/image.js';
import type { ImageState } from '../engine/state.js';
import { clusterKind, compressedClusterRange, decodeCompressed, entryOffset, l2HostOffset, readL2Entry } from '../format/l2-entry.js';
import { getRefcount } from '../format/refcount-block.js';

export interface LayoutOptions {
  /** Host clusters classified per pass (memory: about 12 bytes per cluster); default 2^20. */
  windowClusters?: number;
}

type Kind = LayoutEntry['kind'];

/** Cluster classes in a window; 0 = not (yet) known to be referenced. */
const KINDS: Kind[] = ['free', 'header', 'l1', 'l2', 'reftable', 'refblock', 'snapshot-table', 'snapshot-l1', 'data', 'compressed', 'extension', 'unknown'];
const CODE = Object.fromEntries(KINDS.map((k, i) => [k, i])) as Record<Kind, number>;
const DEFAULT_WINDOW_CLUSTERS = 1 << 20;

/** The structures the layout is drawn from, taken under the image's lock. */
interface Structures {
  fileBytes: number;
  l1Offset: number;
  l1Entries: number;
  l1: Buffer;
  reftableOffset: number;
  reftableClusters: number;
  reftable: number[];
  snapshots: { l1Offset: number; l1Entries: number }[];
  snapshotsOffset: number;
  snapshotTableBytes: number;
  bitmapDirectory?: { offset: number; bytes: number };
}

/** One window's classification. */
class Window {
  readonly first: number;
  readonly count: number;
  readonly kind: Uint8Array;
  /** A second kind claiming the same cluster (corrupt images), 0 when none. */
  readonly also: Uint8Array;
  readonly guest: Float64Array;
  readonly chunks: Uint16Array;
  /** 1 when the cluster is reachable only from a snapshot. */
  readonly snapshotOnly: Uint8Array;

  constructor(first: number, count: number) {
    this.first = first;
    this.count = count;
    this.kind = new Uint8Array(count);
    this.also = new Uint8Array(count);
    this.guest = new Float64Array(count).fill(-1);
    this.chunks = new Uint16Array(count);
    this.snapshotOnly = new Uint8Array(count);
  }

  /** Claim the clusters of [hostOffset, +bytes) that fall in this window for `kind`. */
  mark(clusterSize: number, kind: Kind, hostOffset: number, bytes: number, guestOffset = -1, snapshot = false): void {
    if (bytes <= 0 || hostOffset < 0 || !Number.isSafeInteger(hostOffset)) return;
    const code = CODE[kind];
    const firstCluster = Math.max(this.first, Math.floor(hostOffset / clusterSize));
    const lastCluster = Math.min(this.first + this.count - 1, Math.floor((hostOffset + bytes - 1) / clusterSize));
    for (let c = firstCluster; c <= lastCluster; c++) {
      const i = c - this.first;
      const current = this.kind[i];
      if (current === 0) {
        this.kind[i] = code;
        this.guest[i] = guestOffset;
        this.snapshotOnly[i] = snapshot ? 1 : 0;
      } else if (current === code && kind === 'compressed') {
        if (guestOffset >= 0 && (this.guest[i] < 0 || guestOffset < this.guest[i])) this.guest[i] = guestOffset;
      } else if (current !== code && this.also[i] === 0) {
        this.also[i] = code;
      }
      if (kind === 'compressed' && this.kind[i] === code && this.chunks[i] < 0xffff) this.chunks[i]++;
    }
  }
}

async function readStructures(image: ImageState): Promise<Structures> {
  return image.lock.run(async () => {
    if (!image.file.readOnly) {
      await image.l2Cache.flush();
      await image.refcountCache.flush();
    }
    const l1 = image.activeMap.l1;
    const bitmaps = image.header.bitmaps;
    return {
      fileBytes: await image.file.size(),
      l1Offset: l1.offset,
      l1Entries: l1.entries,
      l1: Buffer.from(l1.buf.subarray(0, l1.entries * 8)),
      reftableOffset: image.refcounts.reftableOffset,
      reftableClusters: image.refcounts.reftableClusters,
      reftable: image.refcounts.reftable.slice(),
      snapshots: image.snapshots.map((s) => ({ l1Offset: s.l1TableOffset, l1Entries: s.l1Entries })),
      snapshotsOffset: image.header.snapshotsOffset,
      snapshotTableBytes: image.snapshotTableBytes,
      ...(bitmaps && bitmaps.nbBitmaps > 0 ? { bitmapDirectory: { offset: bitmaps.directoryOffset, bytes: bitmaps.directoryBytes } } : {}),
    };
  });
}

/** Host bytes of the image file, zeros past its end or at offsets that cannot be read. */
async function readHost(image: ImageState, fileBytes: number, hostOffset: number, bytes: number): Promise<Buffer> {
  const buf = Buffer.alloc(bytes);
  if (!Number.isSafeInteger(hostOffset) || hostOffset < 0 || hostOffset >= fileBytes) return buf;
  const inFile = Math.min(bytes, fileBytes - hostOffset);
  let done = 0;
  while (done < inFile) {
    const n = await image.file.pread(buf.subarray(done, inFile), hostOffset + done);
    if (n <= 0) break;
    done += n;
  }
  return buf;
}

/** Offsets of the L2 tables an L1 table points to (with their L1 index), aligned, inside the file, each once. */
function l2Tables(l1: Buffer, entries: number, clusterSize: number, fileBytes: number): { l1Index: number; l2Offset: number }[] {
  const tables: { l1Index: number; l2Offset: number }[] = [];
  const seen = new Set<number>();
  for (let i = 0; i < entries; i++) {
    const l2Offset = entryOffset(l1.readUInt32BE(i * 8), l1.readUInt32BE(i * 8 + 4));
    if (l2Offset === 0 || l2Offset % clusterSize !== 0 || l2Offset >= fileBytes || seen.has(l2Offset)) continue;
    seen.add(l2Offset); // a table listed twice (corrupt) is drawn once, for its first index
    tables.push({ l1Index: i, l2Offset });
  }
  return tables;
}

/**
 * Classify the data and compressed clusters one L2 table refers to. `chunksSeen` (when snapshots
 * share chunks with the active table) makes each compressed chunk count once.
 */
function markL2Entries(image: ImageState, w: Window, table: Buffer, firstGuest: number, snapshot: boolean, chunksSeen: Set<number> | undefined): void {
  const g = image.geometry;
  for (let j = nextNonZeroEntry(table, 0, g.l2EntryBytes, g.l2Entries); j < g.l2Entries; j = nextNonZeroEntry(table, j + 1, g.l2EntryBytes, g.l2Entries)) {
    const e = readL2Entry(table, j, g);
    const kind = clusterKind(e, g, image.hasDataFile);
    const guestOffset = firstGuest + j * g.clusterSize;
    if (kind === 'compressed') {
      const descriptor = decodeCompressed(e, g);
      const range = compressedClusterRange(descriptor, g);
      if (range.firstHostCluster >= w.first + w.count || range.lastHostCluster < w.first) continue;
      if (chunksSeen) {
        if (chunksSeen.has(descriptor.hostOffset)) continue;
        chunksSeen.add(descriptor.hostOffset);
      }
      for (let c = range.firstHostCluster; c <= range.lastHostCluster; c++) w.mark(g.clusterSize, 'compressed', c * g.clusterSize, 1, guestOffset, snapshot);
    } else if ((kind === 'normal' || kind === 'zero-alloc') && !image.hasDataFile) {
      w.mark(g.clusterSize, 'data', l2HostOffset(e), g.clusterSize, guestOffset, snapshot);
    }
  }
}

/** Every host cluster of the image file, in host order, as merged runs. */
export async function* layout(qcow2: Qcow2Image, options: LayoutOptions = {}): AsyncIterable<LayoutEntry> {
  const image = imageState(qcow2);
  const g = image.geometry;
  const cs = g.clusterSize;
  const s = await readStructures(image);
  const nbClusters = Math.ceil(s.fileBytes / cs);
  const windowClusters = Math.max(1, Math.floor(options.windowClusters ?? DEFAULT_WINDOW_CLUSTERS));
  const activeTables = l2Tables(s.l1, s.l1Entries, cs, s.fileBytes);
  const activeSet = new Set(activeTables.map((t) => t.l2Offset));
  const snapshotL1s: Buffer[] = [];
  for (const snap of s.snapshots) {
    // Only the part inside the file can point anywhere (the rest reads as zeros).
    const inFile = !Number.isSafeInteger(snap.l1Offset) || snap.l1Offset >= s.fileBytes ? 0 : Math.ceil((s.fileBytes - snap.l1Offset) / 8);
    snapshotL1s.push(await readHost(image, s.fileBytes, snap.l1Offset, Math.min(snap.l1Entries, g.maxL1Entries, inFile) * 8));
  }
  let pending: LayoutEntry | undefined;
  for (let first = 0; first < nbClusters; first += windowClusters) {
    const w = new Window(first, Math.min(windowClusters, nbClusters - first));
    w.mark(cs, 'header', 0, cs);
    w.mark(cs, 'reftable', s.reftableOffset, s.reftableClusters * cs);
    for (const block of s.reftable) if (block > 0 && block % cs === 0) w.mark(cs, 'refblock', block, cs);
    w.mark(cs, 'l1', s.l1Offset, s.l1Entries * 8);
    w.mark(cs, 'snapshot-table', s.snapshotsOffset, s.snapshotTableBytes);
    s.snapshots.forEach((snap) => w.mark(cs, 'snapshot-l1', snap.l1Offset, snap.l1Entries * 8));
    if (s.bitmapDirectory) w.mark(cs, 'extension', s.bitmapDirectory.offset, s.bitmapDirectory.bytes);
    const chunksSeen = snapshotL1s.length > 0 ? new Set<number>() : undefined;
    for (const t of activeTables) {
      w.mark(cs, 'l2', t.l2Offset, cs);
      markL2Entries(image, w, await readHost(image, s.fileBytes, t.l2Offset, cs), t.l1Index * g.l2CoverageBytes, false, chunksSeen);
    }
    const seen = new Set<number>(activeSet);
    for (let k = 0; k < snapshotL1s.length; k++) {
      const l1 = snapshotL1s[k];
      for (const t of l2Tables(l1, l1.length / 8, cs, s.fileBytes)) {
        if (seen.has(t.l2Offset)) continue;
        seen.add(t.l2Offset);
        w.mark(cs, 'l2', t.l2Offset, cs, -1, true);
        markL2Entries(image, w, await readHost(image, s.fileBytes, t.l2Offset, cs), t.l1Index * g.l2CoverageBytes, true, chunksSeen);
      }
    }
    const refcounts = await windowRefcounts(image, s, w);
    for (let i = 0; i < w.count; i++) {
      const entry = clusterEntry(w, i, cs, s.fileBytes, refcounts[i]);
      if (pending && canMerge(pending, entry, cs)) {
        pending.bytes = entry.hostOffset + entry.bytes - pending.hostOffset;
        continue;
      }
      if (pending) yield pending;
      pending = entry;
    }
  }
  if (pending) yield pending;
}

/** On-disk refcounts of the window's clusters (read through the image's refcount cache). */
async function windowRefcounts(image: ImageState, s: Structures, w: Window): Promise<Float64Array> {
  const g = image.geometry;
  const out = new Float64Array(w.count);
  const firstBlock = g.reftableIndex(w.first);
  const lastBlock = g.reftableIndex(w.first + w.count - 1);
  for (let ri = firstBlock; ri <= lastBlock && ri < s.reftable.length; ri++) {
    const block = s.reftable[ri];
    if (block <= 0 || block % g.clusterSize !== 0) continue;
    await image.lock.run(async () => {
      const h = await image.refcountCache.get(block);
      try {
        const start = Math.max(w.first, ri * g.refblockEntries);
        const end = Math.min(w.first + w.count, (ri + 1) * g.refblockEntries);
        for (let c = start; c < end; c++) out[c - w.first] = getRefcount(h.buf, g.refblockIndex(c), g.refcountOrder);
      } finally {
        image.refcountCache.release(h);
      }
    });
  }
  return out;
}

function clusterEntry(w: Window, i: number, clusterSize: number, fileBytes: number, refcount: number): LayoutEntry {
  const hostOffset = (w.first + i) * clusterSize;
  const bytes = Math.min(clusterSize, fileBytes - hostOffset);
  let kind = KINDS[w.kind[i]];
  const notes: string[] = [];
  if (w.kind[i] === 0) {
    kind = refcount > 0 ? 'unknown' : 'free';
    if (refcount > 0) notes.push(`unreferenced, refcount ${refcount}`);
  }
  if (kind === 'compressed') notes.push(`${w.chunks[i]} chunk${w.chunks[i] === 1 ? '' : 's'}`);
  if (kind === 'extension') notes.push('bitmap directory');
  if (w.snapshotOnly[i] === 1) notes.push('snapshot');
  if (w.also[i] !== 0) notes.push(`also ${KINDS[w.also[i]]}`);
  const entry: LayoutEntry = { hostOffset, bytes, kind };
  if (w.guest[i] >= 0) entry.guestOffset = w.guest[i];
  if (notes.length > 0) entry.note = notes.join(', ');
  return entry;
}

/** Whether `next` continues the run `prev` (same kind and note; data also guest-contiguous). */
function canMerge(prev: LayoutEntry, next: LayoutEntry, clusterSize: number): boolean {
  if (prev.kind !== next.kind || prev.note !== next.note || prev.hostOffset + prev.bytes !== next.hostOffset) return false;
  if (prev.bytes % clusterSize !== 0 || next.kind === 'compressed') return false;
  if (next.kind === 'data') return prev.guestOffset !== undefined && next.guestOffset === prev.guestOffset + prev.bytes;
  return next.guestOffset === undefined && prev.guestOffset === undefined;
}
