/**
 * Repair primitives shared by `check -r` and the dirty-image repair on open (QEMU's
 * block/qcow2-refcount.c rebuild_refcount_structure, qcow2-snapshot.c qcow2_write_snapshots):
 *
 * - RefcountArray: the in-memory refcount table (QEMU's IMRT) a check builds from the references;
 * - rebuildRefcountStructure: writes new refcount blocks and a new refcount table straight from that
 *   array into clusters it marks as used itself, then points the header at the new table (the old
 *   structures become leaks that the following leak repair frees);
 * - writeSnapshotTable: a fresh copy of the snapshot table, then the header, then the old one freed;
 * - reregisterMetadata: rebuild the image's metadata-region map after structures moved;
 * - repairDirtyImage: what a writable open of an image with the dirty bit does (lazy refcounts after a
 *   crash): a full check with every repair, which also clears the dirty bit — staged in memory
 *   (StagingFile) and written only when it succeeded.
 *
 * Every function runs with the image's metadata lock held. Writes onto live metadata are refused
 * through the corruption funnel, as QEMU's pre-write overlap check does.
 */
import type { HostFile } from '../../io/host-file.js';
import { allocAligned, DEFAULT_ALIGNMENT_BYTES } from '../../io/aligned-buffer.js';
import { CodedError } from '../format/errors.js';
import { decodeHeader } from '../format/header.js';
import { imageState, Qcow2Image } from '../engine/image.js';
import type { Qcow2OpenOptions } from '../engine/options.js';
import type { ImageState } from '../engine/state.js';
import type { MetadataKind } from '../engine/overlap.js';
import { encodeReftableEntry, setRefcount } from '../format/refcount-block.js';
import type { SnapshotEntry } from '../format/snapshot-table.js';
import { encodeSnapshotTable, readSnapshotTable } from '../format/snapshot-table.js';
import { writeU64 } from '../format/safe-int.js';

/** Header field offsets QEMU rewrites in place. */
const HEADER_REFTABLE_OFFSET_POS = 48;
const HEADER_NB_SNAPSHOTS_POS = 60;

export type CheckAbortCode = 'EIO' | 'EFBIG' | 'EINVAL' | 'ENOMEM';

/** A check could not go on (QEMU's negative return): `code` is the errno name. */
export class CheckAbortError extends CodedError {
  readonly errno: CheckAbortCode;
  constructor(code: CheckAbortCode, message: string) {
    super(code, message);
    this.errno = code;
  }
}

/** strerror() of the errno names a check can end with, as qemu-img prints them. */
export const ERRNO_TEXT: Record<CheckAbortCode, string> = {
  EIO: 'Input/output error',
  EFBIG: 'File too large',
  EINVAL: 'Invalid argument',
  ENOMEM: 'Cannot allocate memory',
};

/**
 * Refcounts by host cluster index, counted in memory (QEMU's in-memory refcount table). `size` is the
 * number of clusters it describes (QEMU's nb_clusters); it only grows. Values saturate at `max`.
 */
export class RefcountArray {
  readonly max: number;
  readonly refcountOrder: number;
  size: number;
  private data: Uint8Array | Uint16Array | Uint32Array;

  constructor(refcountOrder: number, maxRefcount: number, size: number) {
    this.refcountOrder = refcountOrder;
    this.max = Math.min(maxRefcount, 0xffffffff);
    this.size = 0;
    this.data = this.allocate(0);
    this.resize(size);
  }

  private allocate(entries: number): Uint8Array | Uint16Array | Uint32Array {
    try {
      if (this.refcountOrder <= 3) return new Uint8Array(entries);
      if (this.refcountOrder === 4) return new Uint16Array(entries);
      return new Uint32Array(entries);
    } catch {
      throw new CheckAbortError('ENOMEM', `cannot hold refcounts for ${entries} clusters in memory`);
    }
  }

  get(clusterIndex: number): number {
    return clusterIndex < this.size ? this.data[clusterIndex] : 0;
  }

  set(clusterIndex: number, value: number): void {
    this.data[clusterIndex] = value;
  }

  /** Grow to describe `newSize` clusters (new ones at 0); never shrinks. */
  resize(newSize: number): void {
    if (newSize <= this.size) return;
    if (newSize > this.data.length) {
      const next = this.allocate(Math.max(newSize, Math.min(this.data.length * 2, newSize + (1 << 20))));
      next.set(this.data.subarray(0, this.size));
      this.data = next;
    }
    this.size = newSize;
  }

  clear(): void {
    this.data.fill(0);
  }
}

/**
 * QEMU's pre-write overlap check for repair writes: true (and the image marked corrupt, as QEMU
 * does) when [hostOffset, +bytes) overlaps live metadata other than `allowed`.
 */
export function overlapsMetadata(image: ImageState, hostOffset: number, bytes: number, allowed: MetadataKind | undefined, what: string): boolean {
  const hit = image.metadata.overlaps(hostOffset, bytes, allowed);
  if (!hit) return false;
  try {
    image.signalCorruption(true, `preventing ${what} write of ${bytes} bytes at ${hostOffset}: it overlaps ${hit.kind} metadata at ${hit.clusterOffset}`,
      { structure: hit.kind, hostOffset });
  } catch {
    // The funnel always throws; the caller reports the refused write.
  }
  return true;
}

function assertNoOverlap(image: ImageState, hostOffset: number, bytes: number, what: string): void {
  if (overlapsMetadata(image, hostOffset, bytes, undefined, what)) {
    throw new CheckAbortError('EIO', `ERROR writing ${what}: ${ERRNO_TEXT.EIO}`);
  }
}

/**
 * QEMU's alloc_clusters_imrt: `count` contiguous clusters free in `refs`, starting the search at
 * `firstFree.index` (updated to the first gap seen), growing `refs` at the end when none is found.
 * Marks them used (refcount 1) and returns the host offset of the first.
 */
function allocClustersImrt(refs: RefcountArray, count: number, firstFree: { index: number }, clusterSize: number): number {
  let cluster = firstFree.index;
  let firstGap = true;
  let contiguous = 0;
  for (; cluster < refs.size && contiguous < count; cluster++) {
    if (refs.get(cluster) === 0) {
      contiguous++;
      if (firstGap) {
        firstFree.index = cluster;
        firstGap = false;
      }
    } else {
      contiguous = 0;
    }
  }
  if (contiguous < count) refs.resize(cluster + count - contiguous);
  cluster -= contiguous;
  for (let i = 0; i < count; i++) refs.set(cluster + i, 1);
  return cluster * clusterSize;
}

/**
 * QEMU's rebuild_refcounts_write_refblocks: for every cluster in [firstCluster, endCluster) with a
 * refcount, make sure its refcount block exists (allocated in `refs`) and write the block as the
 * matching slice of `refs`. Returns true when `reftable` had to grow.
 */
async function writeRefblocks(image: ImageState, refs: RefcountArray, firstCluster: number, endCluster: number, reftable: number[]): Promise<boolean> {
  const g = image.geometry;
  const firstFree = { index: 0 };
  let grown = false;
  let end = endCluster;
  for (let cluster = firstCluster; cluster < end; cluster++) {
    if (refs.get(cluster) === 0) continue;
    const ri = g.reftableIndex(cluster);
    const blockStart = ri * g.refblockEntries;
    let blockOffset: number;
    if (ri < reftable.length && reftable[ri] !== 0) {
      blockOffset = reftable[ri]!;
    } else {
      if (firstFree.index < blockStart) firstFree.index = blockStart;
      blockOffset = allocClustersImrt(refs, 1, firstFree, g.clusterSize);
      const blockCluster = blockOffset / g.clusterSize;
      if (blockCluster >= end) end = blockCluster + 1;
      if (reftable.length <= ri) {
        const entriesPerCluster = g.clusterSize / 8;
        const newLength = Math.ceil((ri + 1) / entriesPerCluster) * entriesPerCluster;
        while (reftable.length < newLength) reftable.push(0);
        grown = true;
      }
      reftable[ri] = blockOffset;
    }
    assertNoOverlap(image, blockOffset, g.clusterSize, 'refblock');
    const block = Buffer.alloc(g.clusterSize);
    for (let i = 0; i < g.refblockEntries; i++) {
      const value = refs.get(blockStart + i);
      if (value !== 0) setRefcount(block, i, g.refcountOrder, value);
    }
    await image.file.pwrite(block, blockOffset, 'refblock');
    cluster = blockStart + g.refblockEntries - 1;
  }
  return grown;
}

/**
 * Replace the refcount structure by one built solely from `refs` (QEMU's rebuild_refcount_structure).
 * New refcount blocks and the new table go into clusters free in `refs` (which records them); the
 * header is switched last. The old structures are not freed here: they are leaks now.
 */
export async function rebuildRefcountStructure(image: ImageState, refs: RefcountArray): Promise<void> {
  const g = image.geometry;
  await image.refcountCache.flush();
  image.refcountCache.invalidateClean();
  const reftable: number[] = [];
  await writeRefblocks(image, refs, 0, refs.size, reftable);
  let reftableOffset: number;
  let reftableClusters: number;
  let grown: boolean;
  do {
    reftableClusters = g.sizeToClusters(reftable.length * 8);
    reftableOffset = allocClustersImrt(refs, reftableClusters, { index: 0 }, g.clusterSize);
    const start = reftableOffset / g.clusterSize;
    grown = await writeRefblocks(image, refs, start, start + reftableClusters, reftable);
  } while (grown);
  const table = Buffer.alloc(reftableClusters * g.clusterSize);
  reftable.forEach((offset, i) => encodeReftableEntry(table, i, offset));
  assertNoOverlap(image, reftableOffset, table.length, 'reftable');
  await image.file.pwrite(table, reftableOffset, 'reftable');
  const pointer = Buffer.alloc(12);
  writeU64(pointer, 0, reftableOffset);
  pointer.writeUInt32BE(reftableClusters, 8);
  await image.file.fdatasync();
  await image.file.pwrite(pointer, HEADER_REFTABLE_OFFSET_POS, 'header');
  await image.file.fdatasync();
  image.setHeader({ ...image.header, refcountTableOffset: reftableOffset, refcountTableClusters: reftableClusters });
  await image.refcounts.load(reftableOffset, reftableClusters);
}

/**
 * Write `entries` as a new snapshot table (QEMU's qcow2_write_snapshots): allocate, write, sync,
 * switch the header (nb_snapshots and snapshots_offset), then free the old table.
 */
export async function writeSnapshotTable(image: ImageState, entries: SnapshotEntry[], oldOffset: number, oldBytes: number, log: (line: string) => void): Promise<void> {
  const g = image.geometry;
  const table = encodeSnapshotTable(entries);
  let tableOffset = 0;
  if (table.length > 0) {
    tableOffset = await image.refcounts.allocClusters(g.sizeToClusters(table.length));
    await image.refcountCache.flush();
    assertNoOverlap(image, tableOffset, table.length, 'snapshot table');
    await image.file.pwrite(table, tableOffset, 'snapshot');
    await image.file.fdatasync();
  }
  const pointer = Buffer.alloc(12);
  pointer.writeUInt32BE(entries.length, 0);
  writeU64(pointer, 4, tableOffset);
  await image.file.pwrite(pointer, HEADER_NB_SNAPSHOTS_POS, 'header');
  await image.file.fdatasync();
  image.setHeader({ ...image.header, nbSnapshots: entries.length, snapshotsOffset: tableOffset });
  image.setSnapshotTable(entries, table.length);
  if (oldBytes > 0) {
    try {
      await image.refcounts.freeClusters(oldOffset, oldBytes);
    } catch (err) {
      log(`qcow2_free_clusters failed: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
}

/**
 * A HostFile that stages every write in memory over a real one (reads see the staged data), for a
 * repair that must either complete or leave the file untouched. `commit()` writes the staged pages
 * to the real file: everything but the header cluster first, synced, then the header, synced — so a
 * crash during the commit leaves the old header (still dirty) in charge, and the next open repairs
 * again. Page granularity keeps O_DIRECT handles happy. A punched hole is staged as zeros; fallocate
 * reports "unsupported", so callers fall back to plain writes.
 */
export class StagingFile implements HostFile {
  readonly readOnly = false;
  readonly direct = false;
  private readonly inner: HostFile;
  private readonly pageBytes: number;
  private readonly headerBytes: number;
  /** Staged page contents by page index. */
  private readonly pages = new Map<number, Buffer>();
  private innerBytes: number;
  private sizeBytes: number;

  constructor(inner: HostFile, sizeBytes: number, headerBytes: number) {
    this.inner = inner;
    this.pageBytes = Math.max(4096, inner.dioAlignment);
    this.headerBytes = headerBytes;
    this.innerBytes = sizeBytes;
    this.sizeBytes = sizeBytes;
  }

  get path(): string { return this.inner.path; }
  get dioAlignment(): number { return this.inner.dioAlignment; }

  /** The page as the file holds it now (staged, else read from the real file; zeros past its end). */
  private async load(index: number): Promise<Buffer> {
    const staged = this.pages.get(index);
    if (staged) return staged;
    const page = allocAligned(this.pageBytes, Math.max(DEFAULT_ALIGNMENT_BYTES, this.inner.dioAlignment));
    page.fill(0);
    const offset = index * this.pageBytes;
    if (offset < this.innerBytes && offset < this.sizeBytes) {
      const n = await this.inner.pread(page, offset);
      page.fill(0, Math.max(0, Math.min(n, this.sizeBytes - offset)));
    }
    return page;
  }

  async pread(buf: Uint8Array, hostOffset: number): Promise<number> {
    const end = Math.min(hostOffset + buf.length, this.sizeBytes);
    for (let pos = hostOffset; pos < end;) {
      const index = Math.floor(pos / this.pageBytes);
      const within = pos - index * this.pageBytes;
      const n = Math.min(end - pos, this.pageBytes - within);
      (await this.load(index)).copy(buf, pos - hostOffset, within, within + n);
      pos += n;
    }
    return Math.max(0, end - hostOffset);
  }

  async pwrite(buf: Uint8Array, hostOffset: number): Promise<void> {
    const data = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
    for (let pos = hostOffset; pos < hostOffset + data.length;) {
      const index = Math.floor(pos / this.pageBytes);
      const within = pos - index * this.pageBytes;
      const n = Math.min(hostOffset + data.length - pos, this.pageBytes - within);
      const page = await this.load(index);
      data.copy(page, within, pos - hostOffset, pos - hostOffset + n);
      this.pages.set(index, page);
      pos += n;
    }
    this.sizeBytes = Math.max(this.sizeBytes, hostOffset + data.length);
  }

  async fdatasync(): Promise<void> {}
  async size(): Promise<number> { return this.sizeBytes; }

  async truncate(bytes: number): Promise<void> {
    for (const index of [...this.pages.keys()]) {
      const start = index * this.pageBytes;
      if (start >= bytes) this.pages.delete(index);
      else if (start + this.pageBytes > bytes) this.pages.get(index)!.fill(0, bytes - start);
    }
    if (bytes < this.innerBytes) this.innerBytes = bytes;
    this.sizeBytes = bytes;
  }

  async zeroRange(): Promise<boolean> { return false; }

  /** Freed clusters read as zeros afterwards, as on the real file (staged as zeros, within the file). */
  async punchHole(offset: number, length: number): Promise<boolean> {
    const end = Math.min(offset + length, this.sizeBytes);
    const zeros = Buffer.alloc(Math.min(Math.max(end - offset, 0), 1024 * 1024));
    for (let pos = offset; pos < end; pos += zeros.length) await this.pwrite(zeros.subarray(0, Math.min(zeros.length, end - pos)), pos);
    return true;
  }

  async allocate(): Promise<boolean> { return false; }
  async dropCache(): Promise<void> {}
  /** The real file stays open: it belongs to the image being repaired. */
  async close(): Promise<void> {}

  /** Write the staged pages to the real file (header cluster last, each phase synced) and set its size. */
  async commit(): Promise<void> {
    const indices = [...this.pages.keys()].sort((a, b) => a - b);
    const isHeader = (index: number): boolean => index * this.pageBytes < this.headerBytes;
    for (const phase of [false, true]) {
      for (const index of indices) if (isHeader(index) === phase) await this.inner.pwrite(this.pages.get(index)!, index * this.pageBytes, 'other');
      if (phase === false && (await this.inner.size()) !== this.sizeBytes) await this.inner.truncate(this.sizeBytes);
      await this.inner.fdatasync();
    }
    this.pages.clear();
  }
}

/**
 * Repair an image opened writable with the dirty bit set, as QEMU's qcow2_do_open does (a check with
 * every repair, which clears the dirty bit) — but staged: the repair runs on a twin of the image
 * whose writes go to a StagingFile, and reaches the real file only when it succeeded. A repair that
 * fails (check errors, fatal corruption) leaves the file untouched — QEMU may leave it half repaired
 * and marked corrupt — and the open fails with EIO. On success the image reloads what the repair
 * changed (header, refcount table, L1 COPIED flags, snapshot table).
 */
export async function repairDirtyImage(image: ImageState, options: Qcow2OpenOptions): Promise<void> {
  const { checkPassLocked } = await import('./check.js');
  const fail = (why: string, cause?: unknown): never => {
    throw new CodedError('EIO', `${image.path}: could not repair dirty image: ${why}; run 'qcow2fuse check -r all'`, { image: image.path }, { cause });
  };
  const message = (err: unknown): string => (err instanceof Error ? err.message : String(err));
  const staging = new StagingFile(image.file, await image.file.size(), image.geometry.clusterSize);
  const twin = await Qcow2Image.open(image.path, { readOnly: false, check: true, file: staging, lock: false, openHostFile: options.openHostFile }).catch((err: unknown) => fail(message(err), err));
  let repaired = false;
  try {
    const result = await imageState(twin).lock.run(() => checkPassLocked(imageState(twin), { leaks: true, errors: true, beyondEnd: true })).catch((err: unknown) => fail(message(err), err));
    if (result.checkErrors > 0) fail(`${result.checkErrors} check errors`);
    if (twin.readOnly) fail('the repair met fatal corruption');
    await twin.close().catch((err: unknown) => fail(message(err), err));
    if (twin.readOnly) fail('the repair met fatal corruption');
    repaired = true;
  } finally {
    if (!repaired) await twin.close().catch(() => undefined);
  }
  await image.lock.run(async () => {
    await staging.commit();
    await reloadAfterRepair(image);
  });
}

/** Re-read what a repair may have changed under an open image (before the image was used). */
async function reloadAfterRepair(image: ImageState): Promise<void> {
  const g = image.geometry;
  const fileBytes = await image.file.size();
  image.setHeader(decodeHeader(await image.readHost(0, Math.min(g.clusterSize, fileBytes)), image.path, fileBytes));
  await image.refcounts.load(image.header.refcountTableOffset, image.header.refcountTableClusters);
  const l1 = image.activeMap.l1;
  (await image.readHost(l1.offset, l1.entries * 8)).copy(l1.buf, 0);
  image.setSnapshotTable([], 0);
  if (image.header.nbSnapshots > 0) {
    const table = await readSnapshotTable((offset, bytes) => image.readHost(offset, bytes), image.header.snapshotsOffset, image.header.nbSnapshots, fileBytes, image.path);
    image.setSnapshotTable(table.entries, table.tableBytes);
  }
  image.l2Cache.invalidateClean();
  image.refcountCache.invalidateClean();
  image.registerMetadata();
}
