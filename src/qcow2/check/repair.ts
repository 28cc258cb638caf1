/**
 * Repair primitives shared by `check -r` and the dirty-image repair on open (QEMU's
 * block/qcow2-refcount.c rebuild_refcount_structure, qcow2-snapshot.c qcow2_write_snapshots):
 *
 * - RefcountArray: the in-memory refcount table (QEMU's IMRT) a check builds from the references;
 * - rebuildRefcountStructure: writes new refcount blocks and a new refcount table straight from that
 *   array into clusters it marks as used itself, then points the header at the new table (the old
 *   structures become leaks that the following leak repair frees);
 * - writeSnapshotTable: a fresh copy of the snapshot table, then the header, then the old one freed;
 *
 * After structures moved, the image's metadata-region map is rebuilt with ImageState.registerMetadata
 * (the one registration open uses too). The dirty-image repair on open is dirty-repair.ts.
 *
 * Every function runs with the image's metadata lock held. Writes onto live metadata are refused
 * through the corruption funnel, as QEMU's pre-write overlap check does.
 */
import { CodedError } from '../format/errors.js';
import { HEADER_FIELD } from '../format/header.js';
import type { ImageState } from '../engine/state.js';
import type { MetadataKind } from '../engine/overlap.js';
import { encodeReftableEntry, setRefcount } from '../format/refcount-block.js';
import type { SnapshotEntry } from '../format/snapshot-table.js';
import { encodeSnapshotTable } from '../format/snapshot-table.js';
import { writeU64 } from '../format/safe-int.js';

/** Header field offsets QEMU rewrites in place. */

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
  await image.file.pwrite(pointer, HEADER_FIELD.refcountTableOffset, 'header');
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
  await image.file.pwrite(pointer, HEADER_FIELD.nbSnapshots, 'header');
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
