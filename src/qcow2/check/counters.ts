/**
 * What a check pass counts (QEMU's BdrvCheckResult) and which repairs it may do.
 */

/** Which repairs a pass may do (QEMU's BDRV_FIX_LEAKS / BDRV_FIX_ERRORS). */
export interface FixMode {
  leaks: boolean;
  errors: boolean;
  /**
   * Also compare the refcounts of clusters past the end of the file that existing refcount blocks
   * describe (leaks there are fixed with `leaks`). qemu-img check compares only clusters inside the
   * file; the repair of a dirty image uses this, because with lazy refcounts a crash can leave a
   * refcount block written for a cluster whose write never extended the file — a leak no check
   * sees until the file grows over it.
   */
  beyondEnd?: boolean;
}

export const NO_FIX: FixMode = { leaks: false, errors: false };

/** QEMU's BdrvCheckResult. */
export interface CheckCounters {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

export function zeroCounters(): CheckCounters {
  return {
    checkErrors: 0, corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, imageEndOffset: 0,
    totalClusters: 0, allocatedClusters: 0, fragmentedClusters: 0, compressedClusters: 0,
  };
}

/** QEMU's qcow2_add_check_result. */
export function addCounters(out: CheckCounters, src: CheckCounters, allocationInfo: boolean): void {
  out.corruptions += src.corruptions;
  out.leaks += src.leaks;
  out.checkErrors += src.checkErrors;
  out.corruptionsFixed += src.corruptionsFixed;
  out.leaksFixed += src.leaksFixed;
  if (allocationInfo) {
    out.imageEndOffset = src.imageEndOffset;
    out.totalClusters = src.totalClusters;
    out.allocatedClusters = src.allocatedClusters;
    out.fragmentedClusters = src.fragmentedClusters;
    out.compressedClusters = src.compressedClusters;
  }
}

export function hex(value: number | bigint): string {
  return value.toString(16);
}

export function rawHex(hi: number, lo: number): string {
  return ((BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)).toString(16);
}
