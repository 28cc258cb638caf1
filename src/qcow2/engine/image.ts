/**
 * Qcow2Image: an open qcow2 image — the BlockDevice the CLI and the FUSE layer drive. A façade: the
 * image's state lives in an ImageState (state.ts) and each verb in its own module, the way qcow2-rs
 * splits its Qcow2Dev into dev/{read,write,alloc,discard}:
 *
 *   lifecycle.ts     open, close, drained sections (snapshot operations)
 *   read.ts          the read path (mapping under the lock, segment reads, compressed runs)
 *   write.ts         the write path (plan, COW fill, data, link; preallocation ahead)
 *   zero-discard.ts  zero writes, discard, resize
 *   flush.ts         write-back of the caches in order, and sync
 *   inflight.ts      guest clusters and host ranges in flight
 *   corruption.ts    the corruption funnel
 *
 * over the structures they share: cluster-map.ts and cluster-discard.ts (guest → host mapping and its
 * updates, with the write-ordering rules), refcount.ts, table-cache.ts, overlap.ts, compressed-writer.ts.
 *
 * Concurrency (DESIGN §4): metadata (L1/L2/refcounts, header) changes run under one AsyncLock;
 * data I/O runs outside it. Maintenance code inside src/qcow2 (check, repair, snapshot operations,
 * info, map, layout) reaches the state with imageState(); library users see only this class.
 */
import type { BackingReader } from './backing.js';
import type { BlockDevice } from './block-device.js';
import { flush } from './flush.js';
import { closeImageState, openImageState } from './lifecycle.js';
import type { Qcow2OpenOptions } from './options.js';
import { readIntoMap } from './read.js';
import { allocIoBuffer, type ImageState } from './state.js';
import { write } from './write.js';
import { discard, resize, writeZeroes } from './zero-discard.js';
import type { Geometry } from '../format/geometry.js';
import type { SnapshotEntry } from '../format/snapshot-table.js';

export type { CacheMode, Qcow2OpenOptions } from './options.js';

const states = new WeakMap<Qcow2Image, ImageState>();

/** The internal state of an open image, for the code of src/qcow2 that maintains it (not public API). */
export function imageState(image: Qcow2Image): ImageState {
  const s = states.get(image);
  if (s === undefined) throw new TypeError('not an open Qcow2Image');
  return s;
}

export class Qcow2Image implements BlockDevice, BackingReader {
  readonly format = 'qcow2' as const;
  readonly path: string;

  private readonly s: ImageState;

  private constructor(s: ImageState) {
    this.path = s.path;
    this.s = s;
    states.set(this, s);
  }

  /**
   * Open an image. Read-only opens take QEMU's reader locks (or share everything with forceShare,
   * like `qemu-img -U`); writable opens take QEMU's write locks. Backing files open as readers.
   */
  static async open(path: string, options: Qcow2OpenOptions): Promise<Qcow2Image> {
    const s = await openImageState(path, options, (p, f, chain) => Qcow2Image.open(p, {
      readOnly: true, file: f, chain, openHostFile: options.openHostFile, cache: options.cache, forceShare: options.forceShare,
    }));
    return new Qcow2Image(s);
  }

  /**
   * The guest disk's size in bytes: the header's size rounded down to whole 512-byte sectors, as
   * QEMU's block layer sees it (a header size of 1000 is a 512-byte disk to qemu-img and qemu-io).
   */
  get virtualSize(): number {
    return this.s.virtualSize;
  }

  get readOnly(): boolean {
    return this.s.readOnly;
  }

  /** The qcow2 version of the image (2 or 3). */
  get version(): 2 | 3 {
    return this.s.header.version;
  }

  /** The backing image (qcow2 or raw) whose data shows through unallocated clusters, if any. */
  get backing(): BackingReader | undefined {
    return this.s.backing;
  }

  /** Whether guest data lives in an external data file (data_file extension). */
  get hasDataFile(): boolean {
    return this.s.hasDataFile;
  }

  /** The external data file's path, when there is one. */
  get dataFilePath(): string | undefined {
    return this.s.hasDataFile ? this.s.dataFile.path : undefined;
  }

  /** Cluster size and the sizes derived from it. */
  get geometry(): Geometry {
    return this.s.geometry;
  }

  /** The internal snapshots, in table order. */
  get snapshots(): readonly SnapshotEntry[] {
    return this.s.snapshots;
  }

  /**
   * A buffer for guest I/O of `bytes` that the data file takes without a copy (aligned memory when
   * it is open O_DIRECT) — QEMU's qemu_blockalign.
   */
  allocIoBuffer(bytes: number): Buffer {
    return allocIoBuffer(this.s.dataFile, bytes);
  }

  async read(guestOffset: number, bytes: number): Promise<Buffer> {
    const s = this.s;
    s.checkRange(guestOffset, bytes);
    const buf = Buffer.allocUnsafe(bytes);
    await readIntoMap(s, s.activeMap, guestOffset, buf, true);
    return buf;
  }

  /** BackingReader: reads past the virtual size return zeros. */
  async readInto(guestOffset: number, buf: Buffer): Promise<void> {
    const s = this.s;
    const inside = Math.max(0, Math.min(buf.length, s.virtualSize - guestOffset));
    if (inside > 0) await readIntoMap(s, s.activeMap, guestOffset, buf.subarray(0, inside), true);
    if (inside < buf.length) buf.fill(0, inside);
  }

  write(guestOffset: number, data: Uint8Array): Promise<void> {
    return write(this.s, guestOffset, data);
  }

  /**
   * Make [guestOffset, +bytes) read as zeros: whole clusters get the zero flag (or zero bitmap) and
   * lose their storage; partial clusters are written with zeros.
   */
  writeZeroes(guestOffset: number, bytes: number): Promise<void> {
    return writeZeroes(this.s, guestOffset, bytes);
  }

  /**
   * Discard [guestOffset, +bytes): whole clusters are unmapped (reading zeros on v3, backing data or
   * zeros on v2 as QEMU does) and their host space released; partial clusters are left as they are.
   */
  discard(guestOffset: number, bytes: number): Promise<void> {
    return discard(this.s, guestOffset, bytes);
  }

  /** Link every pending compressed write, so the tables describe all data written (block status, seek). */
  async settle(): Promise<void> {
    await this.s.compressedWriter?.flush();
  }

  /** Write back every cache in order (refcounts before L2) and fdatasync: everything written is durable. */
  flush(): Promise<void> {
    return flush(this.s);
  }

  /**
   * Change the virtual size. Growing extends L1 as needed and zeroes the tail of a partial last
   * cluster; shrinking frees every cluster past the new end (as `qemu-img resize --shrink`).
   */
  resize(newVirtualSize: number): Promise<void> {
    return resize(this.s, newVirtualSize);
  }

  /** Bytes of host storage referenced by the image (clusters with a refcount), for st_blocks. */
  async allocatedBytes(): Promise<number> {
    const s = this.s;
    return s.lock.run(async () => (await s.refcounts.countAllocatedClusters()) * s.geometry.clusterSize);
  }

  /** Flush, clear the dirty bit we set, unlock and close (the image, its data file and backing chain). Idempotent. */
  close(): Promise<void> {
    return closeImageState(this.s);
  }
}
