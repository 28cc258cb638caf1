/**
 * Image formatter (`qcow2fuse create`): lays a new image out as qemu-img does — header in cluster 0,
 * refcount table in cluster 1, one refcount block in cluster 2 — then opens it and lets the driver
 * size the L1 table and preallocate, so growth paths are the ones every write uses.
 */
import type { HostFile, HostFileOpener } from '../../io/host-file.js';
import { resolveBackingPath } from '../engine/backing.js';
import {
  AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZLIB, COMPRESSION_ZSTD, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS,
} from '../format/constants.js';
import { CodedError } from '../format/errors.js';
import { encodeHeader, STANDARD_FEATURE_NAMES, withBit, type Qcow2Header } from '../format/header.js';
import { imageState, Qcow2Image } from '../engine/image.js';
import { makeNormalEntry, writeL2Entry } from '../format/l2-entry.js';
import { setRefcount } from '../format/refcount-block.js';
import { encodeReftableEntry } from '../format/refcount-block.js';

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

export interface CreateOptions {
  /** Virtual size in bytes; defaults to the backing file's size when a backing file is given. */
  virtualSize?: number;
  clusterSize?: number;
  compat?: '0.10' | '1.1';
  refcountBits?: number;
  lazyRefcounts?: boolean;
  extendedL2?: boolean;
  compressionType?: 'zlib' | 'zstd';
  preallocation?: Preallocation;
  backingFile?: string;
  backingFormat?: 'qcow2' | 'raw';
  dataFile?: string;
  dataFileRaw?: boolean;
  /** How host files are opened (injected: src/node.ts passes the Node opener). */
  openHostFile: HostFileOpener;
}

function invalid(path: string, message: string): CodedError {
  return new CodedError('EINVAL', `${path}: ${message}`, { image: path });
}

function validate(path: string, o: CreateOptions): { clusterBits: number; refcountOrder: number; version: 2 | 3 } {
  const clusterSize = o.clusterSize ?? 65536;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw invalid(path, `cluster size must be a power of two between 512 and 2M (got ${clusterSize})`);
  }
  const refcountBits = o.refcountBits ?? 16;
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) throw invalid(path, `refcount width must be a power of two and may not exceed 64 bits (got ${refcountBits})`);
  const version = o.compat === '0.10' ? 2 : 3;
  if (version === 2) {
    if (refcountBits !== 16) throw invalid(path, 'different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
    if (o.lazyRefcounts) throw invalid(path, 'lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
    if (o.extendedL2) throw invalid(path, 'extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
    if (o.compressionType === 'zstd') throw invalid(path, 'compression_type requires compatibility level 1.1 or above (use compat=1.1 or greater)');
    if (o.dataFile !== undefined) throw invalid(path, 'data-file requires compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  if (o.extendedL2 && clusterSize < 16384) throw invalid(path, 'extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  if (o.dataFileRaw && o.dataFile === undefined) throw invalid(path, 'data-file-raw requires data-file');
  if (o.dataFileRaw && o.backingFile !== undefined) throw invalid(path, 'backing file and data-file-raw cannot be used together');
  if (o.virtualSize !== undefined && (!Number.isSafeInteger(o.virtualSize) || o.virtualSize < 0)) throw invalid(path, `invalid size ${o.virtualSize}`);
  return { clusterBits, refcountOrder, version };
}

/**
 * Create (or overwrite) a qcow2 image at `path`. Returns after the image is fully written, synced
 * and closed.
 */
export async function createImage(path: string, options: CreateOptions): Promise<void> {
  const { clusterBits, refcountOrder, version } = validate(path, options);
  const opener = options.openHostFile;
  let virtualSize = options.virtualSize;
  if (options.backingFile !== undefined) {
    // Only its size is read, sharing every permission as qemu-img create does (a VM may be running on it).
    const backing = await Qcow2Image.open(resolveBackingPath(path, options.backingFile), { readOnly: true, forceShare: true, openHostFile: opener })
      .then(async (image) => { const size = image.virtualSize; await image.close(); return { size, format: 'qcow2' as const }; })
      .catch(async (err: unknown) => {
        if (options.backingFormat === 'qcow2') throw err;
        const file = await opener(resolveBackingPath(path, options.backingFile!), { readOnly: true, lock: true, forceShare: true });
        try { return { size: await file.size(), format: 'raw' as const }; } finally { await file.close(); }
      });
    virtualSize ??= backing.size;
    options = { ...options, backingFormat: options.backingFormat ?? backing.format };
  }
  if (virtualSize === undefined) throw invalid(path, 'image size must be specified');
  virtualSize = Math.ceil(virtualSize / 512) * 512;
  const clusterSize = 2 ** clusterBits;

  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  if (options.lazyRefcounts) compatibleFeatures = withBit(compatibleFeatures, COMPAT_LAZY_REFCOUNTS, true);
  if (options.extendedL2) incompatibleFeatures = withBit(incompatibleFeatures, INCOMPAT_EXTL2, true);
  if (options.compressionType === 'zstd') incompatibleFeatures = withBit(incompatibleFeatures, INCOMPAT_COMPRESSION, true);
  if (options.dataFile !== undefined) incompatibleFeatures = withBit(incompatibleFeatures, INCOMPAT_DATA_FILE, true);
  if (options.dataFileRaw) autoclearFeatures = withBit(autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW, true);

  const header: Qcow2Header = {
    version, backingFileOffset: 0, backingFileBytes: 0, clusterBits, virtualSize: 0, cryptMethod: 0,
    l1Entries: 0, l1TableOffset: 3 * clusterSize, refcountTableOffset: clusterSize, refcountTableClusters: 1,
    nbSnapshots: 0, snapshotsOffset: 0, incompatibleFeatures, compatibleFeatures, autoclearFeatures, refcountOrder,
    headerLength: 0, compressionType: options.compressionType === 'zstd' ? COMPRESSION_ZSTD : COMPRESSION_ZLIB,
    backingFile: options.backingFile, backingFormat: options.backingFile !== undefined ? options.backingFormat : undefined,
    dataFile: options.dataFile, featureNames: version === 3 ? STANDARD_FEATURE_NAMES : [], unknownExtensions: [],
  };
  const { bytes: headerBytes } = encodeHeader(header, path);

  const file = await opener(path, { readOnly: false, lock: true, create: true });
  try {
    await file.truncate(0);
    const area = Buffer.alloc(3 * clusterSize);
    headerBytes.copy(area, 0);
    encodeReftableEntry(area.subarray(clusterSize), 0, 2 * clusterSize);
    for (let c = 0; c < 3; c++) setRefcount(area.subarray(2 * clusterSize), c, refcountOrder, 1);
    await file.pwrite(area, 0, 'header');
    await file.fdatasync();
  } catch (err) {
    await file.close();
    throw err;
  }
  if (options.dataFile !== undefined) {
    const data = await opener(resolveBackingPath(path, options.dataFile), { readOnly: false, lock: true, create: true });
    try {
      await data.truncate(0);
      await data.truncate(virtualSize);
    } finally {
      await data.close();
    }
  }
  const image = await Qcow2Image.open(path, { readOnly: false, file, openHostFile: opener });
  try {
    await image.resize(virtualSize);
    if (options.preallocation !== undefined && options.preallocation !== 'off') await preallocate(image, options.preallocation);
  } finally {
    await image.close();
  }
}

/**
 * Allocate L2 tables and data clusters for the whole disk (QEMU's preallocation=metadata), and
 * reserve (falloc) or write (full) the data area — each run before the L2 entries that point at it
 * are linked, so a failure leaves leaks, never entries pointing past the end of the file.
 */
async function preallocate(qcow2: Qcow2Image, mode: Exclude<Preallocation, 'off'>): Promise<void> {
  const image = imageState(qcow2);
  const g = image.geometry;
  const nbClusters = g.sizeToClusters(image.virtualSize);
  const target: HostFile = image.dataFile;
  let end = 0;
  for (let first = 0; first < nbClusters; first += g.l2SliceEntries) {
    const n = Math.min(g.l2SliceEntries, nbClusters - first);
    const hostOffset = image.hasDataFile ? first * g.clusterSize : await image.lock.run(() => image.refcounts.allocClusters(n));
    const bytes = n * g.clusterSize;
    if (mode === 'falloc') {
      await target.allocate(hostOffset, bytes, false);
    } else if (mode === 'full') {
      const zeros = Buffer.alloc(Math.min(bytes, 4 * 1024 * 1024));
      for (let done = 0; done < bytes; done += zeros.length) await target.pwrite(zeros.subarray(0, Math.min(zeros.length, bytes - done)), hostOffset + done, 'zero');
    }
    end = Math.max(end, hostOffset + bytes);
    await image.lock.run(async () => {
      const h = await image.activeMap.getL2SliceForWrite(first * g.clusterSize);
      try {
        for (let i = 0; i < n; i++) {
          const entry = makeNormalEntry(hostOffset + i * g.clusterSize, true, g.extendedL2 ? 0xffffffff : 0, 0);
          writeL2Entry(h.buf, g.l2IndexInSlice((first + i) * g.clusterSize), g, entry);
        }
        await image.l2Cache.dependsOn(image.refcountCache);
        image.l2Cache.dependsOnFlush();
        image.l2Cache.markDirty(h);
      } finally {
        await image.l2Cache.put(h);
      }
    });
  }
  if (mode === 'metadata' && end > await target.size()) await target.truncate(end);
  await qcow2.flush();
}
