/**
 * The write path (QEMU's qcow2_co_pwritev_part): plan under the metadata lock (cluster-map.ts
 * planWrite: direct overwrite, allocation, subcluster update), mark the guest clusters in flight,
 * write the data with its COW fill outside the lock, then link the new clusters under it. The write
 * ordering rules are the cluster map's (cluster-map.ts 1–3); this module adds preallocation ahead of
 * the end of the file (seed 002) and the zero-fill shortcuts.
 */
import debugFactory from 'debug';
import type { HostFile } from '../../io/host-file.js';
import { newEntryAfterWrite, type ClusterWritePlan, type ReadSegment } from './cluster-map.js';
import { flush } from './flush.js';
import { readSegments } from './read.js';
import { allocIoBuffer, type ImageState } from './state.js';
import { AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY } from '../format/constants.js';
import { hasBit, withBit } from '../format/header.js';
import { isCompressed, l2HostOffset, type RawL2Entry } from '../format/l2-entry.js';
import { isZeroRange } from './zeros.js';

const trace = debugFactory('qcow2fuse:qcow2');

/** Preallocation ahead of the end of the image file (seed 002): up to 1 MiB, 16 clusters. */
const PREALLOC_AHEAD_BYTES = 1024 * 1024;

/**
 * Before the first change: mark the image dirty when it uses lazy refcounts (a crash then means
 * "repair refcounts on open"), and clear autoclear bits for features we do not maintain (bitmaps),
 * as the spec requires of programs that do not understand them.
 */
export async function prepareFirstWrite(s: ImageState): Promise<void> {
  if (s.firstWriteDone) return;
  await s.lock.run(async () => {
    if (s.firstWriteDone) return;
    const h = s.header;
    let incompatibleFeatures = h.incompatibleFeatures;
    let autoclearFeatures = h.autoclearFeatures;
    if (h.version === 3 && hasBit(h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS)) incompatibleFeatures = withBit(incompatibleFeatures, INCOMPAT_DIRTY, true);
    autoclearFeatures &= s.hasDataFile ? (1n << BigInt(AUTOCLEAR_DATA_FILE_RAW)) : 0n;
    if (incompatibleFeatures !== h.incompatibleFeatures || autoclearFeatures !== h.autoclearFeatures) {
      await s.updateHeader({ incompatibleFeatures, autoclearFeatures, bitmaps: autoclearFeatures === h.autoclearFeatures ? h.bitmaps : undefined });
    }
    s.firstWriteDone = true;
  });
}

export async function write(s: ImageState, guestOffset: number, data: Uint8Array): Promise<void> {
  s.assertWritable();
  s.checkRange(guestOffset, data.length);
  if (data.length === 0) return;
  await prepareFirstWrite(s);
  if (s.compressedWriter) {
    await s.compressedWriter.write(guestOffset, data);
    return;
  }
  await writeSkippingZeros(s, guestOffset, data);
}

/**
 * Whole guest clusters of `data` that are all zero, in [guestOffset, +data.length), as cluster indexes.
 * The comparison stops at the first non-zero byte of each cluster, so data that is not zero costs little.
 */
function zeroClustersIn(s: ImageState, guestOffset: number, data: Uint8Array): number[] {
  const g = s.geometry;
  const firstFull = g.clusterIndex(guestOffset + g.clusterSize - 1);
  const endFull = g.clusterIndex(guestOffset + data.length);
  const found: number[] = [];
  if (endFull <= firstFull) return found;
  for (let c = firstFull; c < endFull; c++) {
    const start = c * g.clusterSize - guestOffset;
    if (isZeroRange(data, start, start + g.clusterSize)) found.push(c);
  }
  return found;
}

/**
 * The uncompressed write, leaving out whole clusters of zeros that already read as zero (QEMU's
 * `qemu-img convert` does the same): unallocated clusters with no backing file below, zero clusters,
 * all of whose subclusters read as zero — decided under the metadata lock, and never for a cluster
 * another request has in flight (that one goes the normal way, after it). The guest sees the same
 * bytes; the image stays sparse and the write costs a comparison. Not with an external data file
 * (its bytes are the guest's, whatever the L2 table says), nor with `detectZeroes: false`.
 */
async function writeSkippingZeros(s: ImageState, guestOffset: number, data: Uint8Array): Promise<void> {
  const candidates = s.hasDataFile || !s.detectZeroes ? [] : zeroClustersIn(s, guestOffset, data);
  if (candidates.length === 0) {
    await writeNormal(s, guestOffset, data);
    return;
  }
  const g = s.geometry;
  const skipped = await s.lock.run(async () => {
    const readsZero = new Set<number>();
    for (const c of candidates) {
      if (s.inflight.isGuestBusy(c, true)) continue;
      const segments: ReadSegment[] = [];
      const mapped = await s.activeMap.mapForRead(c * g.clusterSize, g.clusterSize, segments);
      if (mapped === g.clusterSize && segments.every((seg) => seg.kind === 'zero')) readsZero.add(c);
    }
    return readsZero;
  });
  trace('write at %d: %d of %d zero clusters already read as zero, not written', guestOffset, skipped.size, candidates.length);
  const end = guestOffset + data.length;
  let pos = guestOffset;
  while (pos < end) {
    let runEnd = pos;
    while (runEnd < end && !skipped.has(g.clusterIndex(runEnd))) runEnd = Math.min(end, g.startOfCluster(runEnd) + g.clusterSize);
    if (runEnd > pos) await writeNormal(s, pos, data.subarray(pos - guestOffset, runEnd - guestOffset));
    while (runEnd < end && skipped.has(g.clusterIndex(runEnd))) runEnd += g.clusterSize;
    pos = runEnd;
  }
}

/**
 * The uncompressed write path: allocate, COW, write data, link.
 * @param dataFile where the data goes: the image's data file, or (compressed mounts writing a
 *   cluster that does not compress) the O_DIRECT handle, so it does not fill the page cache either.
 */
export async function writeNormal(s: ImageState, guestOffset: number, data: Uint8Array, dataFile: HostFile = s.dataFile): Promise<void> {
  const src = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  let done = 0;
  while (done < src.length) {
    const offset = guestOffset + done;
    const result = await s.lock.run(async () => {
      s.assertWritable();
      const plans = await s.activeMap.planWrite(offset, src.length - done, (c, exclusive) => s.inflight.isGuestBusy(c, exclusive), () => s.highWaterBytes);
      if (plans.length === 0) return { waitFor: s.inflight.guestDone(s.geometry.clusterIndex(offset)), plans };
      for (const p of plans) {
        if (p.mode === 'alloc' && !s.hasDataFile) {
          const runEnd = p.hostOffset + p.nbClusters * s.geometry.clusterSize;
          if (s.preallocate) {
            await preallocateAhead(s, p.hostOffset, runEnd);
            // Preallocated inside the file and never written: zero on disk, so it may be linked first.
            if (!s.preallocUnsupported && runEnd <= s.file.sizeBytes) await s.activeMap.linkZeroedBeforeData(p);
          }
          s.highWaterBytes = Math.max(s.highWaterBytes, runEnd);
        }
        s.inflight.markGuestBusy(p.firstCluster, p.nbClusters, p.mode !== 'direct' && p.mode !== 'linked');
      }
      return { waitFor: undefined, plans };
    });
    if (result.plans.length === 0) {
      await result.waitFor;
      continue;
    }
    const results = await Promise.allSettled(result.plans.map((p) => executePlan(s, p, src.subarray(p.guestOffset - guestOffset, p.guestOffset - guestOffset + p.bytes), dataFile)));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    done += result.plans.reduce((n, p) => n + p.bytes, 0);
  }
  if (s.cacheMode === 'writethrough') await flush(s);
}

/**
 * Write one planned run: data (with COW fill) outside the lock, then link under it. A failed data
 * write releases the new clusters (never linked) and leaves the old mapping in place. 'direct'
 * and 'linked' runs only write their data (a 'linked' run's clusters read as zero meanwhile).
 */
async function executePlan(s: ImageState, plan: ClusterWritePlan, data: Buffer, dataFile: HostFile): Promise<void> {
  const g = s.geometry;
  const runStart = plan.firstCluster * g.clusterSize;
  try {
    if (plan.mode === 'direct' || plan.mode === 'linked') {
      // QEMU's pre-write overlap check: an entry pointing at live metadata must not get data written over it.
      s.activeMap.assertNoOverlap(plan.hostOffset + (plan.guestOffset - runStart), data.length, 'data');
      const range = s.hasDataFile ? undefined : s.inflight.addHost(plan.hostOffset + (plan.guestOffset - runStart), data.length);
      try {
        await dataFile.pwrite(data, plan.hostOffset + (plan.guestOffset - runStart), 'data');
      } finally {
        if (range) s.inflight.removeHost(range);
      }
      return;
    }
    const newEntries: RawL2Entry[] = [];
    try {
      await writeWithFill(s, plan, data, dataFile);
      for (let i = 0; i < plan.nbClusters; i++) {
        const clusterStart = runStart + i * g.clusterSize;
        const start = Math.max(plan.guestOffset, clusterStart) - clusterStart;
        const end = Math.min(plan.guestOffset + plan.bytes, clusterStart + g.clusterSize) - clusterStart;
        newEntries.push(newEntryAfterWrite(g, s.hasDataFile, plan.oldEntries[i], plan.hostOffset + i * g.clusterSize, start, end));
      }
    } catch (err) {
      await s.lock.run(() => s.activeMap.abortAlloc(plan)).catch(() => undefined);
      throw err;
    }
    await s.lock.run(() => s.activeMap.linkL2(plan, newEntries));
  } finally {
    s.inflight.clearGuestBusy(plan.firstCluster, plan.nbClusters);
  }
}

/**
 * Seed 002: when new clusters lie past the end of the file, extend it with fallocate(ZERO_RANGE)
 * up to the next PREALLOC_AHEAD_BYTES boundary, so the data writes that follow are overwrites of
 * allocated zeros instead of many small file-extending writes (each one a metadata update of the
 * host filesystem). Runs under the metadata lock and starts at this run's own clusters: anything
 * between the old end of file and them belongs to writes still in flight and is never touched.
 */
async function preallocateAhead(s: ImageState, runStart: number, runEnd: number): Promise<void> {
  const tracked = s.file;
  // Extended L2: subclusters a write does not touch stay unallocated and QEMU leaves them holes in
  // the file; allocating them ahead would make a converted image bigger than qemu-img's.
  if (s.preallocUnsupported || s.geometry.extendedL2 || runEnd <= tracked.sizeBytes) return;
  const cs = s.geometry.clusterSize;
  const aheadBytes = Math.max(cs, Math.min(PREALLOC_AHEAD_BYTES, 16 * cs));
  const start = Math.max(tracked.sizeBytes, runStart);
  const end = Math.max(runEnd, Math.ceil(runEnd / aheadBytes) * aheadBytes);
  try {
    if (!(await tracked.zeroRange(start, end - start, false))) s.preallocUnsupported = true;
  } catch (err) {
    // Only an optimisation: a host that cannot reserve the space (ENOSPC …) still gets the data
    // write, which reports the error if it too fails.
    trace('preallocation of %d+%d failed: %o', start, end - start, err);
  }
}

/**
 * Write `data` into the run's host clusters together with the COW fill the clusters need: the
 * parts of touched clusters (standard L2) or subclusters (extended L2) that the request does not
 * cover are filled with their current guest contents. A fill that would be zeros is skipped when
 * the host clusters are known to read as zero, or done with fallocate ZERO_RANGE (seed 002).
 */
async function writeWithFill(s: ImageState, plan: ClusterWritePlan, data: Buffer, dataFile: HostFile): Promise<void> {
  const g = s.geometry;
  const runStart = plan.firstCluster * g.clusterSize;
  const runEnd = runStart + plan.nbClusters * g.clusterSize;
  const reqStart = plan.guestOffset;
  const reqEnd = plan.guestOffset + plan.bytes;
  let fillStart: number;
  let fillEnd: number;
  const moved = plan.mode === 'alloc';
  const first = plan.oldEntries[0];
  const last = plan.oldEntries[plan.oldEntries.length - 1];
  if (!g.extendedL2) {
    fillStart = moved ? runStart : reqStart;
    fillEnd = moved ? runEnd : reqEnd;
  } else {
    // Whole clusters when the old cluster had data of its own that must move along.
    const wholeFirst = moved && entryHasOwnData(s, first);
    const wholeLast = moved && entryHasOwnData(s, last);
    fillStart = wholeFirst ? runStart : reqStart - ((reqStart - runStart) % g.subclusterSize);
    const tailCluster = runEnd - g.clusterSize;
    fillEnd = wholeLast ? runEnd : Math.min(runEnd, tailCluster + Math.ceil((reqEnd - tailCluster) / g.subclusterSize) * g.subclusterSize);
    if (plan.nbClusters > 1 && moved) {
      // Middle clusters are fully covered; only the edge clusters' partial parts need care.
      fillStart = Math.min(fillStart, reqStart);
      fillEnd = Math.max(fillEnd, reqEnd);
    }
  }
  const host = (guest: number): number => plan.hostOffset + (guest - runStart);
  if (fillStart === reqStart && fillEnd === reqEnd) {
    await dataFile.pwrite(data, host(reqStart), 'data');
    return;
  }
  const head = reqStart - fillStart;
  const tail = fillEnd - reqEnd;
  const headBuf = Buffer.alloc(head);
  const tailBuf = Buffer.alloc(tail);
  const headZero = head === 0 || await readOldForCow(s, reqStart - head, headBuf);
  const tailZero = tail === 0 || await readOldForCow(s, reqEnd, tailBuf);
  if (headZero && tailZero && moved) {
    if (plan.hostKnownZero) {
      await dataFile.pwrite(data, host(reqStart), 'data');
      return;
    }
    if (s.preallocate && await s.dataFile.zeroRange(host(fillStart), fillEnd - fillStart, true)) {
      await dataFile.pwrite(data, host(reqStart), 'data');
      return;
    }
  }
  const buf = allocIoBuffer(dataFile, fillEnd - fillStart);
  headBuf.copy(buf, 0);
  data.copy(buf, head);
  tailBuf.copy(buf, head + data.length);
  await dataFile.pwrite(buf, host(fillStart), 'data');
}

function entryHasOwnData(s: ImageState, e: RawL2Entry): boolean {
  return isCompressed(e) || ((s.hasDataFile || l2HostOffset(e) !== 0) && e.allocBitmap !== 0);
}

/** Fill `buf` with the current guest contents at `guestOffset` (the COW source); true when it is all zeros by mapping. */
async function readOldForCow(s: ImageState, guestOffset: number, buf: Buffer): Promise<boolean> {
  const segments: ReadSegment[] = [];
  await s.lock.run(async () => {
    let n = 0;
    while (n < buf.length) n += await s.activeMap.mapForRead(guestOffset + n, buf.length - n, segments);
  });
  if (segments.every((seg) => seg.kind === 'zero')) {
    buf.fill(0);
    return true;
  }
  await readSegments(s, segments, guestOffset, buf);
  return false;
}

