/**
 * Consistency check and repair with `qemu-img check` semantics (QEMU 7.2 block/qcow2-refcount.c:
 * qcow2_check_refcounts with calculate_refcounts, check_refcounts_l1/l2, check_refblocks,
 * compare_refcounts, check_oflag_copied, rebuild_refcount_structure; qcow2-snapshot.c: the snapshot
 * table check; qcow2-bitmap.c: bitmap refcounts; qcow2.c qcow2_co_check_locked; qemu-img.c img_check).
 *
 * The check counts, in memory, every reference to every host cluster (header, L1 tables, L2 tables,
 * data and compressed clusters — a compressed chunk holds every host cluster its 512-byte-sector
 * range overlaps —, refcount table and blocks, snapshot table, snapshot L1s, bitmaps) and compares
 * that with the refcounts on disk: lower on disk is a corruption, higher a leak. Entries that point
 * outside the file or are unaligned, reserved bits, wrong COPIED flags, bad compressed descriptors
 * and a broken snapshot table are corruptions too. `-r leaks` frees leaks; `-r all` also fixes
 * corruptions and rebuilds the refcount structure when it cannot be trusted.
 *
 * The passes live in their own modules, as in QEMU's qcow2-refcount.c: snapshot-table.ts, l1-l2.ts,
 * refblocks.ts, bitmaps.ts, compare.ts, copied.ts, driven by refcounts.ts (qcow2_check_refcounts);
 * context.ts holds the state a pass shares, repair.ts what the repairs write.
 *
 * Tables are read from the file (the image's caches are written back first), so a check of a live
 * image sees what is on disk; it runs under the image's metadata lock.
 */
import type { CheckReport } from '../engine/block-device.js';
import { imageState, type Qcow2Image } from '../engine/image.js';
import type { ImageState } from '../engine/state.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from '../format/constants.js';
import { CodedError } from '../format/errors.js';
import { withBit } from '../format/header.js';
import { CheckContext } from './context.js';
import { addCounters, NO_FIX, zeroCounters, type CheckCounters, type FixMode } from './counters.js';
import { checkRefcounts } from './refcounts.js';
import { CheckAbortError, ERRNO_TEXT, type CheckAbortCode } from './repair.js';
import { fixSnapshotTable, readSnapshotTable, snapshotEntries } from './snapshot-table.js';

export type { CheckCounters, FixMode } from './counters.js';

export type RepairMode = 'leaks' | 'all';

export interface CheckOptions {
  /** 'leaks' frees leaked clusters; 'all' also fixes corruptions (qemu-img check -r). */
  repair?: RepairMode;
  /** Progress in work units (L1 entries walked, refcount blocks compared). */
  onProgress?: (done: number, total: number) => void;
  /** qemu-img's diagnostic lines ("ERROR cluster 3 refcount=0 reference=1", "Leaked cluster …"). */
  onMessage?: (line: string) => void;
}

/** The result, with exactly the keys of `qemu-img check --output=json` (zero counts omitted as qemu does). */
export type CheckResult = CheckReport;

/** The check could not run to its end (qemu-img: "Check failed: …", exit 1); `counters` as far as it got. */
export class CheckFailedError extends CodedError {
  readonly counters: CheckCounters;
  readonly reason: string;
  constructor(code: CheckAbortCode, reason: string, counters: CheckCounters) {
    super(code, `Check failed: ${reason}`, { counters });
    this.counters = counters;
    this.reason = reason;
  }
}

/** Write back the image's table caches so the check reads from the file what the image holds. */
async function writeBackCaches(image: ImageState): Promise<void> {
  if (image.file.readOnly) return;
  await image.l2Cache.flush();
  await image.refcountCache.flush();
  await image.file.fdatasync();
}

/**
 * One check pass with QEMU's qcow2_co_check_locked semantics: the snapshot table, the refcounts, the
 * snapshot table repair; with repairs and no corruption left, the dirty and corrupt bits are
 * cleared. The caller holds the image's metadata lock. Throws CheckFailedError when the check could
 * not run to its end.
 */
export async function checkPassLocked(image: ImageState, fix: FixMode, log?: (line: string) => void, onProgress?: (done: number, total: number) => void): Promise<CheckCounters> {
  const result = zeroCounters();
  const snapshotRes = zeroCounters();
  const refcountRes = zeroCounters();
  const checker = new CheckContext(image, fix, log, onProgress);
  const abort = (err: unknown): never => {
    if (err instanceof CheckAbortError) throw new CheckFailedError(err.errno, ERRNO_TEXT[err.errno], result);
    const message = err instanceof Error ? err.message : String(err);
    result.checkErrors++;
    throw new CheckFailedError('EIO', message, result);
  };
  await writeBackCaches(image);
  try {
    try {
      await readSnapshotTable(checker, snapshotRes);
    } catch (err) {
      addCounters(result, snapshotRes, false);
      return abort(err);
    }
    try {
      await checkRefcounts(checker, refcountRes);
    } catch (err) {
      addCounters(result, refcountRes, true);
      addCounters(result, snapshotRes, false);
      return abort(err);
    }
    addCounters(result, refcountRes, true);
    try {
      await fixSnapshotTable(checker, snapshotRes);
    } finally {
      addCounters(result, snapshotRes, false);
    }
    if (fix.leaks || fix.errors) {
      await writeBackCaches(image);
      if (result.checkErrors === 0 && result.corruptions === 0) await markCleanAndConsistent(image);
    }
  } catch (err) {
    if (err instanceof CheckFailedError) throw err;
    return abort(err);
  } finally {
    // Bring the image's in-memory view in line with what the check read and changed.
    const repairing = fix.leaks || fix.errors;
    const snapshots = snapshotEntries(checker);
    const loaded = snapshots !== undefined && (repairing || (image.snapshots.length === 0 && snapshots.entries.length > 0));
    if (loaded) {
      image.setSnapshotTable(snapshots.entries, snapshots.tableBytes);
    }
    if (repairing) {
      await writeBackCaches(image).catch(() => undefined);
      image.l2Cache.invalidateClean();
      image.refcountCache.invalidateClean();
    }
    if (loaded || repairing || checker.changedLayout) image.registerMetadata();
  }
  return result;
}

/** QEMU's qcow2_mark_clean + qcow2_mark_consistent: clear the dirty and corrupt bits. */
async function markCleanAndConsistent(image: ImageState): Promise<void> {
  const bits = image.header.incompatibleFeatures;
  const cleared = withBit(withBit(bits, INCOMPAT_DIRTY, false), INCOMPAT_CORRUPT, false);
  if (cleared !== bits) await image.updateHeader({ incompatibleFeatures: cleared });
}

/**
 * The report qemu-img prints (collect_image_check): check-errors always, other counts when non-zero;
 * keys in the order qemu-img's JSON lists them (its QDict hash buckets), so JSON.stringify matches.
 */
function toReport(image: ImageState, c: CheckCounters): CheckResult {
  const optional = (value: number): number | undefined => (value !== 0 ? value : undefined);
  const ordered: CheckResult = {
    'image-end-offset': optional(c.imageEndOffset),
    'compressed-clusters': optional(c.compressedClusters),
    'total-clusters': optional(c.totalClusters),
    corruptions: optional(c.corruptions),
    'corruptions-fixed': optional(c.corruptionsFixed),
    'check-errors': c.checkErrors,
    leaks: optional(c.leaks),
    'leaks-fixed': optional(c.leaksFixed),
    'allocated-clusters': optional(c.allocatedClusters),
    filename: image.path,
    format: 'qcow2',
    'fragmented-clusters': optional(c.fragmentedClusters),
  };
  for (const key of Object.keys(ordered) as (keyof CheckResult)[]) if (ordered[key] === undefined) delete ordered[key];
  return ordered;
}

/**
 * Check the image as `qemu-img check [-r leaks|all]` does: one pass with the requested repairs and,
 * when something was fixed, a second read-only pass whose counts are reported together with the
 * numbers fixed. Throws CheckFailedError when the check could not run to its end (qemu-img prints
 * no report then and exits 1), EROFS when a repair is asked of a read-only image.
 */
export async function checkImage(qcow2: Qcow2Image, options: CheckOptions = {}): Promise<CheckResult> {
  const image = imageState(qcow2);
  const fix: FixMode = { leaks: options.repair !== undefined, errors: options.repair === 'all' };
  if ((fix.leaks || fix.errors) && image.readOnly) {
    throw new CodedError('EROFS', `${image.path}: cannot repair an image opened read-only`, { image: image.path });
  }
  const log = options.onMessage;
  return image.lock.run(async () => {
    // A live image may hold overwritten entries whose storage it frees in batches: free them now,
    // or their still-counted references would show as leaks.
    if (!image.readOnly) await image.activeMap.releaseDeferredFrees();
    let counters = await checkPassLocked(image, fix, log, options.onProgress);
    if (counters.corruptionsFixed !== 0 || counters.leaksFixed !== 0) {
      const { corruptionsFixed, leaksFixed } = counters;
      counters = await checkPassLocked(image, NO_FIX, log, options.onProgress);
      counters.corruptionsFixed = corruptionsFixed;
      counters.leaksFixed = leaksFixed;
    }
    return toReport(image, counters);
  });
}
