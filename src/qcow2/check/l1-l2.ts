/**
 * The L1/L2 walk (QEMU's check_refcounts_l1 and check_refcounts_l2): count every reference an L1
 * table and its L2 tables make (tables, data clusters, compressed chunks), flag bad entries, and with
 * -r all make unaligned preallocated entries read as zeros (fix_l2_entry_by_zero).
 */
import { clusterKind, decodeCompressed, entryOffset, l2HostOffset, type RawL2Entry, readL2Entry, writeL2Entry } from '../format/l2-entry.js';
import { nextNonZeroEntry } from '../format/table-scan.js';
import { type CheckContext, type L2WalkRecording, repeatedTables } from './context.js';
import { type CheckCounters, type FixMode, hex, rawHex } from './counters.js';
import { CheckAbortError, ERRNO_TEXT, overlapsMetadata } from './repair.js';

/** Entries of one L2 table fix_l2_entry_by_zero changed (index range, count), written after the walk. */
interface ZeroedEntries {
  count: number;
  first: number;
  last: number;
}

/** The replayable effect of walking one L2 table. */
interface L2WalkEffect {
  messages: string[];
  incs: number[];
  corruptions: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

/** QEMU's check_refcounts_l1. */
export async function checkRefcountsL1(c: CheckContext, res: CheckCounters, l1Offset: number, l1Entries: number, fragInfo: boolean, fix: FixMode, active: boolean): Promise<void> {
  if (l1Entries === 0) return;
  const cs = c.clusterSize;
  c.incRefcounts(res, l1Offset, l1Entries * 8);
  // Entries past the end of the file read as zeros: only the part inside it needs a walk.
  const inFile = l1Offset >= c.fileBytes ? 0 : Math.min(l1Entries, Math.ceil((c.fileBytes - l1Offset) / 8));
  const l1 = await c.read(l1Offset, inFile * 8);
  const repeated = repeatedTables(l1, inFile);
  const memo = repeated ? new Map<number, L2WalkEffect>() : undefined;
  c.progress(l1Entries - inFile);
  for (let i = 0; i < inFile; i++) {
    const hi = l1.readUInt32BE(i * 8);
    const lo = l1.readUInt32BE(i * 8 + 4);
    if (i % 64 === 63) c.progress(64);
    if (hi === 0 && lo === 0) continue;
    if ((hi & 0x7f000000) !== 0 || (lo & 0x1ff) !== 0) {
      if (c.verbose) c.log(`ERROR found L1 entry with reserved bits set: ${rawHex(hi, lo)}`);
      res.corruptions++;
    }
    const l2Offset = entryOffset(hi, lo);
    c.incRefcounts(res, l2Offset, cs);
    if (l2Offset % cs !== 0) {
      if (c.verbose) c.log(`ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
      res.corruptions++;
    }
    await checkRefcountsL2(c, res, l2Offset, fragInfo, fix, active, memo !== undefined && repeated!.has(l2Offset) ? memo : undefined);
  }
  c.progress(inFile % 64);
}

/** QEMU's check_refcounts_l2. */
/**
 * QEMU's check_refcounts_l2. `memo` holds the effect of tables this L1 table refers to more than
 * once (only a corrupt image does that): a repeated visit replays it instead of walking again,
 * so an L1 table full of pointers to one cluster costs one walk, not one per entry.
 */
export async function checkRefcountsL2(c: CheckContext, res: CheckCounters, l2Offset: number, fragInfo: boolean, fix: FixMode, active: boolean, memo: Map<number, L2WalkEffect> | undefined): Promise<void> {
  const g = c.image.geometry;
  if (l2Offset >= c.fileBytes) return; // reads as zeros: no entry to count or flag
  const replay = memo?.get(l2Offset);
  if (replay) {
    for (const line of replay.messages) c.log(line);
    res.corruptions += replay.corruptions;
    res.allocatedClusters += replay.allocatedClusters;
    res.fragmentedClusters += replay.fragmentedClusters;
    res.compressedClusters += replay.compressedClusters;
    for (let k = 0; k < replay.incs.length; k += 2) c.incRefcounts(res, replay.incs[k], replay.incs[k + 1]);
    return;
  }
  const table = await c.read(l2Offset, g.clusterSize);
  const before = { ...res };
  const recording: L2WalkRecording | undefined = memo ? { messages: [], incs: [], incCorruptions: 0 } : undefined;
  c.recording = recording;
  const zeroed: ZeroedEntries = { count: 0, first: Number.POSITIVE_INFINITY, last: -1 };
  try {
    await countL2Entries(c, res, l2Offset, table, fragInfo, fix, active, zeroed);
  } finally {
    c.recording = undefined;
    if (zeroed.count > 0) {
      memo?.clear(); // the file changes: recorded walks may be stale
      await writeZeroedEntries(c, res, l2Offset, table, zeroed);
    }
  }
  if (memo && recording && res.corruptionsFixed === before.corruptionsFixed && res.checkErrors === before.checkErrors) {
    memo.set(l2Offset, {
      messages: recording.messages,
      incs: recording.incs,
      corruptions: res.corruptions - before.corruptions - recording.incCorruptions,
      allocatedClusters: res.allocatedClusters - before.allocatedClusters,
      fragmentedClusters: res.fragmentedClusters - before.fragmentedClusters,
      compressedClusters: res.compressedClusters - before.compressedClusters,
    });
  }
}

/** The per-entry part of check_refcounts_l2. */
export async function countL2Entries(c: CheckContext, res: CheckCounters, l2Offset: number, table: Buffer, fragInfo: boolean, fix: FixMode, active: boolean, zeroed: ZeroedEntries): Promise<void> {
  const g = c.image.geometry;
  const hasDataFile = c.image.hasDataFile;
  let nextContiguous = 0;
  for (let i = nextNonZeroEntry(table, 0, g.l2EntryBytes, g.l2Entries); i < g.l2Entries; i = nextNonZeroEntry(table, i + 1, g.l2EntryBytes, g.l2Entries)) {
    const e = readL2Entry(table, i, g);
    const kind = clusterKind(e, g, hasDataFile);
    if (kind !== 'compressed' && ((e.hi & 0x3f000000) !== 0 || (e.lo & 0x1fe) !== 0)) {
      if (c.verbose) c.note(`ERROR found l2 entry with reserved bits set: ${rawHex(e.hi, e.lo)}`);
      res.corruptions++;
    }
    switch (kind) {
      case 'compressed': {
        let entry = e;
        if ((e.hi & 0x80000000) !== 0) {
          const d = decodeCompressed(e, g);
          if (c.verbose) c.note(`ERROR: coffset=0x${hex(d.hostOffset)}: copied flag must never be set for compressed clusters`);
          entry = { ...e, hi: (e.hi & 0x7fffffff) >>> 0 };
          res.corruptions++;
        }
        if (hasDataFile) {
          if (c.verbose) c.note(`ERROR compressed cluster ${i} with data file, entry=0x${rawHex(entry.hi, entry.lo)}`);
          res.corruptions++;
          break;
        }
        if (e.allocBitmap !== 0 || e.zeroBitmap !== 0) {
          if (c.verbose) c.note(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${rawHex(entry.hi, entry.lo)}`);
          res.corruptions++;
          break;
        }
        const d = decodeCompressed(entry, g);
        c.incRefcounts(res, d.hostOffset, d.compressedBytes);
        if (fragInfo) {
          res.allocatedClusters++;
          res.compressedClusters++;
          res.fragmentedClusters++;
        }
        break;
      }
      case 'zero-alloc':
      case 'normal': {
        const offset = l2HostOffset(e);
        if ((e.zeroBitmap & e.allocBitmap) !== 0) {
          res.corruptions++;
          if (c.verbose) c.note(`ERROR offset=${hex(offset)}: Allocated cluster has corrupted subcluster allocation bitmap`);
        }
        if (offset % g.clusterSize !== 0) {
          res.corruptions++;
          const containsData = g.extendedL2 ? e.allocBitmap !== 0 : (e.lo & 1) === 0;
          if (!containsData) {
            if (c.verbose) c.note(`${fix.errors ? 'Repairing' : 'ERROR'} offset=${hex(offset)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
            if (fix.errors) {
              if (fixL2EntryByZero(c, res, l2Offset, table, i, active, zeroed) === 'overlap') throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
              continue;
            }
          } else {
            if (c.verbose) c.note(`ERROR offset=${hex(offset)}: Data cluster is not properly aligned; L2 entry corrupted.`);
          }
        }
        if (fragInfo) {
          res.allocatedClusters++;
          if (nextContiguous !== 0 && offset !== nextContiguous) res.fragmentedClusters++;
          nextContiguous = offset + g.clusterSize;
        }
        if (!hasDataFile) c.incRefcounts(res, offset, g.clusterSize);
        break;
      }
      case 'zero-plain':
        break;
      case 'unallocated':
        if (e.allocBitmap !== 0) {
          res.corruptions++;
          if (c.verbose) c.note('ERROR: Unallocated cluster has non-zero subcluster allocation map');
        }
        break;
    }
  }
}

/**
 * QEMU's fix_l2_entry_by_zero: make an entry read as zeros (in `table`, recorded in `zeroed` for
 * writeZeroedEntries). Returns 'overlap' when the write would land on other metadata (the table
 * is not checked further).
 */
export function fixL2EntryByZero(c: CheckContext, res: CheckCounters, l2Offset: number, table: Buffer, index: number, active: boolean, zeroed: ZeroedEntries): 'fixed' | 'overlap' {
  const g = c.image.geometry;
  const old = readL2Entry(table, index, g);
  const zero: RawL2Entry = g.extendedL2
    ? { hi: 0, lo: 0, allocBitmap: 0, zeroBitmap: (old.zeroBitmap | old.allocBitmap) >>> 0 }
    : { hi: 0, lo: 1, allocBitmap: 0, zeroBitmap: 0 };
  writeL2Entry(table, index, g, zero);
  const entryOffsetBytes = l2Offset + index * g.l2EntryBytes;
  if (overlapsMetadata(c.image, entryOffsetBytes, g.l2EntryBytes, active ? 'l2' : undefined, 'L2 entry')) {
    if (c.verbose) c.log('ERROR: Overlap check failed');
    res.checkErrors++;
    return 'overlap';
  }
  // QEMU writes and syncs each entry; ours go out together after the walk (writeZeroedEntries).
  zeroed.count++;
  zeroed.first = Math.min(zeroed.first, index);
  zeroed.last = Math.max(zeroed.last, index);
  res.corruptions--;
  res.corruptionsFixed++;
  return 'fixed';
}

/** Write the entries fixL2EntryByZero changed in `table` (one write, synced); a failure undoes their count. */
export async function writeZeroedEntries(c: CheckContext, res: CheckCounters, l2Offset: number, table: Buffer, zeroed: ZeroedEntries): Promise<void> {
  if (zeroed.count === 0) return;
  const bytes = c.image.geometry.l2EntryBytes;
  try {
    await c.image.file.pwrite(table.subarray(zeroed.first * bytes, (zeroed.last + 1) * bytes), l2Offset + zeroed.first * bytes, 'l2');
    await c.image.file.fdatasync();
  } catch (err) {
    if (c.verbose) c.log(`ERROR: Failed to overwrite L2 table entry: ${err instanceof Error ? err.message : String(err)}`);
    res.checkErrors += zeroed.count;
    res.corruptions += zeroed.count;
    res.corruptionsFixed -= zeroed.count;
  }
  c.forgetL2(l2Offset);
}
