/**
 * The COPIED pass (QEMU's check_oflag_copied): the COPIED flag must be set exactly where the refcount
 * is 1, in the active L1 table and its L2 tables.
 */
import { clusterKind, entryOffset, l2HostOffset, readL2Entry, writeL2Entry } from '../format/l2-entry.js';
import { nextNonZeroEntry } from '../format/table-scan.js';
import { type CheckContext, repeatedTables } from './context.js';
import { type CheckCounters, type FixMode, rawHex } from './counters.js';
import { CheckAbortError, ERRNO_TEXT, overlapsMetadata } from './repair.js';

/** QEMU's check_oflag_copied: COPIED must be set exactly where the refcount is 1 (active L1 and L2). */
export async function checkOflagCopied(c: CheckContext, res: CheckCounters, fix: FixMode): Promise<void> {
  const image = c.image;
  const g = image.geometry;
  const repair = fix.errors ? true : fix.leaks ? res.checkErrors === 0 && res.corruptions === 0 && res.leaks === 0 : false;
  const refcountOf = c.refcountReader();
  const l1 = image.activeMap.l1;
  const repeated = repeatedTables(l1.buf, l1.entries);
  /** Mismatches found in tables listed more than once (replayed, not re-walked, while nothing was rewritten). */
  const memo = new Map<number, { messages: string[]; mismatches: number }>();
  for (let i = 0; i < l1.entries; i++) {
    const hi = l1.buf.readUInt32BE(i * 8);
    const lo = l1.buf.readUInt32BE(i * 8 + 4);
    const l2Offset = entryOffset(hi, lo);
    if (l2Offset === 0) continue;
    const refcount = await refcountOf(g.clusterIndex(l2Offset));
    if (refcount === 'error') continue;
    const copied = (hi & 0x80000000) !== 0;
    if ((refcount === 1) !== copied) {
      res.corruptions++;
      if (c.verbose) c.log(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${rawHex(hi, lo)} refcount=${refcount}`);
      if (repair) {
        l1.buf.writeUInt32BE(refcount === 1 ? (hi | 0x80000000) >>> 0 : (hi & 0x7fffffff) >>> 0, i * 8);
        await writeL1Entry(c, res, i);
        res.corruptions--;
        res.corruptionsFixed++;
      }
    }
    const replay = memo.get(l2Offset);
    if (replay) {
      for (const line of replay.messages) c.log(line);
      res.corruptions += replay.mismatches;
      continue;
    }
    const table = await c.read(l2Offset, g.clusterSize);
    const messages: string[] = [];
    let dirty = 0;
    let mismatches = 0;
    for (let j = nextNonZeroEntry(table, 0, g.l2EntryBytes, g.l2Entries); j < g.l2Entries; j = nextNonZeroEntry(table, j + 1, g.l2EntryBytes, g.l2Entries)) {
      const e = readL2Entry(table, j, g);
      const kind = clusterKind(e, g, image.hasDataFile);
      if (kind !== 'normal' && kind !== 'zero-alloc') continue;
      const dataRefcount = image.hasDataFile ? 1 : await refcountOf(g.clusterIndex(l2HostOffset(e)));
      if (dataRefcount === 'error') continue;
      const dataCopied = (e.hi & 0x80000000) !== 0;
      if ((dataRefcount === 1) !== dataCopied) {
        res.corruptions++;
        mismatches++;
        const line = `${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${rawHex(e.hi, e.lo)} refcount=${dataRefcount}`;
        messages.push(line);
        if (c.verbose) c.log(line);
        if (repair) {
          writeL2Entry(table, j, g, { ...e, hi: dataRefcount === 1 ? (e.hi | 0x80000000) >>> 0 : (e.hi & 0x7fffffff) >>> 0 });
          dirty++;
        }
      }
    }
    if (dirty > 0) {
      if (overlapsMetadata(image, l2Offset, g.clusterSize, 'l2', 'L2 table')) {
        if (c.verbose) c.log(`ERROR: Could not write L2 table; metadata overlap check failed: ${ERRNO_TEXT.EIO}`);
        res.checkErrors++;
        throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
      }
      try {
        await image.file.pwrite(table, l2Offset, 'l2');
      } catch (err) {
        if (c.verbose) c.log(`ERROR: Could not write L2 table: ${err instanceof Error ? err.message : String(err)}`);
        res.checkErrors++;
        throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
      }
      c.forgetL2(l2Offset);
      res.corruptions -= dirty;
      res.corruptionsFixed += dirty;
      memo.clear(); // the file changed: recorded tables may be stale
    } else if (repeated?.has(l2Offset) === true) {
      memo.set(l2Offset, { messages, mismatches });
    }
  }
}

/** QEMU's qcow2_write_l1_entry: the 512-byte group of entries around `index`, synced. */
export async function writeL1Entry(c: CheckContext, res: CheckCounters, index: number): Promise<void> {
  const l1 = c.image.activeMap.l1;
  const first = index - (index % 64);
  const count = Math.min(64, l1.entries - first);
  const offset = l1.offset + first * 8;
  try {
    if (overlapsMetadata(c.image, offset, count * 8, 'l1', 'L1 table')) throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
    await c.image.file.pwrite(l1.buf.subarray(first * 8, (first + count) * 8), offset, 'l1');
    await c.image.file.fdatasync();
  } catch {
    res.checkErrors++;
    throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
  }
}
