/**
 * Zero writes, discard and resize: whole clusters change their L2 entries under the metadata lock
 * (zero flag, unmapped) and release their storage through the cluster map (whose rule 3 orders the
 * frees); partial clusters go through the write path. A run of clusters another request has in
 * flight is waited for first.
 */
import { discardEntryFor, dropL2TablesFrom, replaceEntries, zeroEntryFor } from './cluster-discard.js';
import { flush, flushLocked } from './flush.js';
import type { ImageState } from './state.js';
import { prepareFirstWrite, write, writeNormal } from './write.js';
import { CodedError, Qcow2RangeError } from '../format/errors.js';

/**
 * Make [guestOffset, +bytes) read as zeros: whole clusters get the zero flag (or zero bitmap) and
 * lose their storage; partial clusters are written with zeros.
 */
export async function writeZeroes(s: ImageState, guestOffset: number, bytes: number): Promise<void> {
  s.assertWritable();
  s.checkRange(guestOffset, bytes);
  if (bytes === 0) return;
  await prepareFirstWrite(s);
  await s.compressedWriter?.flush();
  const g = s.geometry;
  const end = guestOffset + bytes;
  const alignedStart = Math.ceil(guestOffset / g.clusterSize) * g.clusterSize;
  const alignedEnd = Math.max(alignedStart, end === s.virtualSize ? Math.ceil(end / g.clusterSize) * g.clusterSize : end - (end % g.clusterSize));
  const canFlag = s.header.version >= 3 && !s.dataFileRaw;
  if (!canFlag || alignedStart >= alignedEnd) {
    await writeZeroBytes(s, guestOffset, bytes);
    return;
  }
  if (alignedStart > guestOffset) await writeZeroBytes(s, guestOffset, alignedStart - guestOffset);
  await forEachClusterRun(s, alignedStart, alignedEnd, (first, n) => replaceEntries(s.activeMap, first, n, (old) => zeroEntryFor(s.activeMap, old)));
  if (end > alignedEnd) await writeZeroBytes(s, alignedEnd, end - alignedEnd);
  if (s.cacheMode === 'writethrough') await flush(s);
}

async function writeZeroBytes(s: ImageState, guestOffset: number, bytes: number): Promise<void> {
  const chunk = Buffer.alloc(Math.min(bytes, 4 * 1024 * 1024));
  for (let done = 0; done < bytes; done += chunk.length) {
    const n = Math.min(chunk.length, bytes - done);
    await write(s, guestOffset + done, chunk.subarray(0, n));
  }
}

/**
 * Run `fn(firstCluster, nbClusters)` under the lock for each slice-bounded run of whole clusters in
 * [start, end), waiting for clusters other requests are writing.
 */
async function forEachClusterRun(s: ImageState, start: number, end: number, fn: (firstCluster: number, nbClusters: number) => Promise<void>): Promise<void> {
  const g = s.geometry;
  const sliceCoverage = g.l2SliceEntries * g.clusterSize;
  let pos = start;
  while (pos < end) {
    const runEnd = Math.min(end, pos - (pos % sliceCoverage) + sliceCoverage);
    const first = g.clusterIndex(pos);
    const n = g.clusterIndex(runEnd - 1) - first + 1;
    let waitFor: Promise<void> | undefined;
    await s.lock.run(async () => {
      s.assertWritable();
      for (let c = first; c < first + n; c++) {
        const done = s.inflight.guestDone(c);
        if (done) { waitFor = done; return; }
      }
      await fn(first, n);
    });
    if (waitFor) {
      await waitFor;
      continue;
    }
    pos = runEnd;
  }
}

/**
 * Discard [guestOffset, +bytes): whole clusters are unmapped (reading zeros on v3, backing data or
 * zeros on v2 as QEMU does) and their host space released; partial clusters are left as they are.
 */
export async function discard(s: ImageState, guestOffset: number, bytes: number): Promise<void> {
  s.assertWritable();
  s.checkRange(guestOffset, bytes);
  await prepareFirstWrite(s);
  await s.compressedWriter?.flush();
  const g = s.geometry;
  const end = guestOffset + bytes;
  const alignedStart = Math.ceil(guestOffset / g.clusterSize) * g.clusterSize;
  const alignedEnd = end === s.virtualSize ? Math.ceil(end / g.clusterSize) * g.clusterSize : end - (end % g.clusterSize);
  if (alignedStart >= alignedEnd || s.dataFileRaw) return;
  await forEachClusterRun(s, alignedStart, alignedEnd, (first, n) => replaceEntries(s.activeMap, first, n, (old) => discardEntryFor(s.activeMap, old, false)));
  if (s.cacheMode === 'writethrough') await flush(s);
}

/** A compressed write found an all-zero cluster: unallocated when nothing shows through, else a zero cluster. */
export async function zeroClusterForCompress(s: ImageState, clusterIndex: number): Promise<void> {
  const g = s.geometry;
  const start = clusterIndex * g.clusterSize;
  const end = Math.min(start + g.clusterSize, s.virtualSize);
  if (s.backing === undefined) {
    await forEachClusterRun(s, start, end, (first, n) => replaceEntries(s.activeMap, first, n, (old) => discardEntryFor(s.activeMap, old, true)));
  } else if (s.header.version >= 3) {
    await forEachClusterRun(s, start, end, (first, n) => replaceEntries(s.activeMap, first, n, (old) => zeroEntryFor(s.activeMap, old)));
  } else {
    await writeNormal(s, start, Buffer.alloc(end - start));
  }
}

/**
 * End of the part of a grown area [oldSize, newVirtualSize) to zero because a longer backing file
 * would show through it: all of it on v3 (zero clusters, as QEMU's qcow2 truncate does), only up to
 * the backing file's end on v2, whose zeros must be written as data (QEMU refuses that resize).
 */
function newAreaShowingBacking(s: ImageState, oldSize: number, newVirtualSize: number): number {
  const backingSize = s.backing?.virtualSize ?? 0;
  if (backingSize <= oldSize) return oldSize;
  return s.header.version >= 3 && !s.dataFileRaw ? newVirtualSize : Math.min(newVirtualSize, backingSize);
}

/**
 * Change the virtual size. Growing extends L1 as needed and makes the new area read as zeros: the
 * tail of a partial last cluster, and whatever a longer backing file would otherwise show through
 * (QEMU's truncate zeroes that range, BDRV_REQ_ZERO_WRITE). Shrinking frees every cluster past the
 * new end (as `qemu-img resize --shrink`).
 */
export async function resize(s: ImageState, newVirtualSize: number): Promise<void> {
  s.assertWritable();
  if (!Number.isSafeInteger(newVirtualSize) || newVirtualSize < 0) throw new Qcow2RangeError(s.path, `invalid size ${newVirtualSize}`);
  if (s.snapshots.length > 0 && newVirtualSize < s.virtualSize) {
    throw new CodedError('EINVAL', `${s.path}: cannot shrink an image with internal snapshots`, { image: s.path });
  }
  await prepareFirstWrite(s);
  await s.compressedWriter?.flush();
  const g = s.geometry;
  const oldSize = s.virtualSize;
  if (newVirtualSize === oldSize) return;
  if (newVirtualSize > oldSize) {
    await s.lock.run(async () => {
      await s.activeMap.growL1(g.l1EntriesFor(newVirtualSize));
      await s.updateHeader({ virtualSize: newVirtualSize });
    });
    const zeroEnd = Math.max(newAreaShowingBacking(s, oldSize, newVirtualSize), Math.min(newVirtualSize, Math.ceil(oldSize / g.clusterSize) * g.clusterSize));
    if (zeroEnd > oldSize) await writeZeroes(s, oldSize, zeroEnd - oldSize);
    return;
  }
  const firstFree = Math.ceil(newVirtualSize / g.clusterSize) * g.clusterSize;
  const oldEnd = Math.ceil(oldSize / g.clusterSize) * g.clusterSize;
  if (firstFree < oldEnd) {
    await forEachClusterRun(s, firstFree, oldEnd, (first, n) => replaceEntries(s.activeMap, first, n, (old) => discardEntryFor(s.activeMap, old, true)));
  }
  await s.lock.run(async () => {
    await flushLocked(s);
    await dropL2TablesFrom(s.activeMap, g.l1EntriesFor(newVirtualSize));
    await s.updateHeader({ virtualSize: newVirtualSize });
  });
}
