/**
 * Zero writes, discard and shrink on the cluster map (QEMU's zero_in_l2_slice, discard_in_l2_slice,
 * and the L1 side of a shrink): whole clusters get a new entry under the metadata lock, and what the
 * old entries held is released after — the reference is removed first (cluster-map.ts rule 3: the
 * refcount cache depends on the L2 cache before any decrement).
 */
import type { ClusterMap } from './cluster-map.js';
import { clusterKind, decodeL1Entry, encodeL1Entry, makeZeroEntry, readL2Entry, writeL2Entry, EMPTY_L2_ENTRY, type RawL2Entry } from '../format/l2-entry.js';

/**
 * Set the entries of whole clusters [firstCluster, +nbClusters) (within one L2 slice) to `make(old)`
 * and free what the old entries held. Used by zero writes, discard and shrink.
 */
export async function replaceEntries(map: ClusterMap, firstCluster: number, nbClusters: number, make: (old: RawL2Entry) => RawL2Entry | undefined): Promise<void> {
  const g = map.ctx.geometry;
  const firstGuest = firstCluster * g.clusterSize;
  const { l2Offset } = map.l2TableOffset(g.l1Index(firstGuest));
  // Nothing to change when no table exists and the replacement of an empty entry is empty.
  if (l2Offset === 0 && make(EMPTY_L2_ENTRY) === undefined) return;
  const h = await map.getL2SliceForWrite(firstGuest);
  const freed: RawL2Entry[] = [];
  try {
    let changed = false;
    for (let i = 0; i < nbClusters; i++) {
      const index = g.l2IndexInSlice(firstGuest + i * g.clusterSize);
      const old = readL2Entry(h.buf, index, g);
      map.checkEntry(old, h.offset, index);
      const next = make(old);
      if (next === undefined) continue;
      writeL2Entry(h.buf, index, g, next);
      changed = true;
      freed.push(old);
    }
    if (changed) map.ctx.l2Cache.markDirty(h);
  } finally {
    await map.ctx.l2Cache.put(h);
  }
  for (const old of freed) await map.freeEntry(old);
}

/** The entry that makes a whole cluster read as zeros, or undefined to leave it (v2 without data). */
export function zeroEntryFor(map: ClusterMap, old: RawL2Entry): RawL2Entry | undefined {
  const g = map.ctx.geometry;
  if (map.ctx.hasDataFile) return map.ctx.version >= 3 ? makeZeroEntry(g) : undefined;
  const kind = clusterKind(old, g, false);
  if (g.extendedL2) {
    if (kind === 'unallocated' && old.zeroBitmap === 0xffffffff) return undefined;
    return makeZeroEntry(g);
  }
  if (kind === 'zero-plain') return undefined;
  return makeZeroEntry(g);
}

/** The entry a discarded cluster gets (QEMU's discard_in_l2_slice, full_discard = false). */
export function discardEntryFor(map: ClusterMap, old: RawL2Entry, fullDiscard: boolean): RawL2Entry | undefined {
  const g = map.ctx.geometry;
  const kind = clusterKind(old, g, map.ctx.hasDataFile);
  if (fullDiscard) return old.hi === 0 && old.lo === 0 && old.allocBitmap === 0 && old.zeroBitmap === 0 ? undefined : { ...EMPTY_L2_ENTRY };
  const allocated = kind === 'normal' || kind === 'zero-alloc' || kind === 'compressed';
  if (!map.ctx.hasBacking() && !allocated) return undefined;
  if (g.extendedL2) return makeZeroEntry(g);
  return map.ctx.version >= 3 ? makeZeroEntry(g) : { ...EMPTY_L2_ENTRY };
}

/** Clear L1 entries from `firstIndex` on, freeing their L2 tables (shrink). */
export async function dropL2TablesFrom(map: ClusterMap, firstIndex: number): Promise<void> {
  const g = map.ctx.geometry;
  let changed = false;
  for (let i = firstIndex; i < map.l1.entries; i++) {
    const e = decodeL1Entry(map.l1.buf, i);
    if (e.l2Offset === 0) continue;
    encodeL1Entry(map.l1.buf, i, 0, false);
    await map.writeL1Entry(i);
    changed = true;
    for (let s = 0; s < g.l2Entries / g.l2SliceEntries; s++) map.ctx.l2Cache.discard(e.l2Offset + s * g.l2SliceBytes);
    map.ctx.metadata.remove(e.l2Offset, g.clusterSize);
    await map.ctx.file.fdatasync();
    await map.freeHostClusters(e.l2Offset, g.clusterSize);
  }
  if (changed) await map.ctx.file.fdatasync();
}
