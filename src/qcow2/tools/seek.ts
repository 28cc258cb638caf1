/**
 * lseek(2)'s SEEK_DATA / SEEK_HOLE over an image's guest contents, answered from the allocation map
 * (the block status qemu-img map reports, map.ts): L2 tables and the backing chain are walked, no data
 * is read. "Data" is what `qemu-img map` reports as "data": true — allocated clusters of any layer of
 * the chain, including data a backing file shows through; zero clusters, and unallocated ranges
 * with nothing below them, are holes. Granularity is the cluster (subcluster with extended L2), so a
 * hole is never smaller than what qemu-img map shows.
 */
import type { ClusterMap } from '../engine/cluster-map.js';
import type { Qcow2Image } from '../engine/image.js';
import type { HostAllocationProbe } from '../../io/host-allocation.js';
import { blockStatusReader } from './map.js';

/** What to look for: the next byte of data, or the next byte of a hole. */
export type SeekTarget = 'data' | 'hole';

export interface SeekOptions {
  /** Host allocation facts, as for the map (without it host files count as fully allocated data). */
  probe?: HostAllocationProbe;
  /** The top layer's mapping (default: the image's active L1; a snapshot view passes its own). */
  topMap?: ClusterMap;
  /** Guest bytes the answer is bounded by (default: the image's virtual size). */
  endBytes?: number;
}

/**
 * The first guest offset ≥ `guestOffset` where `target` starts, or undefined when there is none before
 * the end. Everything past the end counts as a hole, so a search for a hole from inside the range
 * always succeeds (at the end, at the latest). The caller checks `guestOffset` against the size.
 */
export async function seekAllocation(image: Qcow2Image, guestOffset: number, target: SeekTarget, options: SeekOptions = {}): Promise<number | undefined> {
  const endBytes = options.endBytes ?? image.virtualSize;
  const status = blockStatusReader(image, { probe: options.probe, topMap: options.topMap });
  let pos = guestOffset;
  while (pos < endBytes) {
    const extent = await status(pos, endBytes - pos);
    if (extent.length === 0) break; // past the top layer's end: reads as zeros
    if (extent.data === (target === 'data')) return pos;
    pos += extent.length;
  }
  return target === 'hole' ? Math.max(guestOffset, endBytes) : undefined;
}
