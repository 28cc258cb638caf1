/**
 * Zeroing a guest range exactly, for fallocate(2)'s PUNCH_HOLE and ZERO_RANGE on a mounted image.
 *
 * Qcow2Image.discard is QEMU's discard: a hint on whole clusters only (partial clusters are left as
 * they are) that lets a backing file show through again on a v2 image. A punched hole must read as
 * zeros, exactly and only there, so:
 * - the whole clusters in the middle are discarded when that makes them read as zeros (v3: zero
 *   clusters where a backing file would show through, unallocated otherwise; v2 without a backing
 *   file: unallocated) and their storage released; otherwise (v2 over a backing file, a raw external
 *   data file) they are written as zeros;
 * - a partial cluster at either edge is zeroed as a whole cluster when the rest of it already reads
 *   as zeros (as QEMU's qcow2 write-zeroes extends a request whose head and tail are zero), left alone
 *   when the part already reads as zeros, and otherwise written with zero bytes (read-modify-write of
 *   the cluster: zeros exactly in the range, the rest untouched).
 * A range that already reads as zeros is left alone (a trim of free space allocates nothing).
 * "Reads as zeros" comes from the allocation map (seek.ts), not from reading data. The caller keeps
 * other writes out of the edge clusters while this runs (the check and the zeroing are two steps).
 */
import { AUTOCLEAR_DATA_FILE_RAW } from '../format/constants.js';
import { hasBit } from '../format/header.js';
import type { Qcow2Image } from '../engine/image.js';
import type { HostAllocationProbe } from '../../io/host-allocation.js';
import { seekAllocation } from './seek.js';

export interface ZeroRangeOptions {
  /** Release storage (punch a hole) rather than keep the range allocated as zeros. */
  unmap: boolean;
  probe?: HostAllocationProbe;
}

/** True when a discarded whole cluster of `image` reads as zeros afterwards. */
function discardReadsZeros(image: Qcow2Image): boolean {
  const dataFileRaw = image.hasDataFile && hasBit(image.header.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW);
  return !dataFileRaw && (image.header.version >= 3 || image.backing === undefined);
}

/** True when [start, end) reads as zeros (holds no data, per the allocation map). */
async function readsZeros(image: Qcow2Image, start: number, end: number, probe: HostAllocationProbe | undefined): Promise<boolean> {
  return start >= end || (await seekAllocation(image, start, 'data', { endBytes: end, probe })) === undefined;
}

/**
 * Zero the part [start, end) of the cluster [clusterStart, clusterEnd). Returns true when the caller
 * should zero the whole cluster instead (the rest of it reads as zeros already).
 */
async function zeroEdge(image: Qcow2Image, clusterStart: number, clusterEnd: number, start: number, end: number, probe: HostAllocationProbe | undefined): Promise<boolean> {
  if (await readsZeros(image, clusterStart, start, probe) && await readsZeros(image, end, clusterEnd, probe)) return true;
  if (!(await readsZeros(image, start, end, probe))) await image.writeZeroes(start, end - start);
  return false;
}

/** Make [guestOffset, +bytes) of `image` read as zeros (see the module comment). */
export async function zeroRange(image: Qcow2Image, guestOffset: number, bytes: number, options: ZeroRangeOptions): Promise<void> {
  if (bytes === 0) return;
  await image.settle();
  if (await readsZeros(image, guestOffset, guestOffset + bytes, options.probe)) return;
  const clusterSize = image.geometry.clusterSize;
  const virtualSize = image.virtualSize;
  let start = guestOffset;
  let stop = guestOffset + bytes;
  const headStart = start - (start % clusterSize);
  const headEnd = Math.min(headStart + clusterSize, virtualSize);
  if (start > headStart || stop < headEnd) {
    const partEnd = Math.min(stop, headEnd);
    if (await zeroEdge(image, headStart, headEnd, start, partEnd, options.probe)) {
      start = headStart;
      stop = Math.max(stop, headEnd);
    } else {
      start = partEnd;
    }
  }
  if (stop > start) {
    const tailStart = stop - 1 - ((stop - 1) % clusterSize);
    const tailEnd = Math.min(tailStart + clusterSize, virtualSize);
    if (stop < tailEnd) {
      const partStart = Math.max(start, tailStart);
      if (await zeroEdge(image, tailStart, tailEnd, partStart, stop, options.probe)) stop = tailEnd;
      else stop = partStart;
    }
  }
  if (stop <= start) return;
  if (options.unmap && discardReadsZeros(image)) await image.discard(start, stop - start);
  else await image.writeZeroes(start, stop - start);
}
