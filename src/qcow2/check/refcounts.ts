/**
 * QEMU's qcow2_check_refcounts: calculate_refcounts (every pass that counts references) then
 * compare_refcounts, the rebuild of the refcount structure when -r all needs it, and check_oflag_copied.
 */
import { QCOW_MAX_L1_SIZE_BYTES } from '../format/constants.js';
import { checkBitmaps } from './bitmaps.js';
import { compareRefcounts } from './compare.js';
import type { CheckContext } from './context.js';
import { checkOflagCopied } from './copied.js';
import { type CheckCounters, type FixMode, hex, NO_FIX, zeroCounters } from './counters.js';
import { checkRefcountsL1 } from './l1-l2.js';
import { checkRefblocks } from './refblocks.js';
import { CheckAbortError, ERRNO_TEXT, rebuildRefcountStructure, RefcountArray } from './repair.js';

const MAX_CHECK_CLUSTERS = 0x7fffffff;

/** QEMU's qcow2_check_refcounts. */
export async function checkRefcounts(c: CheckContext, res: CheckCounters): Promise<void> {
  const image = c.image;
  const g = image.geometry;
  const cs = c.clusterSize;
  await c.refreshFileBytes();
  const nbClusters = Math.ceil(c.fileBytes / cs);
  if (nbClusters > MAX_CHECK_CLUSTERS) {
    res.checkErrors++;
    throw new CheckAbortError('EFBIG', ERRNO_TEXT.EFBIG);
  }
  res.totalClusters = Math.ceil((Math.floor(image.virtualSize / 512) * 512) / cs);
  try {
    c.refs = new RefcountArray(g.refcountOrder, g.maxRefcount, nbClusters);
  } catch (err) {
    res.checkErrors++;
    throw err;
  }
  c.progressTotal = image.activeMap.l1.entries + c.snapshots.reduce((n, s) => n + Math.min(s.entry.l1Entries, QCOW_MAX_L1_SIZE_BYTES / 8), 0)
    + Math.ceil(nbClusters / g.refblockEntries);
  const rebuild = { needed: false };
  await calculateRefcounts(c, res, c.fix, rebuild);
  const preCompare = { ...res };
  let highest = await compareRefcounts(c, res, { ...NO_FIX, beyondEnd: c.fix.beyondEnd }, rebuild);
  if (rebuild.needed && c.fix.errors) {
    const old = { ...res };
    let freshLeaks = 0;
    if (c.verbose) c.log('Rebuilding refcount structure');
    try {
      await rebuildRefcountStructure(image, c.refs);
    } catch (err) {
      res.checkErrors++;
      throw err;
    }
    c.changedLayout = true;
    await c.refreshFileBytes();
    res.corruptions = 0;
    res.leaks = 0;
    rebuild.needed = false;
    c.refs.clear();
    await calculateRefcounts(c, res, NO_FIX, rebuild);
    if (c.fix.leaks) {
      const saved = { ...res };
      Object.assign(res, zeroCounters());
      highest = await compareRefcounts(c, res, { leaks: true, errors: false, beyondEnd: c.fix.beyondEnd }, rebuild);
      if (rebuild.needed) c.log('ERROR rebuilt refcount structure is still broken');
      freshLeaks = res.leaks;
      Object.assign(res, saved);
    }
    if (res.corruptions < old.corruptions) res.corruptionsFixed += old.corruptions - res.corruptions;
    if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
    res.leaks += freshLeaks;
  } else if (c.fix.leaks || c.fix.errors) {
    if (rebuild.needed) {
      if (c.verbose) c.log('ERROR need to rebuild refcount structures');
      res.checkErrors++;
      throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
    }
    if (res.leaks > 0 || res.corruptions > 0) {
      Object.assign(res, preCompare);
      highest = await compareRefcounts(c, res, c.fix, rebuild);
    }
  }
  await checkOflagCopied(c, res, c.fix);
  res.imageEndOffset = (highest + 1) * cs;
}

/** QEMU's calculate_refcounts: count every reference into `c.refs`. */
export async function calculateRefcounts(c: CheckContext, res: CheckCounters, fix: FixMode, rebuild: { needed: boolean }): Promise<void> {
  const image = c.image;
  const cs = c.clusterSize;
  c.incRefcounts(res, 0, cs);
  // A live image's compressed writer holds one reference on each host cluster it is still filling;
  // no table holds it (QEMU has no such state). Counted, it is neither a leak nor something to "fix".
  for (const hostOffset of image.heldHostClustersLocked()) c.incRefcounts(res, hostOffset, cs);
  await checkRefcountsL1(c, res, image.activeMap.l1.offset, image.activeMap.l1.entries, true, fix, true);
  if (image.hasDataFile && c.snapshots.length > 0) {
    if (c.verbose) c.log(`ERROR ${c.snapshots.length} snapshots in image with data file`);
    res.corruptions++;
  }
  for (const s of c.snapshots) {
    if (s.l1OffsetRaw % BigInt(cs) !== 0n) {
      if (c.verbose) c.log(`ERROR snapshot ${s.entry.id} (${s.entry.name}) l1_offset=0x${hex(s.l1OffsetRaw)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
      res.corruptions++;
      continue;
    }
    if (s.entry.l1Entries > QCOW_MAX_L1_SIZE_BYTES / 8) {
      if (c.verbose) c.log(`ERROR snapshot ${s.entry.id} (${s.entry.name}) l1_size=0x${hex(s.entry.l1Entries)}: L1 table is too large; snapshot table entry corrupted`);
      res.corruptions++;
      continue;
    }
    await checkRefcountsL1(c, res, Number(s.l1OffsetRaw), s.entry.l1Entries, false, fix, false);
  }
  c.incRefcounts(res, c.snapshotsOffset, c.snapshotsBytes);
  c.incRefcounts(res, image.refcounts.reftableOffset, image.refcounts.reftableClusters * cs);
  await checkBitmaps(c, res);
  await checkRefblocks(c, res, fix, rebuild);
}
