/**
 * lseek(2)'s SEEK_DATA / SEEK_HOLE over an image's guest contents, answered from the allocation map
 * (the block status qemu-img map reports, map.ts): L2 tables and the backing chain are walked, no data
 * is read. "Data" is what `qemu-img map` reports as "data": true — allocated clusters of any layer of
 * the chain, including data a backing file shows through; zero clusters, and unallocated ranges
 * with nothing below them, are holes. Granularity is the cluster (subcluster with extended L2), so a
 * hole is never smaller than what qemu-img map shows.
 *
 * One difference from the map, for speed: QEMU's metadata-preallocation heuristic (a scan of the
 * refcounts, then host-file holes behind data clusters) is skipped — it would run on every lseek. So
 * unwritten clusters of a metadata-preallocated image count as data, which lseek allows (a hole may
 * always be reported as data). Holes of a raw backing file are still found.
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

/** `probe` without st_blocks, which makes the map skip its metadata-preallocation scan. */
function withoutPreallocationScan(probe: HostAllocationProbe): HostAllocationProbe {
  return {
    allocatedBytes: async () => undefined,
    sizeBytes: (path) => probe.sizeBytes(path),
    extentAt: (path, hostOffset) => probe.extentAt(path, hostOffset),
    close: () => undefined,
  };
}

/**
 * The first guest offset ≥ `guestOffset` where `target` starts, or undefined when there is none before
 * the end. Everything past the end counts as a hole, so a search for a hole from inside the range
 * always succeeds (at the end, at the latest). The caller checks `guestOffset` against the size.
 */
export async function seekAllocation(image: Qcow2Image, guestOffset: number, target: SeekTarget, options: SeekOptions = {}): Promise<number | undefined> {
  const endBytes = options.endBytes ?? image.virtualSize;
  const probe = options.probe === undefined ? undefined : withoutPreallocationScan(options.probe);
  const status = blockStatusReader(image, { probe, topMap: options.topMap });
  let pos = guestOffset;
  while (pos < endBytes) {
    const extent = await status(pos, endBytes - pos);
    if (extent.length === 0) break; // past the top layer's end: reads as zeros
    if (extent.data === (target === 'data')) return pos;
    pos += extent.length;
  }
  return target === 'hole' ? Math.max(guestOffset, endBytes) : undefined;
}
