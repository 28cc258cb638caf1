/**
 * The compare pass (QEMU's compare_refcounts): the refcounts on disk against the references counted —
 * lower on disk is a corruption, higher a leak — fixing them as the repair mode allows.
 */
import { getRefcount } from '../format/refcount-block.js';
import type { CheckContext } from './context.js';
import type { CheckCounters, FixMode } from './counters.js';
import { ERRNO_TEXT } from './repair.js';

/** QEMU's compare_refcounts; returns the highest cluster index in use (on disk or by reference). */
export async function compareRefcounts(c: CheckContext, res: CheckCounters, fix: FixMode, rebuild: { needed: boolean }): Promise<number> {
  const g = c.image.geometry;
  const cs = c.clusterSize;
  let highest = 0;
  const nbClusters = c.refs.size;
  for (let ri = 0; ri * g.refblockEntries < nbClusters; ri++) {
    const block = await c.readRefblock(ri);
    const end = Math.min(nbClusters, (ri + 1) * g.refblockEntries);
    for (let i = ri * g.refblockEntries; i < end; i++) {
      if (block === 'error') {
        if (c.verbose) c.log(`Can't get refcount for cluster ${i}: ${ERRNO_TEXT.EIO}`);
        res.checkErrors++;
        continue;
      }
      const onDisk = block === undefined ? 0 : getRefcount(block, g.refblockIndex(i), g.refcountOrder);
      const counted = c.refs.get(i);
      if (onDisk > 0 || counted > 0) highest = i;
      if (onDisk === counted) continue;
      let fixKind: 'leak' | 'corruption' | undefined;
      if (onDisk === 0) rebuild.needed = true;
      else if (onDisk > counted && fix.leaks) fixKind = 'leak';
      else if (onDisk < counted && fix.errors) fixKind = 'corruption';
      if (c.verbose) c.log(`${fixKind !== undefined ? 'Repairing' : onDisk < counted ? 'ERROR' : 'Leaked'} cluster ${i} refcount=${onDisk} reference=${counted}`);
      if (fixKind !== undefined) {
        try {
          await c.image.refcounts.updateRefcount(i * cs, cs, counted - onDisk);
          if (fixKind === 'leak') res.leaksFixed++;
          else res.corruptionsFixed++;
          continue;
        } catch {
          // counted below as not fixed
        }
      }
      if (onDisk < counted) {
        res.corruptions++;
      } else {
        res.leaks++;
      }
    }
    c.progress(1);
  }
  if (fix.beyondEnd === true) highest = Math.max(highest, await compareBeyondEnd(c, res, fix, nbClusters));
  return highest;
}

/**
 * FixMode.beyondEnd: clusters from `fromCluster` on (past the file and every reference) that a
 * refcount block still counts are leaks. Only blocks that are sound — inside the file and counted
 * exactly once, as the refcount block they are — are read: a damaged table entry must not make the
 * repair read (or fix) arbitrary clusters as refcounts, nor scan terabytes of them.
 */
export async function compareBeyondEnd(c: CheckContext, res: CheckCounters, fix: FixMode, fromCluster: number): Promise<number> {
  const g = c.image.geometry;
  const cs = c.clusterSize;
  const table = c.image.refcounts.reftable;
  const fileClusters = Math.ceil(c.fileBytes / cs);
  let highest = 0;
  for (let ri = Math.floor(fromCluster / g.refblockEntries); ri < table.length; ri++) {
    const offset = table[ri];
    if (offset <= 0 || offset % cs !== 0 || offset / cs >= fileClusters || c.refs.get(offset / cs) !== 1) continue;
    const block = await c.readRefblock(ri);
    if (block === undefined || block === 'error') continue;
    for (let i = Math.max(fromCluster, ri * g.refblockEntries); i < (ri + 1) * g.refblockEntries; i++) {
      const onDisk = getRefcount(block, g.refblockIndex(i), g.refcountOrder);
      if (onDisk === 0) continue;
      highest = i;
      if (c.verbose) c.log(`${fix.leaks ? 'Repairing' : 'Leaked'} cluster ${i} refcount=${onDisk} reference=0`);
      if (fix.leaks) {
        try {
          await c.image.refcounts.updateRefcount(i * cs, cs, -onDisk);
          res.leaksFixed++;
          continue;
        } catch {
          // counted below as not fixed
        }
      }
      res.leaks++;
    }
  }
  return highest;
}
