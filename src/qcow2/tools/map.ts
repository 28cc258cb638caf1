/**
 * The allocation map of an image as `qemu-img map` (QEMU 7.2) reports it: a stream of extents, each
 * saying at which depth of the backing chain the data comes from, whether that layer holds it
 * (present), whether it reads as zeros, whether it is data, whether it is compressed, and — for
 * uncompressed data — the host offset in the file that holds it.
 *
 * The model is QEMU's, step by step, because the output is only equal when every rule is:
 * - qcow2 block status (qcow2_co_block_status / qcow2_get_host_offset): runs of subclusters of one
 *   type (normal, compressed, zero-plain, zero-alloc, unallocated-plain, unallocated-alloc) with
 *   contiguous host offsets; an offset for normal, zero-alloc and unallocated-alloc subclusters;
 * - the generic layer (bdrv_co_block_status): "allocated" when a layer has data or zeros of its own;
 *   an unallocated range reads as zeros without a backing file or past the backing file's end;
 *   raw layers ask the host file (holes read as zeros);
 * - QEMU's metadata-preallocation heuristic (qcow2_detect_metadata_preallocation): when the image
 *   file has clearly fewer host blocks allocated than clusters with a refcount, data clusters are
 *   checked against the host file's holes, so unwritten preallocated clusters show as zero;
 * - qemu-img's loop (get_block_status, entry_mergeable): descend the chain while a range is neither
 *   data nor zero, and merge neighbours with equal flags, depth, file and contiguous offsets.
 * Host-file facts (allocated blocks, holes) come from a HostAllocationProbe; without one, host
 * files are taken as fully allocated data.
 */
import debugFactory from 'debug';
import type { HostAllocationProbe } from '../../io/host-allocation.js';
import type { RawBacking } from '../engine/backing.js';
import type { MapExtent } from '../engine/block-device.js';
import type { ClusterMap } from '../engine/cluster-map.js';
import type { Geometry } from '../format/geometry.js';
import type { Qcow2Image } from '../engine/image.js';
import { clusterKind, decodeCompressed, entryHex, l2HostOffset, readL2Entry, type RawL2Entry } from '../format/l2-entry.js';

/** One extent with the name of the file its offset refers to (qemu-img map's human "File" column). */
export interface MapEntry extends MapExtent {
  filename?: string;
}

export interface MapOptions {
  /** Host allocation facts (st_blocks, holes); without it host files count as fully allocated data. */
  probe?: HostAllocationProbe;
  /** The mapping of the top layer (default: the image's active L1; a snapshot view passes its own). */
  topMap?: ClusterMap;
}

const trace = debugFactory('qcow2fuse:map');

/** qemu-img probes at most this much per block-status call. */
const PROBE_LIMIT_BYTES = 2 ** 30;

// BDRV_BLOCK_* flags (include/block/block-common.h), plus our COMPRESSED.
const DATA = 0x01;
const ZERO = 0x02;
const OFFSET_VALID = 0x04;
const ALLOCATED = 0x10;
const EOF = 0x20;
const RECURSE = 0x40;
const COMPRESSED = 0x80;

/** QEMU's QCow2SubclusterType. */
type SubclusterType = 'normal' | 'compressed' | 'zero-plain' | 'zero-alloc' | 'unallocated-plain' | 'unallocated-alloc' | 'invalid';

interface Qcow2Layer {
  kind: 'qcow2';
  image: Qcow2Image;
  map: ClusterMap;
  /** Guest bytes the layer covers. */
  lengthBytes: number;
  /** Host path of the file holding guest data (the image file or its external data file). */
  dataPath: string;
  /** The name QEMU shows for that file. */
  dataName: string;
  metadataPreallocation?: Promise<boolean>;
}

interface RawLayer {
  kind: 'raw';
  path: string;
  name: string;
  lengthBytes: number;
}

type Layer = Qcow2Layer | RawLayer;

interface Status {
  flags: number;
  bytes: number;
  hostOffset: number;
  filename?: string;
}

/**
 * QEMU's path_combine: `name` relative to the directory part of `base`, without normalisation, so
 * relative names stay relative ("top.qcow2" + "base.raw" → "base.raw").
 */
export function pathCombine(base: string, name: string): string {
  if (name.startsWith('/')) return name;
  const slash = base.lastIndexOf('/');
  return `${base.slice(0, slash + 1)}${name}`;
}

/** Round a file length up to 512-byte sectors, as QEMU's block layer sees lengths. */
function sectorAligned(bytes: number): number {
  return Math.ceil(bytes / 512) * 512;
}

function chainLayers(image: Qcow2Image, topMap: ClusterMap | undefined): Layer[] {
  const layers: Layer[] = [];
  let current: Qcow2Image | undefined = image;
  let name = image.path;
  let map = topMap ?? image.activeMap;
  while (current) {
    const h = current.header;
    layers.push({
      kind: 'qcow2', image: current, map, lengthBytes: current.virtualSize,
      dataPath: current.dataFile.path, dataName: current.hasDataFile ? h.dataFile ?? name : name,
    });
    const backing = current.backing;
    if (!backing) break;
    name = pathCombine(name, h.backingFile ?? backing.path);
    if (backing.format === 'raw') {
      layers.push({ kind: 'raw', path: backing.path, name, lengthBytes: sectorAligned((backing as RawBacking).virtualSize) });
      break;
    }
    current = backing as Qcow2Image;
    map = current.activeMap;
  }
  return layers;
}

/** The type of subcluster `sc` of an entry (qcow2_get_subcluster_type). */
function subclusterType(e: RawL2Entry, sc: number, g: Geometry, hasDataFile: boolean): SubclusterType {
  const kind = clusterKind(e, g, hasDataFile);
  if (!g.extendedL2) return kind === 'unallocated' ? 'unallocated-plain' : kind;
  if (kind === 'compressed') return 'compressed';
  const zero = ((e.zeroBitmap >>> sc) & 1) === 1;
  if (kind === 'normal') {
    if ((e.zeroBitmap & e.allocBitmap) !== 0) return 'invalid';
    if (zero) return 'zero-alloc';
    return ((e.allocBitmap >>> sc) & 1) === 1 ? 'normal' : 'unallocated-alloc';
  }
  if (e.allocBitmap !== 0) return 'invalid';
  return zero ? 'zero-plain' : 'unallocated-plain';
}

function hasHostOffset(type: SubclusterType): boolean {
  return type === 'normal' || type === 'zero-alloc' || type === 'unallocated-alloc';
}

/**
 * qcow2_get_host_offset for [guestOffset, +bytes), stopping at the end of the L2 slice: the type of
 * the first subcluster, how many bytes have that type (contiguous host clusters for types with an
 * offset), and the host offset of the first byte. Runs under the image lock.
 */
async function qcow2HostOffset(layer: Qcow2Layer, guestOffset: number, bytes: number): Promise<{ type: SubclusterType; bytes: number; hostOffset: number }> {
  const { image, map } = layer;
  const g = image.geometry;
  const sliceCoverage = g.l2SliceEntries * g.clusterSize;
  const end = Math.min(guestOffset + bytes, guestOffset - (guestOffset % sliceCoverage) + sliceCoverage);
  const l1Index = g.l1Index(guestOffset);
  const { l2Offset } = map.l2TableOffset(l1Index);
  if (l2Offset === 0) {
    // No L2 table: unallocated up to the next L1 entry that has one (a huge empty disk maps quickly).
    let next = l1Index + 1;
    while (next * g.l2CoverageBytes < guestOffset + bytes && map.l2TableOffset(next).l2Offset === 0) next++;
    return { type: 'unallocated-plain', bytes: Math.min(guestOffset + bytes, next * g.l2CoverageBytes) - guestOffset, hostOffset: 0 };
  }
  const h = await image.l2Cache.get(l2Offset + g.l2SliceIndex(guestOffset) * g.l2SliceBytes);
  try {
    const hasDataFile = image.hasDataFile;
    const corrupt = (index: number, e: RawL2Entry, message: string): never => image.signalCorruption(true, message, {
      structure: 'l2', hostOffset: h.offset + index * g.l2EntryBytes, index, rawEntry: entryHex(e.hi, e.lo),
    });
    let pos = guestOffset;
    let firstType: SubclusterType | undefined;
    let hostOffset = 0;
    let expectedHost = 0;
    while (pos < end) {
      const clusterStart = g.startOfCluster(pos);
      const index = g.l2IndexInSlice(pos);
      const e = readL2Entry(h.buf, index, g);
      let sc = g.extendedL2 ? g.subclusterIndex(pos) : 0;
      const type = subclusterType(e, sc, g, hasDataFile);
      if (type === 'invalid') corrupt(index, e, `invalid cluster entry found (L2 offset ${l2Offset}, L2 index ${g.l2Index(pos)})`);
      if (firstType === undefined) {
        if ((type === 'zero-plain' || type === 'zero-alloc') && image.header.version < 3) {
          corrupt(index, e, `zero cluster entry found in pre-v3 image (L2 offset ${l2Offset}, L2 index ${g.l2Index(pos)})`);
        }
        if (type === 'compressed') {
          if (hasDataFile) corrupt(index, e, 'compressed cluster entry found in image with external data file');
          // Runs of compressed clusters report alike (data, no offset): take them together.
          let runEnd = Math.min(end, clusterStart + g.clusterSize);
          while (runEnd < end && subclusterType(readL2Entry(h.buf, g.l2IndexInSlice(runEnd), g), 0, g, hasDataFile) === 'compressed') {
            runEnd = Math.min(end, runEnd + g.clusterSize);
          }
          return { type, bytes: runEnd - guestOffset, hostOffset: decodeCompressed(e, g).hostOffset };
        }
        if (hasHostOffset(type)) {
          const hostCluster = l2HostOffset(e);
          if (hostCluster % g.clusterSize !== 0) {
            corrupt(index, e, `cluster allocation offset ${hostCluster} unaligned (L2 offset ${l2Offset}, L2 index ${g.l2Index(pos)})`);
          }
          if (hasDataFile && hostCluster !== clusterStart) {
            corrupt(index, e, `external data file host cluster offset ${hostCluster} does not match guest cluster offset ${clusterStart}`);
          }
          hostOffset = hostCluster + (pos - clusterStart);
          expectedHost = hostCluster;
        }
        firstType = type;
      } else {
        if (type !== firstType) break;
        if (hasHostOffset(type)) {
          expectedHost += g.clusterSize;
          if (l2HostOffset(e) !== expectedHost) break;
        }
      }
      // Subclusters of the same type from `sc` to the end of the cluster (or the range).
      const clusterEnd = Math.min(end, clusterStart + g.clusterSize);
      let scEnd = g.extendedL2 ? clusterStart + (sc + 1) * g.subclusterSize : clusterStart + g.clusterSize;
      while (scEnd < clusterEnd) {
        sc++;
        if (subclusterType(e, sc, g, hasDataFile) !== firstType) break;
        scEnd += g.subclusterSize;
      }
      pos = Math.min(scEnd, clusterEnd);
      if (pos < clusterEnd) break;
    }
    return { type: firstType ?? 'unallocated-plain', bytes: pos - guestOffset, hostOffset };
  } finally {
    image.l2Cache.release(h);
  }
}

/**
 * qcow2_detect_metadata_preallocation: true when at least max(10/9 × allocated, allocated + 2)
 * clusters of the image file have a refcount, "allocated" being the host blocks the file really has.
 */
async function detectMetadataPreallocation(image: Qcow2Image, probe: HostAllocationProbe | undefined): Promise<boolean> {
  if (!probe) return false;
  const path = image.file.path;
  const allocated = await probe.allocatedBytes(path);
  if (allocated === undefined) return false;
  const fileBytes = sectorAligned(await probe.sizeBytes(path));
  const clusterSize = image.geometry.clusterSize;
  const realClusters = Math.floor(allocated / clusterSize);
  const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
  const endCluster = Math.ceil(fileBytes / clusterSize);
  return image.lock.run(async () => {
    let count = 0;
    try {
      for (let i = 0; i < endCluster && count < threshold; i++) if (await image.refcounts.getRefcount(i) > 0) count++;
    } catch {
      return false; // QEMU treats a failed detection as "no preallocation"
    }
    trace('%s: %d of %d allocated host clusters counted (threshold %d): metadata preallocation %s', path, count, realClusters, threshold, count >= threshold);
    return count >= threshold;
  });
}

/** file-posix block status of [hostOffset, +bytes) of a host file (bdrv_co_block_status on a protocol node). */
async function fileStatus(path: string, hostOffset: number, bytes: number, probe: HostAllocationProbe | undefined): Promise<Status> {
  if (!probe) return { flags: DATA | OFFSET_VALID | ALLOCATED, bytes, hostOffset, filename: path };
  const total = sectorAligned(await probe.sizeBytes(path));
  if (hostOffset >= total) return { flags: EOF, bytes: 0, hostOffset };
  const limit = Math.min(bytes, total - hostOffset);
  const extent = await probe.extentAt(path, hostOffset);
  let flags: number;
  let n: number;
  switch (extent.kind) {
    case 'trailing-hole': flags = ZERO; n = limit; break;
    case 'unknown': flags = DATA; n = limit; break;
    case 'data': flags = DATA; n = Math.min(limit, extent.endBytes - hostOffset); break;
    case 'hole': flags = ZERO; n = Math.min(limit, extent.endBytes - hostOffset); break;
  }
  flags |= OFFSET_VALID | ALLOCATED;
  if (hostOffset + n === total) flags |= EOF;
  return { flags, bytes: n, hostOffset };
}

interface WalkContext {
  layers: Layer[];
  probe: HostAllocationProbe | undefined;
}

/** bdrv_co_block_status of layer `i` for [guestOffset, +bytes). */
async function layerStatus(ctx: WalkContext, i: number, guestOffset: number, bytes: number): Promise<Status> {
  const layer = ctx.layers[i];
  const total = layer.lengthBytes;
  if (guestOffset >= total) return { flags: EOF, bytes: 0, hostOffset: 0 };
  const limit = Math.min(bytes, total - guestOffset);
  if (layer.kind === 'raw') {
    const st = await fileStatus(layer.path, guestOffset, limit, ctx.probe);
    st.filename = layer.name;
    if (guestOffset + st.bytes === total) st.flags |= EOF;
    return st;
  }
  const q = await layer.image.lock.run(() => qcow2HostOffset(layer, guestOffset, limit));
  let flags = 0;
  let n = q.bytes;
  if (hasHostOffset(q.type)) flags |= OFFSET_VALID;
  if (q.type === 'zero-plain' || q.type === 'zero-alloc') flags |= ZERO;
  else if (q.type === 'normal' || q.type === 'compressed') flags |= DATA;
  if (q.type === 'compressed') flags |= COMPRESSED;
  layer.metadataPreallocation ??= detectMetadataPreallocation(layer.image, ctx.probe);
  const recurse = (flags & DATA) !== 0 && (flags & OFFSET_VALID) !== 0 && await layer.metadataPreallocation;
  if (recurse) flags |= RECURSE;
  if ((flags & (DATA | ZERO)) !== 0) {
    flags |= ALLOCATED;
  } else {
    const below = ctx.layers[i + 1];
    if (!below || guestOffset >= below.lengthBytes) flags |= ZERO;
  }
  if ((flags & RECURSE) !== 0 && (flags & ZERO) === 0) {
    const file = await fileStatus(layer.dataPath, q.hostOffset, n, ctx.probe);
    if ((file.flags & EOF) !== 0 && (file.bytes === 0 || (file.flags & ZERO) !== 0)) {
      flags |= ZERO; // reading past the end of the host file gives zeros
    } else {
      n = file.bytes;
      flags |= file.flags & ZERO;
    }
  }
  if (guestOffset + n === total) flags |= EOF;
  return { flags, bytes: n, hostOffset: q.hostOffset, ...((flags & OFFSET_VALID) !== 0 ? { filename: layer.dataName } : {}) };
}

/** qemu-img's get_block_status: the first layer of the chain that has data or zeros for the range. */
async function blockStatus(ctx: WalkContext, guestOffset: number, bytes: number): Promise<MapEntry> {
  let depth = 0;
  let n = bytes;
  let st: Status;
  for (;;) {
    st = await layerStatus(ctx, depth, guestOffset, n);
    n = st.bytes;
    if ((st.flags & (ZERO | DATA)) !== 0) break;
    if (depth + 1 >= ctx.layers.length) {
      st = { flags: 0, bytes: n, hostOffset: 0 };
      break;
    }
    depth++;
  }
  const entry: MapEntry = {
    start: guestOffset, length: n, depth,
    present: (st.flags & ALLOCATED) !== 0, zero: (st.flags & ZERO) !== 0, data: (st.flags & DATA) !== 0,
    compressed: (st.flags & COMPRESSED) !== 0,
  };
  if ((st.flags & OFFSET_VALID) !== 0) {
    entry.offset = st.hostOffset;
    if (st.filename !== undefined) entry.filename = st.filename;
  }
  return entry;
}

/**
 * Block status of the image's chain as qemu-img map computes it, from any guest offset: the extent
 * that starts at `guestOffset` (at most `bytes` long, never 0 bytes before the end). For lseek's
 * SEEK_DATA/SEEK_HOLE (seek.ts), which walk the chain from an offset instead of from 0.
 */
export function blockStatusReader(image: Qcow2Image, options: MapOptions = {}): (guestOffset: number, bytes: number) => Promise<MapEntry> {
  const ctx: WalkContext = { layers: chainLayers(image, options.topMap), probe: options.probe };
  return (guestOffset, bytes) => blockStatus(ctx, guestOffset, Math.min(PROBE_LIMIT_BYTES, bytes));
}

/** qemu-img's entry_mergeable (plus "compressed", which QEMU 8.2 compares too). */
function mergeable(curr: MapEntry, next: MapEntry): boolean {
  if (curr.length === 0) return false;
  if (curr.zero !== next.zero || curr.data !== next.data || curr.compressed !== next.compressed || curr.depth !== next.depth
    || curr.present !== next.present || curr.filename !== next.filename || (curr.offset === undefined) !== (next.offset === undefined)) {
    return false;
  }
  return curr.offset === undefined || curr.offset + curr.length === next.offset;
}

/**
 * The extents of `qemu-img map` for the whole image, streamed in guest order. An empty image gives
 * one zero-length extent, as qemu-img prints it.
 */
export async function* mapEntries(image: Qcow2Image, options: MapOptions = {}): AsyncGenerator<MapEntry> {
  const ctx: WalkContext = { layers: chainLayers(image, options.topMap), probe: options.probe };
  const lengthBytes = image.virtualSize;
  let curr: MapEntry = { start: 0, length: 0, depth: 0, present: false, zero: false, data: false, compressed: false };
  while (curr.start + curr.length < lengthBytes) {
    const offset = curr.start + curr.length;
    const next = await blockStatus(ctx, offset, Math.min(PROBE_LIMIT_BYTES, lengthBytes - offset));
    if (mergeable(curr, next)) {
      curr.length += next.length;
      continue;
    }
    if (curr.length > 0) yield curr;
    curr = next;
  }
  yield curr;
}

/** MapExtent view of mapEntries (InspectableDevice.mapExtents). */
export async function* mapExtents(image: Qcow2Image, options: MapOptions = {}): AsyncGenerator<MapExtent> {
  for await (const entry of mapEntries(image, options)) {
    const { filename: _filename, ...extent } = entry;
    yield extent;
  }
}

/** One extent as a line of QEMU 7.2's `qemu-img map --output=json` (no "compressed" key: added in 8.2). */
export function mapEntryJson(extent: MapExtent): string {
  const offset = extent.offset === undefined ? '' : `, "offset": ${extent.offset}`;
  return `{ "start": ${extent.start}, "length": ${extent.length}, "depth": ${extent.depth}, "present": ${extent.present}, ` +
    `"zero": ${extent.zero}, "data": ${extent.data}${offset}}`;
}

/** The text of `qemu-img map --output=json`, streamed in chunks of about `chunkChars`. */
export async function* mapJsonChunks(extents: AsyncIterable<MapExtent>, chunkChars = 64 * 1024): AsyncGenerator<string> {
  let pending = '[';
  let first = true;
  for await (const extent of extents) {
    pending += `${first ? '' : ',\n'}${mapEntryJson(extent)}`;
    first = false;
    if (pending.length >= chunkChars) {
      yield pending;
      pending = '';
    }
  }
  yield `${pending}]\n`;
}
