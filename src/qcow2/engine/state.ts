/**
 * ImageState: everything an open qcow2 image is made of — files, header, geometry, the caches and
 * their dependencies, refcounts, the active cluster map, snapshots, the metadata lock and in-flight
 * tracking. Qcow2Image is a façade over it; the per-verb modules (read, write, zero-discard,
 * lifecycle) and the maintenance code (check, repair, snapshot-ops, info, map, layout) work on it.
 * It is not part of the public API (src/index.ts): library users see Qcow2Image only.
 *
 * Cache dependencies are data (DESIGN §4): every table write goes through `beforeWrite`, the overlap
 * check against the metadata map; the write-ordering rules live in cluster-map.ts and refcount.ts.
 */
import { allocAligned, DEFAULT_ALIGNMENT_BYTES } from '../../io/aligned-buffer.js';
import type { AioMode, HostFile } from '../../io/host-file.js';
import { AsyncLock } from './async-lock.js';
import type { BackingReader } from './backing.js';
import { ClusterMap, type L1Table } from './cluster-map.js';
import { compressionTypeName, DecompressedCache, type CompressionType } from './compression.js';
import type { CompressedWriter } from './compressed-writer.js';
import { signalCorruption, type CorruptionContext } from './corruption.js';
import { InflightTracker } from './inflight.js';
import type { CacheMode, Qcow2OpenOptions } from './options.js';
import { MetadataMap } from './overlap.js';
import { RangeQueue } from './range-queue.js';
import { Refcounts } from './refcount.js';
import type { SizeTrackingFile } from './size-tracking-file.js';
import { TableCache } from './table-cache.js';
import { AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, DEFAULT_L2_CACHE_MAX_BYTES, DEFAULT_L2_SLICE_BYTES, MIN_REFCOUNT_CACHE_TABLES } from '../format/constants.js';
import { Qcow2RangeError, Qcow2ReadOnlyError } from '../format/errors.js';
import { Geometry } from '../format/geometry.js';
import { encodeHeader, hasBit, type Qcow2Header } from '../format/header.js';
import type { SnapshotEntry } from '../format/snapshot-table.js';
import debugFactory from 'debug';

const trace = debugFactory('qcow2fuse:qcow2');

/** A buffer for a write to `file`: aligned memory when the file is opened O_DIRECT. */
export function allocIoBuffer(file: HostFile, bytes: number): Buffer {
  return file.direct ? allocAligned(bytes, Math.max(file.dioAlignment, DEFAULT_ALIGNMENT_BYTES)) : Buffer.allocUnsafe(bytes);
}

export class ImageState {
  readonly path: string;
  readonly format = 'qcow2' as const;
  /** The image file, with its size and highest written byte tracked. */
  readonly file: SizeTrackingFile;
  readonly dataFile: HostFile;
  readonly geometry: Geometry;
  readonly metadata: MetadataMap;
  readonly l2Cache: TableCache;
  readonly refcountCache: TableCache;
  readonly refcounts: Refcounts;
  readonly activeMap: ClusterMap;
  readonly backing: BackingReader | undefined;
  readonly compressionType: CompressionType;
  readonly cacheMode: CacheMode;
  /** The metadata lock (QEMU's s->lock); check and repair run under it too. */
  readonly lock = new AsyncLock();
  readonly decompressed: DecompressedCache;
  readonly inflight = new InflightTracker();
  /** Host bytes at and past this offset have never been written since open (read as zero). */
  highWaterBytes: number;
  firstWriteDone = false;
  closed = false;
  readonly preallocate: boolean;
  /** Uncompressed writes leave out zero clusters that already read as zero (Qcow2OpenOptions.detectZeroes). */
  readonly detectZeroes: boolean;
  readonly aioMode: AioMode | undefined;
  /** The host filesystem refused fallocate(ZERO_RANGE): preallocation is skipped from then on. */
  preallocUnsupported = false;
  /** Host ranges freed but not yet punched (see onClustersFreed). */
  readonly punchQueue = new RangeQueue();
  /** Second handle (O_DIRECT) for compressed host clusters. */
  directFile: HostFile | undefined;
  /** Set when the image stores writes compressed. */
  compressedWriter: CompressedWriter | undefined;
  private readOnlyReason: string | undefined;
  private currentHeader: Qcow2Header;
  private snapshotEntries: SnapshotEntry[] = [];
  private snapshotBytes = 0;
  private readonly background = new Set<Promise<void>>();

  constructor(path: string, file: SizeTrackingFile, dataFile: HostFile, header: Qcow2Header, l1: L1Table, backing: BackingReader | undefined,
    options: Qcow2OpenOptions, fileBytes: number) {
    this.path = path;
    this.file = file;
    this.dataFile = dataFile;
    this.currentHeader = header;
    this.backing = backing;
    this.cacheMode = options.cache ?? 'writeback';
    this.readOnlyReason = options.readOnly ? 'opened read-only' : undefined;
    this.highWaterBytes = fileBytes;
    file.onWrite = (end) => {
      if (end > this.highWaterBytes) this.highWaterBytes = end;
    };
    this.preallocate = options.preallocate ?? true;
    this.detectZeroes = options.detectZeroes ?? true;
    this.aioMode = options.aio;
    this.compressionType = compressionTypeName(header.compressionType);
    const extendedL2 = hasBit(header.incompatibleFeatures, 4);
    this.geometry = new Geometry(header.clusterBits, header.refcountOrder, extendedL2, DEFAULT_L2_SLICE_BYTES);
    const g = this.geometry;
    this.metadata = new MetadataMap(g.clusterSize);
    this.metadata.add('header', 0, g.clusterSize);
    const alignment = Math.max(file.dioAlignment, DEFAULT_ALIGNMENT_BYTES);
    const allocBuffer = (bytes: number): Buffer => allocAligned(bytes, alignment);
    const defaultL2Bytes = Math.min(DEFAULT_L2_CACHE_MAX_BYTES, Math.max(g.l1EntriesFor(header.virtualSize) * g.clusterSize, 1));
    const l2Bytes = options.l2CacheBytes ?? defaultL2Bytes;
    const refcountBytes = options.refcountCacheBytes ?? Math.max(MIN_REFCOUNT_CACHE_TABLES * g.clusterSize, Math.floor(l2Bytes / 4));
    this.l2Cache = new TableCache({
      name: 'l2', file, tableBytes: g.l2SliceBytes, nbSlots: Math.max(16, Math.floor(l2Bytes / g.l2SliceBytes)), writePoint: 'l2', allocBuffer,
      beforeWrite: (offset, bytes) => this.activeMap.assertNoOverlap(offset, bytes, 'l2'), writethrough: this.cacheMode === 'writethrough',
    });
    this.refcountCache = new TableCache({
      name: 'refcount', file, tableBytes: g.clusterSize, nbSlots: Math.max(MIN_REFCOUNT_CACHE_TABLES, Math.floor(refcountBytes / g.clusterSize)), writePoint: 'refblock', allocBuffer,
      beforeWrite: (offset, bytes) => this.activeMap.assertNoOverlap(offset, bytes, 'refblock'), writethrough: this.cacheMode === 'writethrough',
    });
    this.refcounts = new Refcounts({
      image: path, file, geometry: g, cache: this.refcountCache, metadata: this.metadata, allocBuffer,
      signalCorruption: (fatal, message, context) => this.signalCorruption(fatal, message, context),
      writeReftableLocation: (offset, clusters) => this.updateHeader({ refcountTableOffset: offset, refcountTableClusters: clusters }),
      onClustersFreed: (hostOffset, nbClusters) => this.onClustersFreed(hostOffset, nbClusters),
      onClustersAllocated: (hostOffset, nbClusters) => this.punchQueue.remove(hostOffset, hostOffset + nbClusters * this.geometry.clusterSize),
      fileBytes: () => this.file.sizeBytes,
    });
    this.activeMap = new ClusterMap({
      image: path, file, dataFile, hasDataFile: dataFile !== file, geometry: g, version: header.version, l2Cache: this.l2Cache,
      refcountCache: this.refcountCache, refcounts: this.refcounts, metadata: this.metadata,
      hasBacking: () => this.backing !== undefined,
      lazyRefcounts: () => hasBit(this.header.compatibleFeatures, COMPAT_LAZY_REFCOUNTS),
      signalCorruption: (fatal, message, context) => this.signalCorruption(fatal, message, context),
      waitHostIdle: (hostOffset, bytes) => this.inflight.waitHostIdle(hostOffset, bytes),
      writeL1Location: (offset, entries) => this.updateHeader({ l1TableOffset: offset, l1Entries: entries }),
      fileBytes: () => this.file.sizeBytes,
      allocBuffer,
    }, l1, true);
    this.decompressed = new DecompressedCache(options.decompressedCacheBytes ?? Math.max(16 * 1024 * 1024, 8 * g.clusterSize));
  }

  /** The header as the file holds it (changed only through updateHeader and setHeader). */
  get header(): Qcow2Header {
    return this.currentHeader;
  }

  /** The snapshot table in use (changed only through setSnapshotTable). */
  get snapshots(): readonly SnapshotEntry[] {
    return this.snapshotEntries;
  }

  /** Bytes of the snapshot table in use. */
  get snapshotTableBytes(): number {
    return this.snapshotBytes;
  }

  /**
   * The guest disk's size in bytes: the header's size rounded down to whole 512-byte sectors, as
   * QEMU's block layer sees it (a header size of 1000 is a 512-byte disk to qemu-img and qemu-io).
   */
  get virtualSize(): number {
    return this.header.virtualSize - (this.header.virtualSize % 512);
  }

  get readOnly(): boolean {
    return this.readOnlyReason !== undefined;
  }

  get hasDataFile(): boolean {
    return this.dataFile !== this.file;
  }

  /** The external data file holds the guest disk as a raw image (data_file_raw). */
  get dataFileRaw(): boolean {
    return this.hasDataFile && hasBit(this.header.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW);
  }

  /** Refuse writes from now on (fatal corruption). */
  dropToReadOnly(reason: string): void {
    this.readOnlyReason = reason;
  }

  assertWritable(): void {
    if (this.readOnlyReason !== undefined) throw new Qcow2ReadOnlyError(this.path, this.readOnlyReason);
    if (this.closed) throw new Qcow2ReadOnlyError(this.path, 'image is closed');
  }

  checkRange(guestOffset: number, bytes: number): void {
    if (!Number.isSafeInteger(guestOffset) || !Number.isSafeInteger(bytes) || guestOffset < 0 || bytes < 0 || guestOffset + bytes > this.virtualSize) {
      throw new Qcow2RangeError(this.path, `request [${guestOffset}, +${bytes}) outside the virtual disk (${this.virtualSize} bytes)`, { guestOffset, bytes });
    }
  }

  /** Read host bytes of the image file, zero-filled past EOF. */
  async readHost(hostOffset: number, bytes: number): Promise<Buffer> {
    const buf = Buffer.alloc(bytes);
    const n = await this.file.pread(buf, hostOffset);
    if (n < bytes) buf.fill(0, n);
    return buf;
  }

  /** The corruption funnel (corruption.ts). */
  signalCorruption(fatal: boolean, message: string, context: CorruptionContext): never {
    return signalCorruption(this, fatal, message, context);
  }

  /** Rewrite the header with `changes` (whole header area in one write), durably. */
  async updateHeader(changes: Partial<Qcow2Header>): Promise<void> {
    const next = { ...this.header, ...changes };
    const { bytes, header } = encodeHeader(next, this.path);
    await this.file.pwrite(bytes, 0, 'header');
    await this.file.fdatasync();
    this.currentHeader = header;
  }

  /** The header as the file holds it now, after code that rewrote fields of it in place (repair, the corruption funnel). */
  setHeader(header: Qcow2Header): void {
    this.currentHeader = header;
  }

  /** The snapshot table in use (after it was read or rewritten). */
  setSnapshotTable(entries: SnapshotEntry[], tableBytes: number): void {
    this.snapshotEntries = entries;
    this.snapshotBytes = tableBytes;
  }

  /**
   * Register every live metadata structure in the overlap map from the image's current state: header,
   * refcount table and blocks, L1 and L2 tables, snapshot table and snapshot L1 tables. Used by open
   * and after a check or repair changed the layout. A corrupt location (past 2^53, an oversized
   * snapshot L1) is not registered: its range could be unbounded.
   */
  registerMetadata(): void {
    const g = this.geometry;
    const map = this.metadata;
    map.clear();
    map.add('header', 0, g.clusterSize);
    map.add('reftable', this.refcounts.reftableOffset, this.refcounts.reftableClusters * g.clusterSize);
    for (const block of this.refcounts.reftable) if (block > 0) map.add('refblock', block, g.clusterSize);
    this.activeMap.registerMetadata('l1');
    if (this.snapshots.length === 0) return;
    if (Number.isSafeInteger(this.header.snapshotsOffset)) map.add('snapshot-table', this.header.snapshotsOffset, this.snapshotTableBytes);
    for (const s of this.snapshots) {
      if (Number.isSafeInteger(s.l1TableOffset) && s.l1Entries <= g.maxL1Entries) map.add('snapshot-l1', s.l1TableOffset, Math.max(s.l1Entries * 8, 1));
    }
  }

  /** Track host I/O nobody awaits (corrupt bit, hole punching): close waits for it, so it never hits a reused fd. */
  inBackground(work: Promise<void>): void {
    const tracked: Promise<void> = work.finally(() => this.background.delete(tracked));
    this.background.add(tracked);
  }

  /** Wait for every background I/O (close). */
  async settleBackground(): Promise<void> {
    await Promise.allSettled([...this.background]);
  }

  private onClustersFreed(hostOffset: number, nbClusters: number): void {
    const bytes = nbClusters * this.geometry.clusterSize;
    this.decompressed.invalidate(hostOffset, bytes);
    for (let c = 0; c < nbClusters; c++) {
      const offset = hostOffset + c * this.geometry.clusterSize;
      for (let s = 0; s < this.geometry.clusterSize / this.geometry.l2SliceBytes; s++) this.l2Cache.discard(offset + s * this.geometry.l2SliceBytes);
      this.refcountCache.discard(offset);
    }
    this.metadata.remove(hostOffset, bytes);
    // The space goes back to the host only once the freeing is durable (flushLocked), and not at
    // all if the clusters are allocated again first: punching earlier could zero a cluster an
    // on-disk L2 entry still points to (crash) or one that was already reused.
    this.punchQueue.add(hostOffset, hostOffset + bytes);
  }

  /** Punch the holes queued by frees; called after the caches are flushed and synced. */
  async processPunches(): Promise<void> {
    for (const [start, end] of this.punchQueue.take()) {
      await this.file.punchHole(start, end - start).catch((err: unknown) => trace('punch hole failed: %o', err));
    }
  }

  /**
   * Host clusters referenced by something other than the image's tables while it is open: the
   * compressed writer's clusters still open for chunks (see CompressedWriter.heldHostClusters).
   * Under the metadata lock.
   */
  heldHostClustersLocked(): number[] {
    return this.compressedWriter?.heldHostClusters() ?? [];
  }
}
