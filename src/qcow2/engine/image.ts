/**
 * Qcow2Image: an open qcow2 image — the BlockDevice the CLI and the FUSE layer drive.
 *
 * Concurrency (DESIGN §4): metadata (L1/L2/refcounts, header) changes run under one AsyncLock;
 * data I/O runs outside it. Guest clusters being allocated or re-linked are marked in flight so a
 * concurrent write to the same cluster waits and never allocates it twice; host ranges with data
 * I/O in flight are tracked so a cluster is never freed (and reused) under a running read or write.
 */
import debugFactory from 'debug';
import { AsyncLock } from './async-lock.js';
import { ForwardingHostFile, type AioMode, type HostFile, type HostFileOpener, type HostFileOpenOptions, type WritePoint } from '../../io/host-file.js';
import { openNodeHostFile } from '../../io/node-host-file.js';
import { allocAligned, DEFAULT_ALIGNMENT_BYTES } from '../../io/aligned-buffer.js';
import { BackingReader, openBacking } from './backing.js';
import type { BlockDevice } from './block-device.js';
import { ClusterMap, type ClusterWritePlan, type L1Table, type ReadSegment } from './cluster-map.js';
import { compressionTypeName, decompressClusterInto, DecompressedCache, type CompressionType } from './compression.js';
import { CompressedWriter, type CompressedWriterOptions } from './compressed-writer.js';
import {
  AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, DEFAULT_L2_CACHE_MAX_BYTES, DEFAULT_L2_SLICE_BYTES, HEADER_V3_MIN_BYTES,
  INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MIN_REFCOUNT_CACHE_TABLES,
} from '../format/constants.js';
import { CodedError, Qcow2CorruptError, Qcow2RangeError, Qcow2ReadOnlyError } from '../format/errors.js';
import { Geometry } from '../format/geometry.js';
import { decodeHeader, encodeHeader, hasBit, withBit, type Qcow2Header } from '../format/header.js';
import { isCompressed, l2HostOffset, type RawL2Entry } from '../format/l2-entry.js';
import { MetadataMap } from './overlap.js';
import { Refcounts } from './refcount.js';
import { readSnapshotTable, type SnapshotEntry } from '../format/snapshot-table.js';
import { TableCache } from './table-cache.js';
import { resolveBackingPath } from './backing.js';

const trace = debugFactory('qcow2fuse:qcow2');

/** Longest host range read at once for a run of back-to-back compressed chunks. */
const COMPRESSED_RUN_BYTES = 512 * 1024;
/** Largest gap between two chunks still read together (read and thrown away). */
const COMPRESSED_RUN_GAP_BYTES = 4096;

type CompressedSegment = Extract<ReadSegment, { kind: 'compressed' }>;

export type CacheMode = 'writeback' | 'none' | 'writethrough';

/** A buffer for a write to `file`: aligned memory when the file is opened O_DIRECT. */
function allocIoBuffer(file: HostFile, bytes: number): Buffer {
  return file.direct ? allocAligned(bytes, Math.max(file.dioAlignment, DEFAULT_ALIGNMENT_BYTES)) : Buffer.allocUnsafe(bytes);
}

/** Preallocation ahead of the end of the image file (seed 002): up to 1 MiB, 16 clusters. */
const PREALLOC_AHEAD_BYTES = 1024 * 1024;

export interface Qcow2OpenOptions {
  readOnly: boolean;
  /** Host I/O mode: writeback (default), none (O_DIRECT), writethrough (flush after every write). */
  cache?: CacheMode;
  /** How O_DIRECT I/O reaches the kernel (QEMU's aio=): native (Linux AIO, default) or threads. */
  aio?: AioMode;
  l2CacheBytes?: number;
  refcountCacheBytes?: number;
  /** Bytes of the decompressed-cluster LRU (default 16 MiB or 8 clusters, whichever is larger). */
  decompressedCacheBytes?: number;
  /** Take QEMU-compatible locks (default true). */
  lock?: boolean;
  /** Read-only opens: share every permission (qemu-img -U), down the backing chain too. */
  forceShare?: boolean;
  /** Do not open the backing chain (QEMU's BDRV_O_NO_BACKING, as qemu-img info): unallocated clusters read as zeros. */
  noBacking?: boolean;
  /** How host files are opened (default: node-host-file). */
  openHostFile?: HostFileOpener;
  /**
   * Zero new clusters with fallocate instead of writing zero padding (seed 002); default true.
   * Disable to measure the difference.
   */
  preallocate?: boolean;
  /**
   * Open for check/repair (QEMU's BDRV_O_CHECK): a corrupt-marked image may be opened writable, the
   * snapshot table is left to the check to read, and a dirty image is not repaired on open.
   */
  check?: boolean;
  /** Store every full guest cluster written compressed (mount -o compress, convert -c). */
  compress?: boolean;
  /** Tuning of the compressed writer. */
  compressedWriter?: CompressedWriterOptions;
  /** Internal: the chain of images above this one (backing opens). */
  chain?: string[];
  /** Internal: an already opened host file for `path`. */
  file?: HostFile;
}

interface InflightRange {
  start: number;
  end: number;
}

/** A guest cluster's in-flight state: exclusive (being allocated/linked) or shared direct writers. */
interface GuestBusy {
  exclusive: boolean;
  count: number;
  done: Promise<void>;
  resolve: () => void;
}

export class Qcow2Image implements BlockDevice, BackingReader {
  readonly path: string;
  readonly format = 'qcow2' as const;
  readonly file: HostFile;
  readonly dataFile: HostFile;
  header: Qcow2Header;
  readonly geometry: Geometry;
  readonly metadata: MetadataMap;
  readonly l2Cache: TableCache;
  readonly refcountCache: TableCache;
  readonly refcounts: Refcounts;
  readonly activeMap: ClusterMap;
  readonly backing: BackingReader | undefined;
  snapshots: SnapshotEntry[];
  snapshotTableBytes: number;
  readonly compressionType: CompressionType;
  readonly cacheMode: CacheMode;
  /** The metadata lock (QEMU's s->lock); check and repair run under it too. */
  readonly lock = new AsyncLock();
  private readonly decompressed: DecompressedCache;
  private readOnlyReason: string | undefined;
  /** Host bytes at and past this offset have never been written since open (read as zero). */
  private highWaterBytes: number;
  private readonly hostInflight = new Set<InflightRange>();
  private readonly hostIdleWaiters: (() => void)[] = [];
  private readonly background = new Set<Promise<void>>();
  private readonly guestBusy = new Map<number, GuestBusy>();
  private firstWriteDone = false;
  private closed = false;
  private readonly preallocate: boolean;
  private readonly aioMode: AioMode | undefined;
  /** The host filesystem refused fallocate(ZERO_RANGE): preallocation is skipped from then on. */
  private preallocUnsupported = false;
  /** Host ranges freed but not yet punched (see onClustersFreed). */
  private readonly punchQueue = new RangeQueue();
  /** Second handle (O_DIRECT) for compressed host clusters. */
  private directFile: HostFile | undefined;
  /** Set when the image stores writes compressed. */
  private compressedWriter: CompressedWriter | undefined;

  private constructor(path: string, file: HostFile, dataFile: HostFile, header: Qcow2Header, l1: L1Table, backing: BackingReader | undefined,
    options: Qcow2OpenOptions, fileBytes: number) {
    this.path = path;
    this.file = file;
    this.dataFile = dataFile;
    this.header = header;
    this.backing = backing;
    this.cacheMode = options.cache ?? 'writeback';
    this.readOnlyReason = options.readOnly ? 'opened read-only' : undefined;
    this.highWaterBytes = fileBytes;
    (file as SizeTrackingFile).onWrite = (end) => {
      if (end > this.highWaterBytes) this.highWaterBytes = end;
    };
    this.preallocate = options.preallocate ?? true;
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
      fileBytes: () => (this.file as SizeTrackingFile).sizeBytes,
    });
    this.activeMap = new ClusterMap({
      image: path, file, dataFile, hasDataFile: dataFile !== file, geometry: g, version: header.version, l2Cache: this.l2Cache,
      refcountCache: this.refcountCache, refcounts: this.refcounts, metadata: this.metadata,
      hasBacking: () => this.backing !== undefined,
      lazyRefcounts: () => hasBit(this.header.compatibleFeatures, COMPAT_LAZY_REFCOUNTS),
      signalCorruption: (fatal, message, context) => this.signalCorruption(fatal, message, context),
      waitHostIdle: (hostOffset, bytes) => this.waitHostIdle(hostOffset, bytes),
      writeL1Location: (offset, entries) => this.updateHeader({ l1TableOffset: offset, l1Entries: entries }),
      fileBytes: () => (this.file as SizeTrackingFile).sizeBytes,
      allocBuffer,
    }, l1, true);
    this.snapshots = [];
    this.snapshotTableBytes = 0;
    const clusterBytes = g.clusterSize;
    this.decompressed = new DecompressedCache(options.decompressedCacheBytes ?? Math.max(16 * 1024 * 1024, 8 * clusterBytes));
  }

  /**
   * Open an image. Read-only opens take QEMU's reader locks (or share everything with forceShare,
   * like `qemu-img -U`); writable opens take QEMU's write locks. Backing files open as readers.
   */
  static async open(path: string, options: Qcow2OpenOptions): Promise<Qcow2Image> {
    const opener = options.openHostFile ?? openNodeHostFile;
    const fileOptions: HostFileOpenOptions = { readOnly: options.readOnly, direct: options.cache === 'none', aio: options.aio, lock: options.lock ?? true,
      forceShare: options.forceShare };
    const rawFile = options.file ?? await opener(path, fileOptions);
    const file = new SizeTrackingFile(rawFile, await rawFile.size());
    const cleanup: (() => Promise<void>)[] = [() => file.close()];
    try {
      const fileBytes = await file.size();
      const first = Buffer.alloc(Math.min(fileBytes, HEADER_V3_MIN_BYTES));
      await file.pread(first, 0, 'header');
      const clusterBits = first.length >= 24 ? first.readUInt32BE(20) : 0;
      const headerArea = Buffer.alloc(Math.min(fileBytes, clusterBits >= 9 && clusterBits <= 21 ? 2 ** clusterBits : HEADER_V3_MIN_BYTES));
      await file.pread(headerArea, 0, 'header');
      const header = decodeHeader(headerArea, path, fileBytes);
      if (!options.readOnly && options.check !== true && hasBit(header.incompatibleFeatures, INCOMPAT_CORRUPT)) {
        throw new CodedError('EACCES', `${path}: image is marked corrupt; it can only be opened read-only (repair it with 'qcow2fuse check -r all')`, { image: path });
      }
      let dataFile: HostFile = file;
      if (header.dataFile !== undefined) {
        dataFile = await opener(resolveBackingPath(path, header.dataFile), fileOptions);
        cleanup.push(() => dataFile.close());
      }
      let backing: BackingReader | undefined;
      if (header.backingFile !== undefined && options.noBacking !== true) {
        const chain = options.chain ?? [path];
        backing = await openBacking(path, header.backingFile, header.backingFormat, {
          opener, chain, forceShare: options.forceShare,
          openQcow2: (p, f, c) => Qcow2Image.open(p, { readOnly: true, file: f, chain: c, openHostFile: opener, cache: options.cache, forceShare: options.forceShare }),
        });
        const b = backing;
        cleanup.push(() => b.close());
      }
      const l1Buf = Buffer.alloc(Math.max(header.l1Entries * 8, 8));
      if (header.l1Entries > 0) await file.pread(l1Buf.subarray(0, header.l1Entries * 8), header.l1TableOffset, 'l1');
      const l1: L1Table = { offset: header.l1TableOffset, entries: header.l1Entries, buf: l1Buf };
      const image = new Qcow2Image(path, file, dataFile, header, l1, backing, options, fileBytes);
      await image.refcounts.load(header.refcountTableOffset, header.refcountTableClusters);
      image.activeMap.registerMetadata('l1');
      if (header.nbSnapshots > 0 && options.check !== true) {
        const table = await readSnapshotTable((offset, bytes) => image.readHost(offset, bytes), header.snapshotsOffset, header.nbSnapshots, fileBytes, path);
        image.snapshots = table.entries;
        image.snapshotTableBytes = table.tableBytes;
        image.metadata.add('snapshot-table', header.snapshotsOffset, table.tableBytes);
        // An oversized snapshot L1 (corrupt; QEMU refuses it only when used) is not registered: its range could be huge.
        for (const s of table.entries) if (s.l1Entries <= image.geometry.maxL1Entries) image.metadata.add('snapshot-l1', s.l1TableOffset, Math.max(s.l1Entries * 8, 1));
      }
      if (options.compress && !options.readOnly) await image.startCompressedWriter(opener, options.compressedWriter);
      if (!options.readOnly && options.check !== true && hasBit(header.incompatibleFeatures, INCOMPAT_DIRTY)) {
        const { repairDirtyImage } = await import('../check/repair.js');
        await repairDirtyImage(image);
      }
      trace('opened %s: %d bytes virtual, cluster %d, %s', path, header.virtualSize, image.geometry.clusterSize, options.readOnly ? 'ro' : 'rw');
      return image;
    } catch (err) {
      for (const fn of cleanup.reverse()) await fn().catch(() => undefined);
      throw err;
    }
  }

  /**
   * Route writes through a CompressedWriter. Compressed host clusters go out through a second,
   * O_DIRECT handle (they must not fill the host page cache); where the filesystem refuses O_DIRECT a
   * warning is printed and buffered writes are followed by fadvise(DONTNEED).
   */
  private async startCompressedWriter(opener: HostFileOpener, options: CompressedWriterOptions | undefined): Promise<void> {
    if (this.hasDataFile) {
      throw new CodedError('EINVAL', `${this.path}: compressed writes are impossible with an external data file`, { image: this.path });
    }
    if (this.geometry.maxRefcount < 3) {
      throw new CodedError('EINVAL', `${this.path}: compressed writes need refcount_bits of 2 or more`, { image: this.path });
    }
    const tracked = this.file as SizeTrackingFile;
    let direct: HostFile;
    try {
      direct = await opener(this.path, { readOnly: false, direct: true, aio: this.aioMode, lock: false });
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      process.emitWarning(`qcow2fuse: ${this.path}: O_DIRECT refused (${message}); compressed data is written buffered and dropped from the page cache`);
      direct = new DropCacheFile(tracked);
    }
    const directTracked = new SizeTrackingFile(direct, tracked.sizeBytes);
    directTracked.onWrite = (end) => tracked.noteWrite(end);
    this.directFile = directTracked;
    this.compressedWriter = new CompressedWriter({
      geometry: this.geometry,
      compressionType: this.compressionType,
      directFile: directTracked,
      maxRefcount: this.geometry.maxRefcount,
      locked: (fn) => this.lock.run(fn),
      readCurrent: (guestOffset, buf) => this.readIntoMap(this.activeMap, guestOffset, buf, false),
      writeUncompressed: (guestOffset, data) => this.writeNormal(guestOffset, data, directTracked),
      zeroCluster: (clusterIndex) => this.zeroClusterForCompress(clusterIndex),
      allocClustersLocked: (n) => this.refcounts.allocClusters(n),
      // +1 per linked chunk; -1 drops the writer's own allocation reference, which no L2 entry holds:
      // the count left still covers every chunk linked, so it needs no L2-first ordering (DESIGN §4
      // rule 3 is for removing a reference an L2 entry holds). A refcount→L2 dependency here made the
      // next link write back the L2 cache and fdatasync once per host cluster (~75% more bytes written).
      updateRefcountLocked: (hostClusterIndex, addend) => this.refcounts.updateRefcount(hostClusterIndex * this.geometry.clusterSize, this.geometry.clusterSize, addend),
      linkCompressedLocked: (guestClusterIndex, entry) => this.activeMap.linkCompressed(guestClusterIndex, entry),
    }, options);
  }

  /** A compressed write found an all-zero cluster: unallocated when nothing shows through, else a zero cluster. */
  private async zeroClusterForCompress(clusterIndex: number): Promise<void> {
    const g = this.geometry;
    const start = clusterIndex * g.clusterSize;
    const end = Math.min(start + g.clusterSize, this.virtualSize);
    if (this.backing === undefined) {
      await this.forEachClusterRun(start, end, (first, n) => this.activeMap.replaceEntries(first, n, (old) => this.activeMap.discardEntryFor(old, true)));
    } else if (this.header.version >= 3) {
      await this.forEachClusterRun(start, end, (first, n) => this.activeMap.replaceEntries(first, n, (old) => this.activeMap.zeroEntryFor(old)));
    } else {
      await this.writeNormal(start, Buffer.alloc(end - start));
    }
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

  /** Read host bytes of the image file, zero-filled past EOF. */
  async readHost(hostOffset: number, bytes: number): Promise<Buffer> {
    const buf = Buffer.alloc(bytes);
    const n = await this.file.pread(buf, hostOffset);
    if (n < bytes) buf.fill(0, n);
    return buf;
  }

  /**
   * The corruption funnel: throw a coded Qcow2CorruptError; when fatal on a writable image, set the
   * corrupt bit once and drop to read-only (reads go on).
   */
  signalCorruption(fatal: boolean, message: string, context: { structure: string; hostOffset?: number; index?: number; rawEntry?: string }): never {
    const error = new Qcow2CorruptError(message, { image: this.path, ...context }, fatal);
    if (fatal && !this.readOnly) {
      this.readOnlyReason = `corruption: ${message}`;
      const incompatibleFeatures = withBit(this.header.incompatibleFeatures, INCOMPAT_CORRUPT, true);
      if (this.header.version === 3) {
        this.header = { ...this.header, incompatibleFeatures };
        const bits = Buffer.alloc(8);
        bits.writeBigUInt64BE(incompatibleFeatures);
        this.inBackground(this.file.pwrite(bits, 72, 'header').then(() => this.file.fdatasync()).catch((err: unknown) => trace('could not set the corrupt bit: %o', err)));
      }
      process.emitWarning(`qcow2fuse: ${error.message}; image marked corrupt, now read-only`);
    }
    throw error;
  }

  /** Rewrite the header with `changes` (whole header area in one write), durably. */
  async updateHeader(changes: Partial<Qcow2Header>): Promise<void> {
    const next = { ...this.header, ...changes };
    const { bytes, header } = encodeHeader(next, this.path);
    await this.file.pwrite(bytes, 0, 'header');
    await this.file.fdatasync();
    this.header = header;
  }

  /** Track host I/O nobody awaits (corrupt bit, hole punching): close() waits for it, so it never hits a reused fd. */
  private inBackground(work: Promise<void>): void {
    const tracked: Promise<void> = work.finally(() => this.background.delete(tracked));
    this.background.add(tracked);
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
  private async processPunches(): Promise<void> {
    for (const [start, end] of this.punchQueue.take()) {
      await this.file.punchHole(start, end - start).catch((err: unknown) => trace('punch hole failed: %o', err));
    }
  }

  // ------------------------------------------------------------- in-flight tracking

  private addHostInflight(start: number, bytes: number): InflightRange {
    const range = { start, end: start + bytes };
    this.hostInflight.add(range);
    return range;
  }

  private removeHostInflight(range: InflightRange): void {
    this.hostInflight.delete(range);
    const waiters = this.hostIdleWaiters.splice(0);
    for (const w of waiters) w();
  }

  private async waitHostIdle(hostOffset: number, bytes: number): Promise<void> {
    const end = hostOffset + bytes;
    for (;;) {
      let busy = false;
      for (const r of this.hostInflight) if (r.start < end && r.end > hostOffset) { busy = true; break; }
      if (!busy) return;
      await new Promise<void>((resolve) => this.hostIdleWaiters.push(resolve));
    }
  }

  private markGuestBusy(firstCluster: number, nbClusters: number, exclusive: boolean): void {
    for (let c = firstCluster; c < firstCluster + nbClusters; c++) {
      const existing = this.guestBusy.get(c);
      if (existing) {
        existing.count++;
        continue;
      }
      let resolve!: () => void;
      const done = new Promise<void>((r) => { resolve = r; });
      this.guestBusy.set(c, { exclusive, count: 1, done, resolve });
    }
  }

  private clearGuestBusy(firstCluster: number, nbClusters: number): void {
    for (let c = firstCluster; c < firstCluster + nbClusters; c++) {
      const b = this.guestBusy.get(c);
      if (!b) continue;
      if (--b.count === 0) {
        this.guestBusy.delete(c);
        b.resolve();
      }
    }
  }

  private isGuestBusy(clusterIndex: number, exclusive: boolean): boolean {
    const b = this.guestBusy.get(clusterIndex);
    if (!b) return false;
    return exclusive || b.exclusive;
  }

  // ------------------------------------------------------------- reads

  private checkRange(guestOffset: number, bytes: number): void {
    if (!Number.isSafeInteger(guestOffset) || !Number.isSafeInteger(bytes) || guestOffset < 0 || bytes < 0 || guestOffset + bytes > this.virtualSize) {
      throw new Qcow2RangeError(this.path, `request [${guestOffset}, +${bytes}) outside the virtual disk (${this.virtualSize} bytes)`, { guestOffset, bytes });
    }
  }

  /**
   * A buffer for guest I/O of `bytes` that the data file takes without a copy (aligned memory when
   * it is open O_DIRECT) — QEMU's qemu_blockalign.
   */
  allocIoBuffer(bytes: number): Buffer {
    return allocIoBuffer(this.dataFile, bytes);
  }

  async read(guestOffset: number, bytes: number): Promise<Buffer> {
    this.checkRange(guestOffset, bytes);
    const buf = Buffer.allocUnsafe(bytes);
    await this.readIntoMap(this.activeMap, guestOffset, buf, true);
    return buf;
  }

  /** BackingReader: reads past the virtual size return zeros. */
  async readInto(guestOffset: number, buf: Buffer): Promise<void> {
    const inside = Math.max(0, Math.min(buf.length, this.virtualSize - guestOffset));
    if (inside > 0) await this.readIntoMap(this.activeMap, guestOffset, buf.subarray(0, inside), true);
    if (inside < buf.length) buf.fill(0, inside);
  }

  /**
   * Read guest bytes through `map` (active or a snapshot's) into `buf`. With `withPending`, data the
   * compressed writer still holds for these clusters is laid over what the mapping gives.
   */
  async readIntoMap(map: ClusterMap, guestOffset: number, buf: Buffer, withPending: boolean): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const segments: ReadSegment[] = [];
      const ranges: InflightRange[] = [];
      let overlay: ((out: Buffer) => void) | undefined;
      const start = guestOffset + done;
      const covered = await this.lock.run(async () => {
        let n = 0;
        // Map up to 64 slices' worth per lock hold.
        for (let i = 0; i < 64 && done + n < buf.length; i++) n += await map.mapForRead(start + n, buf.length - done - n, segments);
        for (const s of segments) if (s.kind === 'data' && !this.hasDataFile) ranges.push(this.addHostInflight(s.hostOffset, s.bytes));
        if (withPending && map === this.activeMap) overlay = this.compressedWriter?.overlayFor(start, n);
        return n;
      });
      try {
        await this.readSegments(segments, guestOffset, buf);
      } finally {
        for (const r of ranges) this.removeHostInflight(r);
      }
      overlay?.(buf.subarray(done, done + covered));
      done += covered;
    }
  }

  /**
   * Read mapped segments into `buf` (which starts at `guestOffset`), all in parallel. Whole compressed
   * clusters whose chunks lie back to back on the host (as `qemu-img convert -c` and our compressed
   * writer place them) are read with one pread per run of up to COMPRESSED_RUN_BYTES and decompressed
   * straight into `buf`; every other segment is read on its own.
   */
  private async readSegments(segments: ReadSegment[], guestOffset: number, buf: Buffer): Promise<void> {
    const out = (s: ReadSegment): Buffer => buf.subarray(s.guestOffset - guestOffset, s.guestOffset - guestOffset + s.bytes);
    const jobs: Promise<void>[] = [];
    let run: CompressedSegment[] = [];
    let runEnd = 0;
    const endRun = (): void => {
      if (run.length === 1) jobs.push(this.readSegment(run[0], out(run[0])));
      else if (run.length > 1) jobs.push(this.readCompressedRun(run, guestOffset, buf));
      run = [];
    };
    for (const s of segments) {
      if (s.kind !== 'compressed' || s.offsetInCluster !== 0 || s.bytes !== this.geometry.clusterSize || this.decompressed.peek(s.descriptor.hostOffset)) {
        jobs.push(this.readSegment(s, out(s)));
        continue;
      }
      const { hostOffset, compressedBytes } = s.descriptor;
      if (run.length > 0 && (hostOffset < run[0].descriptor.hostOffset || hostOffset > runEnd + COMPRESSED_RUN_GAP_BYTES
        || hostOffset + compressedBytes - run[0].descriptor.hostOffset > COMPRESSED_RUN_BYTES)) {
        endRun();
      }
      runEnd = run.length === 0 ? hostOffset + compressedBytes : Math.max(runEnd, hostOffset + compressedBytes);
      run.push(s);
    }
    endRun();
    await Promise.all(jobs);
  }

  /** One pread for the host range of several compressed chunks, then each decompressed into `buf`. */
  private async readCompressedRun(run: CompressedSegment[], guestOffset: number, buf: Buffer): Promise<void> {
    const start = run[0].descriptor.hostOffset;
    const end = Math.min(Math.max(...run.map((s) => s.descriptor.hostOffset + s.descriptor.compressedBytes)), (this.file as SizeTrackingFile).sizeBytes);
    const src = Buffer.allocUnsafe(Math.max(0, end - start));
    const n = await this.file.pread(src, start, 'compressed');
    await Promise.all(run.map((s) => {
      const { hostOffset, compressedBytes } = s.descriptor;
      const chunk = src.subarray(Math.min(n, hostOffset - start), Math.min(n, hostOffset - start + compressedBytes));
      return this.decompressChunk(chunk, hostOffset, compressedBytes, buf.subarray(s.guestOffset - guestOffset, s.guestOffset - guestOffset + s.bytes));
    }));
  }

  private async readSegment(s: ReadSegment, out: Buffer): Promise<void> {
    switch (s.kind) {
      case 'zero':
        out.fill(0);
        return;
      case 'backing':
        if (this.backing) await this.backing.readInto(s.guestOffset, out);
        else out.fill(0);
        return;
      case 'data': {
        // A compressed mount reads through its O_DIRECT handle too: read-back must not fill the page cache.
        const n = await (this.directFile ?? this.dataFile).pread(out, s.hostOffset, 'data');
        if (n < out.length) out.fill(0, n);
        return;
      }
      case 'compressed': {
        const { hostOffset, compressedBytes } = s.descriptor;
        // A whole cluster decompresses straight into the caller's buffer (no cache entry, no copy:
        // bulk reads stream); a part goes through the cache, so reading a cluster piecewise
        // decompresses it once.
        const cached = this.decompressed.peek(hostOffset);
        if (!cached && s.offsetInCluster === 0 && s.bytes === this.geometry.clusterSize) {
          await this.decompressInto(hostOffset, compressedBytes, out);
          return;
        }
        const cluster = cached ?? await this.readCompressedCluster(hostOffset, compressedBytes);
        cluster.copy(out, 0, s.offsetInCluster, s.offsetInCluster + s.bytes);
        return;
      }
    }
  }

  /** The decompressed contents of the compressed chunk at `hostOffset` (cached). */
  async readCompressedCluster(hostOffset: number, compressedBytes: number): Promise<Buffer> {
    return this.decompressed.get(hostOffset, async () => {
      const cluster = Buffer.allocUnsafe(this.geometry.clusterSize);
      await this.decompressInto(hostOffset, compressedBytes, cluster);
      return cluster;
    });
  }

  /** Read the compressed chunk at `hostOffset` and decompress it into `out` (one cluster). */
  private async decompressInto(hostOffset: number, compressedBytes: number, out: Buffer): Promise<void> {
    const readBytes = Math.min(compressedBytes, Math.max(0, (this.file as SizeTrackingFile).sizeBytes - hostOffset));
    const src = Buffer.allocUnsafe(readBytes);
    const n = await (this.directFile ?? this.file).pread(src, hostOffset, 'compressed');
    await this.decompressChunk(src.subarray(0, n), hostOffset, compressedBytes, out);
  }

  /** Decompress the chunk read from `hostOffset` into `out`; a bad chunk is (non-fatal) corruption. */
  private async decompressChunk(src: Buffer, hostOffset: number, compressedBytes: number, out: Buffer): Promise<void> {
    try {
      await decompressClusterInto(this.compressionType, src, out);
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      this.signalCorruption(false, `cannot decompress cluster at ${hostOffset} (${compressedBytes} bytes): ${message}`, { structure: 'compressed', hostOffset });
    }
  }

  // ------------------------------------------------------------- writes

  private assertWritable(): void {
    if (this.readOnlyReason !== undefined) throw new Qcow2ReadOnlyError(this.path, this.readOnlyReason);
    if (this.closed) throw new Qcow2ReadOnlyError(this.path, 'image is closed');
  }

  /**
   * Before the first change: mark the image dirty when it uses lazy refcounts (a crash then means
   * "repair refcounts on open"), and clear autoclear bits for features we do not maintain (bitmaps),
   * as the spec requires of programs that do not understand them.
   */
  private async prepareFirstWrite(): Promise<void> {
    if (this.firstWriteDone) return;
    await this.lock.run(async () => {
      if (this.firstWriteDone) return;
      const h = this.header;
      let incompatibleFeatures = h.incompatibleFeatures;
      let autoclearFeatures = h.autoclearFeatures;
      if (h.version === 3 && hasBit(h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS)) incompatibleFeatures = withBit(incompatibleFeatures, INCOMPAT_DIRTY, true);
      autoclearFeatures &= this.hasDataFile ? (1n << BigInt(AUTOCLEAR_DATA_FILE_RAW)) : 0n;
      if (incompatibleFeatures !== h.incompatibleFeatures || autoclearFeatures !== h.autoclearFeatures) {
        await this.updateHeader({ incompatibleFeatures, autoclearFeatures, bitmaps: autoclearFeatures === h.autoclearFeatures ? h.bitmaps : undefined });
      }
      this.firstWriteDone = true;
    });
  }

  private get dataFileRaw(): boolean {
    return this.hasDataFile && hasBit(this.header.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW);
  }

  async write(guestOffset: number, data: Uint8Array): Promise<void> {
    this.assertWritable();
    this.checkRange(guestOffset, data.length);
    if (data.length === 0) return;
    await this.prepareFirstWrite();
    if (this.compressedWriter) {
      await this.compressedWriter.write(guestOffset, data);
      return;
    }
    await this.writeNormal(guestOffset, data);
  }

  /** The uncompressed write path: allocate, COW, write data, link. */
  /**
   * @param dataFile where the data goes: the image's data file, or (compressed mounts writing a
   *   cluster that does not compress) the O_DIRECT handle, so it does not fill the page cache either.
   */
  private async writeNormal(guestOffset: number, data: Uint8Array, dataFile: HostFile = this.dataFile): Promise<void> {
    const src = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    let done = 0;
    while (done < src.length) {
      const offset = guestOffset + done;
      const result = await this.lock.run(async () => {
        this.assertWritable();
        const plans = await this.activeMap.planWrite(offset, src.length - done, (c, exclusive) => this.isGuestBusy(c, exclusive), () => this.highWaterBytes);
        if (plans.length === 0) return { waitFor: this.guestBusy.get(this.geometry.clusterIndex(offset))?.done, plans };
        for (const p of plans) {
          if (p.mode === 'alloc' && !this.hasDataFile) {
            const runEnd = p.hostOffset + p.nbClusters * this.geometry.clusterSize;
            if (this.preallocate) {
              await this.preallocateAhead(p.hostOffset, runEnd);
              // Preallocated inside the file and never written: zero on disk, so it may be linked first.
              if (!this.preallocUnsupported && runEnd <= (this.file as SizeTrackingFile).sizeBytes) await this.activeMap.linkZeroedBeforeData(p);
            }
            this.highWaterBytes = Math.max(this.highWaterBytes, runEnd);
          }
          this.markGuestBusy(p.firstCluster, p.nbClusters, p.mode !== 'direct' && p.mode !== 'linked');
        }
        return { waitFor: undefined, plans };
      });
      if (result.plans.length === 0) {
        await result.waitFor;
        continue;
      }
      const results = await Promise.allSettled(result.plans.map((p) => this.executePlan(p, src.subarray(p.guestOffset - guestOffset, p.guestOffset - guestOffset + p.bytes), dataFile)));
      const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw failed.reason;
      done += result.plans.reduce((n, p) => n + p.bytes, 0);
    }
    if (this.cacheMode === 'writethrough') await this.flush();
  }

  /**
   * Write one planned run: data (with COW fill) outside the lock, then link under it. A failed data
   * write releases the new clusters (never linked) and leaves the old mapping in place. 'direct'
   * and 'linked' runs only write their data (a 'linked' run's clusters read as zero meanwhile).
   */
  private async executePlan(plan: ClusterWritePlan, data: Buffer, dataFile: HostFile): Promise<void> {
    const g = this.geometry;
    const runStart = plan.firstCluster * g.clusterSize;
    try {
      if (plan.mode === 'direct' || plan.mode === 'linked') {
        // QEMU's pre-write overlap check: an entry pointing at live metadata must not get data written over it.
        this.activeMap.assertNoOverlap(plan.hostOffset + (plan.guestOffset - runStart), data.length, 'data');
        const range = this.hasDataFile ? undefined : this.addHostInflight(plan.hostOffset + (plan.guestOffset - runStart), data.length);
        try {
          await dataFile.pwrite(data, plan.hostOffset + (plan.guestOffset - runStart), 'data');
        } finally {
          if (range) this.removeHostInflight(range);
        }
        return;
      }
      const newEntries: RawL2Entry[] = [];
      try {
        await this.writeWithFill(plan, data, dataFile);
        for (let i = 0; i < plan.nbClusters; i++) {
          const clusterStart = runStart + i * g.clusterSize;
          const start = Math.max(plan.guestOffset, clusterStart) - clusterStart;
          const end = Math.min(plan.guestOffset + plan.bytes, clusterStart + g.clusterSize) - clusterStart;
          newEntries.push(this.activeMap.newEntryAfterWrite(plan.oldEntries[i], plan.hostOffset + i * g.clusterSize, start, end));
        }
      } catch (err) {
        await this.lock.run(() => this.activeMap.abortAlloc(plan)).catch(() => undefined);
        throw err;
      }
      await this.lock.run(() => this.activeMap.linkL2(plan, newEntries));
    } finally {
      this.clearGuestBusy(plan.firstCluster, plan.nbClusters);
    }
  }

  /**
   * Seed 002: when new clusters lie past the end of the file, extend it with fallocate(ZERO_RANGE)
   * up to the next PREALLOC_AHEAD_BYTES boundary, so the data writes that follow are overwrites of
   * allocated zeros instead of many small file-extending writes (each one a metadata update of the
   * host filesystem). Runs under the metadata lock and starts at this run's own clusters: anything
   * between the old end of file and them belongs to writes still in flight and is never touched.
   */
  private async preallocateAhead(runStart: number, runEnd: number): Promise<void> {
    const tracked = this.file as SizeTrackingFile;
    // Extended L2: subclusters a write does not touch stay unallocated and QEMU leaves them holes in
    // the file; allocating them ahead would make a converted image bigger than qemu-img's.
    if (this.preallocUnsupported || this.geometry.extendedL2 || runEnd <= tracked.sizeBytes) return;
    const cs = this.geometry.clusterSize;
    const aheadBytes = Math.max(cs, Math.min(PREALLOC_AHEAD_BYTES, 16 * cs));
    const start = Math.max(tracked.sizeBytes, runStart);
    const end = Math.max(runEnd, Math.ceil(runEnd / aheadBytes) * aheadBytes);
    try {
      if (!(await tracked.zeroRange(start, end - start, false))) this.preallocUnsupported = true;
    } catch (err) {
      // Only an optimisation: a host that cannot reserve the space (ENOSPC …) still gets the data
      // write, which reports the error if it too fails.
      trace('preallocation of %d+%d failed: %o', start, end - start, err);
    }
  }

  /**
   * Give back the tail of the file past the last allocated cluster that this session added
   * (preallocation ahead, the compressed writer's unused area, clusters freed at the end): close.
   * Never below the size at open, so whatever another tool left past its clusters stays.
   */
  private async trimTail(): Promise<void> {
    const tracked = this.file as SizeTrackingFile;
    const allocatedEnd = await this.refcounts.allocatedEnd();
    const target = Math.max(allocatedEnd, tracked.openedBytes);
    if (allocatedEnd > 0 && (await tracked.size()) > target) await tracked.truncate(target);
  }

  /**
   * Write `data` into the run's host clusters together with the COW fill the clusters need: the
   * parts of touched clusters (standard L2) or subclusters (extended L2) that the request does not
   * cover are filled with their current guest contents. A fill that would be zeros is skipped when
   * the host clusters are known to read as zero, or done with fallocate ZERO_RANGE (seed 002).
   */
  private async writeWithFill(plan: ClusterWritePlan, data: Buffer, dataFile: HostFile): Promise<void> {
    const g = this.geometry;
    const runStart = plan.firstCluster * g.clusterSize;
    const runEnd = runStart + plan.nbClusters * g.clusterSize;
    const reqStart = plan.guestOffset;
    const reqEnd = plan.guestOffset + plan.bytes;
    let fillStart: number;
    let fillEnd: number;
    const moved = plan.mode === 'alloc';
    const first = plan.oldEntries[0];
    const last = plan.oldEntries[plan.oldEntries.length - 1];
    if (!g.extendedL2) {
      fillStart = moved ? runStart : reqStart;
      fillEnd = moved ? runEnd : reqEnd;
    } else {
      // Whole clusters when the old cluster had data of its own that must move along.
      const wholeFirst = moved && this.entryHasOwnData(first);
      const wholeLast = moved && this.entryHasOwnData(last);
      fillStart = wholeFirst ? runStart : reqStart - ((reqStart - runStart) % g.subclusterSize);
      const tailCluster = runEnd - g.clusterSize;
      fillEnd = wholeLast ? runEnd : Math.min(runEnd, tailCluster + Math.ceil((reqEnd - tailCluster) / g.subclusterSize) * g.subclusterSize);
      if (plan.nbClusters > 1 && moved) {
        // Middle clusters are fully covered; only the edge clusters' partial parts need care.
        fillStart = Math.min(fillStart, reqStart);
        fillEnd = Math.max(fillEnd, reqEnd);
      }
    }
    const host = (guest: number): number => plan.hostOffset + (guest - runStart);
    if (fillStart === reqStart && fillEnd === reqEnd) {
      await dataFile.pwrite(data, host(reqStart), 'data');
      return;
    }
    const head = reqStart - fillStart;
    const tail = fillEnd - reqEnd;
    const headBuf = Buffer.alloc(head);
    const tailBuf = Buffer.alloc(tail);
    const headZero = head === 0 || await this.readOldForCow(reqStart - head, headBuf);
    const tailZero = tail === 0 || await this.readOldForCow(reqEnd, tailBuf);
    if (headZero && tailZero && moved) {
      if (plan.hostKnownZero) {
        await dataFile.pwrite(data, host(reqStart), 'data');
        return;
      }
      if (this.preallocate && await this.dataFile.zeroRange(host(fillStart), fillEnd - fillStart, true)) {
        await dataFile.pwrite(data, host(reqStart), 'data');
        return;
      }
    }
    const buf = allocIoBuffer(dataFile, fillEnd - fillStart);
    headBuf.copy(buf, 0);
    data.copy(buf, head);
    tailBuf.copy(buf, head + data.length);
    await dataFile.pwrite(buf, host(fillStart), 'data');
  }


  private entryHasOwnData(e: RawL2Entry): boolean {
    return isCompressed(e) || ((this.hasDataFile || l2HostOffset(e) !== 0) && e.allocBitmap !== 0);
  }


  /** Fill `buf` with the current guest contents at `guestOffset` (the COW source); true when it is all zeros by mapping. */
  private async readOldForCow(guestOffset: number, buf: Buffer): Promise<boolean> {
    const segments: ReadSegment[] = [];
    await this.lock.run(async () => {
      let n = 0;
      while (n < buf.length) n += await this.activeMap.mapForRead(guestOffset + n, buf.length - n, segments);
    });
    if (segments.every((s) => s.kind === 'zero')) {
      buf.fill(0);
      return true;
    }
    await this.readSegments(segments, guestOffset, buf);
    return false;
  }

  /**
   * Make [guestOffset, +bytes) read as zeros: whole clusters get the zero flag (or zero bitmap) and
   * lose their storage; partial clusters are written with zeros.
   */
  async writeZeroes(guestOffset: number, bytes: number): Promise<void> {
    this.assertWritable();
    this.checkRange(guestOffset, bytes);
    if (bytes === 0) return;
    await this.prepareFirstWrite();
    await this.compressedWriter?.flush();
    const g = this.geometry;
    const end = guestOffset + bytes;
    const alignedStart = Math.ceil(guestOffset / g.clusterSize) * g.clusterSize;
    const alignedEnd = Math.max(alignedStart, end === this.virtualSize ? Math.ceil(end / g.clusterSize) * g.clusterSize : end - (end % g.clusterSize));
    const canFlag = this.header.version >= 3 && !this.dataFileRaw;
    if (!canFlag || alignedStart >= alignedEnd) {
      await this.writeZeroBytes(guestOffset, bytes);
      return;
    }
    if (alignedStart > guestOffset) await this.writeZeroBytes(guestOffset, alignedStart - guestOffset);
    await this.forEachClusterRun(alignedStart, alignedEnd, (first, n) => this.activeMap.replaceEntries(first, n, (old) => this.activeMap.zeroEntryFor(old)));
    if (end > alignedEnd) await this.writeZeroBytes(alignedEnd, end - alignedEnd);
    if (this.cacheMode === 'writethrough') await this.flush();
  }

  private async writeZeroBytes(guestOffset: number, bytes: number): Promise<void> {
    const chunk = Buffer.alloc(Math.min(bytes, 4 * 1024 * 1024));
    for (let done = 0; done < bytes; done += chunk.length) {
      const n = Math.min(chunk.length, bytes - done);
      await this.write(guestOffset + done, chunk.subarray(0, n));
    }
  }

  /**
   * Run `fn(firstCluster, nbClusters)` under the lock for each slice-bounded run of whole clusters in
   * [start, end), waiting for clusters other requests are writing.
   */
  private async forEachClusterRun(start: number, end: number, fn: (firstCluster: number, nbClusters: number) => Promise<void>): Promise<void> {
    const g = this.geometry;
    const sliceCoverage = g.l2SliceEntries * g.clusterSize;
    let pos = start;
    while (pos < end) {
      const runEnd = Math.min(end, pos - (pos % sliceCoverage) + sliceCoverage);
      const first = g.clusterIndex(pos);
      const n = g.clusterIndex(runEnd - 1) - first + 1;
      let waitFor: Promise<void> | undefined;
      await this.lock.run(async () => {
        this.assertWritable();
        for (let c = first; c < first + n; c++) {
          const b = this.guestBusy.get(c);
          if (b) { waitFor = b.done; return; }
        }
        await fn(first, n);
      });
      if (waitFor) {
        await waitFor;
        continue;
      }
      pos = runEnd;
    }
  }

  /**
   * Discard [guestOffset, +bytes): whole clusters are unmapped (reading zeros on v3, backing data or
   * zeros on v2 as QEMU does) and their host space released; partial clusters are left as they are.
   */
  async discard(guestOffset: number, bytes: number): Promise<void> {
    this.assertWritable();
    this.checkRange(guestOffset, bytes);
    await this.prepareFirstWrite();
    await this.compressedWriter?.flush();
    const g = this.geometry;
    const end = guestOffset + bytes;
    const alignedStart = Math.ceil(guestOffset / g.clusterSize) * g.clusterSize;
    const alignedEnd = end === this.virtualSize ? Math.ceil(end / g.clusterSize) * g.clusterSize : end - (end % g.clusterSize);
    if (alignedStart >= alignedEnd || this.dataFileRaw) return;
    await this.forEachClusterRun(alignedStart, alignedEnd, (first, n) => this.activeMap.replaceEntries(first, n, (old) => this.activeMap.discardEntryFor(old, false)));
    if (this.cacheMode === 'writethrough') await this.flush();
  }

  /** Link every pending compressed write, so the tables describe all data written (block status, seek). */
  async settle(): Promise<void> {
    await this.compressedWriter?.flush();
  }

  // ------------------------------------------------------------- drained sections (snapshot-ops.ts)

  /**
   * Run `fn` under the metadata lock with no guest write in flight (QEMU drains all I/O around
   * snapshot operations): pending compressed data is linked and the compressed writer's open host
   * clusters are closed (none is appended to once a snapshot shares it), and every write that
   * planned against the tables has finished, so `fn` may rewrite L1/L2 tables and refcounts freely.
   */
  async runDrained<T>(fn: () => Promise<T>): Promise<T> {
    this.assertWritable();
    await this.prepareFirstWrite();
    for (;;) {
      await this.compressedWriter?.close();
      let waitFor: Promise<void> | undefined;
      const result = await this.lock.run(async () => {
        this.assertWritable();
        const busy = this.guestBusy.values().next();
        if (!busy.done) {
          waitFor = busy.value.done;
          return undefined;
        }
        // Refcounts exact before the tables are rewritten (overwritten entries are freed in batches).
        await this.activeMap.releaseDeferredFrees();
        return { value: await fn() };
      });
      if (result) return result.value;
      await waitFor;
    }
  }

  /** Write back every cache in order (refcounts before L2) and fdatasync: everything written is durable. */
  async flush(): Promise<void> {
    if (this.readOnly || this.closed) return;
    await this.compressedWriter?.flush();
    await this.lock.run(() => this.flushLocked());
  }

  private async flushLocked(): Promise<void> {
    await this.activeMap.releaseDeferredFrees();
    await this.l2Cache.flush();
    await this.refcountCache.flush();
    await this.file.fdatasync();
    await this.processPunches();
    if (this.hasDataFile) await this.dataFile.fdatasync();
  }

  /**
   * Change the virtual size. Growing extends L1 as needed and zeroes the tail of a partial last
   * cluster; shrinking frees every cluster past the new end (as `qemu-img resize --shrink`).
   */
  async resize(newVirtualSize: number): Promise<void> {
    this.assertWritable();
    if (!Number.isSafeInteger(newVirtualSize) || newVirtualSize < 0) throw new Qcow2RangeError(this.path, `invalid size ${newVirtualSize}`);
    if (this.snapshots.length > 0 && newVirtualSize < this.virtualSize) {
      throw new CodedError('EINVAL', `${this.path}: cannot shrink an image with internal snapshots`, { image: this.path });
    }
    await this.prepareFirstWrite();
    await this.compressedWriter?.flush();
    const g = this.geometry;
    const oldSize = this.virtualSize;
    if (newVirtualSize === oldSize) return;
    if (newVirtualSize > oldSize) {
      await this.lock.run(async () => {
        await this.activeMap.growL1(g.l1EntriesFor(newVirtualSize));
        await this.updateHeader({ virtualSize: newVirtualSize });
      });
      const tailEnd = Math.min(newVirtualSize, Math.ceil(oldSize / g.clusterSize) * g.clusterSize);
      if (tailEnd > oldSize) await this.writeZeroes(oldSize, tailEnd - oldSize);
      return;
    }
    const firstFree = Math.ceil(newVirtualSize / g.clusterSize) * g.clusterSize;
    const oldEnd = Math.ceil(oldSize / g.clusterSize) * g.clusterSize;
    if (firstFree < oldEnd) {
      await this.forEachClusterRun(firstFree, oldEnd, (first, n) => this.activeMap.replaceEntries(first, n, (old) => this.activeMap.discardEntryFor(old, true)));
    }
    await this.lock.run(async () => {
      await this.flushLocked();
      await this.activeMap.dropL2TablesFrom(g.l1EntriesFor(newVirtualSize));
      await this.updateHeader({ virtualSize: newVirtualSize });
    });
  }

  /**
   * Host clusters referenced by something other than the image's tables while it is open: the
   * compressed writer's clusters still open for chunks (see CompressedWriter.heldHostClusters).
   * Under the metadata lock.
   */
  heldHostClustersLocked(): number[] {
    return this.compressedWriter?.heldHostClusters() ?? [];
  }

  /** Bytes of host storage referenced by the image (clusters with a refcount), for st_blocks. */
  async allocatedBytes(): Promise<number> {
    return this.lock.run(async () => (await this.refcounts.countAllocatedClusters()) * this.geometry.clusterSize);
  }

  /** Flush, clear the dirty bit we set, unlock and close (the image, its data file and backing chain). Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (!this.readOnly) {
        await this.compressedWriter?.close();
        await this.lock.run(async () => {
          await this.flushLocked();
          await this.trimTail();
          if (hasBit(this.header.incompatibleFeatures, INCOMPAT_DIRTY)) {
            await this.updateHeader({ incompatibleFeatures: withBit(this.header.incompatibleFeatures, INCOMPAT_DIRTY, false) });
          }
        });
      }
    } finally {
      this.closed = true;
      await Promise.allSettled([...this.background]);
      await this.backing?.close();
      if (this.directFile) await this.directFile.close();
      if (this.hasDataFile) await this.dataFile.close();
      await this.file.close();
    }
  }
}

/**
 * The image file as the driver sees it: forwards to the real HostFile and keeps its size (for
 * "past the end of the file" checks) and the highest byte ever written (for known-zero clusters).
 */
class SizeTrackingFile extends ForwardingHostFile {
  sizeBytes: number;
  /** The file's size when the image was opened. */
  readonly openedBytes: number;
  onWrite: (endBytes: number) => void = () => undefined;

  constructor(inner: HostFile, sizeBytes: number) {
    super(inner);
    this.sizeBytes = sizeBytes;
    this.openedBytes = sizeBytes;
  }

  override async pwrite(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<void> {
    this.onWrite(hostOffset + buf.length);
    await this.inner.pwrite(buf, hostOffset, point);
    this.noteWrite(hostOffset + buf.length);
  }

  /** Record a write that reached the file through another handle. */
  noteWrite(endBytes: number): void {
    this.onWrite(endBytes);
    this.sizeBytes = Math.max(this.sizeBytes, endBytes);
  }

  override async size(): Promise<number> {
    this.sizeBytes = await this.inner.size();
    return this.sizeBytes;
  }

  override async truncate(bytes: number): Promise<void> {
    await this.inner.truncate(bytes);
    this.sizeBytes = bytes;
  }

  override async zeroRange(offset: number, length: number, keepSize?: boolean): Promise<boolean> {
    const ok = await this.inner.zeroRange(offset, length, keepSize);
    if (ok && !keepSize) this.sizeBytes = Math.max(this.sizeBytes, offset + length);
    return ok;
  }

  override async allocate(offset: number, length: number, keepSize?: boolean): Promise<boolean> {
    const ok = await this.inner.allocate(offset, length, keepSize);
    if (ok && !keepSize) this.sizeBytes = Math.max(this.sizeBytes, offset + length);
    return ok;
  }
}

/** Buffered stand-in for an O_DIRECT handle: every write is followed by fadvise(DONTNEED). */
class DropCacheFile extends ForwardingHostFile {
  override get direct(): boolean { return false; }

  override async pwrite(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<void> {
    await this.inner.pwrite(buf, hostOffset, point);
    await this.inner.fdatasync();
    await this.inner.dropCache(hostOffset, buf.length);
  }

  /** The wrapped handle is the image's own: closing this stand-in does not close it. */
  override close(): Promise<void> { return Promise.resolve(); }
}

/** A set of disjoint [start, end) byte ranges. */
class RangeQueue {
  private ranges: [number, number][] = [];

  add(start: number, end: number): void {
    this.ranges.push([start, end]);
  }

  /** Remove [start, end) from every range (splitting where needed). */
  remove(start: number, end: number): void {
    if (this.ranges.length === 0) return;
    const out: [number, number][] = [];
    for (const [a, b] of this.ranges) {
      if (b <= start || a >= end) { out.push([a, b]); continue; }
      if (a < start) out.push([a, start]);
      if (b > end) out.push([end, b]);
    }
    this.ranges = out;
  }

  /** All ranges, merged and sorted; the queue is emptied. */
  take(): [number, number][] {
    const sorted = this.ranges.sort((x, y) => x[0] - y[0]);
    this.ranges = [];
    const merged: [number, number][] = [];
    for (const [a, b] of sorted) {
      const last = merged[merged.length - 1];
      if (last && a <= last[1]) last[1] = Math.max(last[1], b);
      else merged.push([a, b]);
    }
    return merged;
  }
}
