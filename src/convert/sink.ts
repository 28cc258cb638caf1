/**
 * Convert destinations: a new (or, with -n, existing) qcow2 image written through Qcow2Image — with
 * -c through its compressed writer, the same gathering, packing and O_DIRECT path a compressed mount
 * uses — a raw file or block device, or stdout (a stream: every byte, in order).
 */
import { open, writeFile } from 'node:fs/promises';
import { statSync } from 'node:fs';
import type { Writable } from 'node:stream';
import { openNodeHostFile } from '../io/node-host-file.js';
import { ForwardingHostFile, type HostFile, type HostFileOpener } from '../io/host-file.js';
import type { Qcow2Image, CacheMode } from '../qcow2/engine/image.js';
import { createImage, openImage, type CreateOptions } from '../node.js';
import type { CompressedWriterOptions } from '../qcow2/engine/compressed-writer.js';
import { ConvertError } from './errors.js';
import { hostSizeBytes } from './host-source.js';
import { zeroBlock } from '../qcow2/engine/zeros.js';
import type { ImageFormat } from './source.js';

export interface ConvertSink {
  readonly path: string;
  /** Unit of zero detection in bytes: the image's cluster, or the -S granule of a raw file. */
  readonly granuleBytes: number;
  /** Unwritten ranges read as zeros (a new file or image); false for an existing target (-n). */
  readonly zeroInitialized: boolean;
  /** Writes must come one after another in guest order, zeros included (stdout). */
  readonly ordered: boolean;
  /**
   * Windows written at once. Buffered writes into one file serialise on its inode lock, and 4 at
   * once took twice the time of one after the other (320 MiB: 223 vs 121 ms, ext4): 1 for files;
   * the compressed writer only holds the data (and waits when full), so 2 keep it fed.
   */
  readonly parallelWrites: number;
  /** Make the destination at least `bytes` big (a stream's destination grows as data arrives). */
  ensureSize(bytes: number): Promise<void>;
  writeData(guestOffset: number, data: Buffer): Promise<void>;
  writeZeroes(guestOffset: number, bytes: number): Promise<void>;
  /** Give the destination its final size, make it durable as the cache mode asks, close it. */
  finish(virtualSize: number): Promise<void>;
  /** Close after a failure; what was written stays consistent (a qcow2 image may leak, never corrupt). */
  abort(): Promise<void>;
}

/** qemu-img's cache modes for the destination (-t); 'unsafe' never syncs. */
export type ConvertCacheMode = 'unsafe' | 'writeback' | 'none' | 'writethrough' | 'directsync';

export interface OpenSinkOptions {
  format: ImageFormat;
  /** The size to create; undefined for a stream source (the destination grows). */
  virtualSize: number | undefined;
  /** False for -n: the target exists and is written over (zeros are written explicitly). */
  create: boolean;
  /** qcow2 creation options (-o), including the backing file of -B. */
  createOptions?: CreateOptions;
  /** -c: every cluster compressed. */
  compress?: boolean;
  /** -t (default unsafe). */
  cache?: ConvertCacheMode;
  /** -S in bytes (raw granule; default 4096). */
  minSparseBytes?: number;
  openHostFile?: HostFileOpener;
  compressedWriter?: CompressedWriterOptions;
  /** For DEST '-': where the bytes go (default process.stdout). */
  stdout?: Writable;
}

/** Guest size a stream's qcow2 destination starts with; it doubles as data arrives. */
const STREAM_INITIAL_BYTES = 1024 * 1024 * 1024;

export async function openConvertSink(path: string, o: OpenSinkOptions): Promise<ConvertSink> {
  if (path === '-') {
    if (o.format !== 'raw') throw new ConvertError('EINVAL', "DEST '-' (stdout) needs -O raw", { path });
    return new StdoutSink(o.stdout ?? process.stdout);
  }
  return o.format === 'qcow2' ? Qcow2Sink.open(path, o) : RawSink.open(path, o);
}

/** A host file whose fdatasync does nothing: qemu's cache=unsafe (flushes ignored). */
class UnsafeHostFile extends ForwardingHostFile {
  override async fdatasync(): Promise<void> {}
}

/**
 * The opener for the destination's files. cache=unsafe (qemu-img convert's default) ignores flushes,
 * as QEMU does: the image's ordering barriers (data before L2, refcounts before L2) are fdatasyncs
 * that stall the copy behind the disk's writeback, and only matter if the host crashes mid-copy —
 * after which, as with qemu-img, the output is not to be trusted anyway. Completed writes are all in
 * the file, so a copy that fails (ENOSPC, EIO) still leaves a consistent image.
 */
function destinationOpener(o: OpenSinkOptions): HostFileOpener {
  const opener = o.openHostFile ?? openNodeHostFile;
  if ((o.cache ?? 'unsafe') !== 'unsafe') return opener;
  return async (path, options) => new UnsafeHostFile(await opener(path, options));
}

function imageCache(cache: ConvertCacheMode | undefined): CacheMode {
  if (cache === 'none' || cache === 'directsync') return 'none';
  return cache === 'writethrough' ? 'writethrough' : 'writeback';
}

/** A qcow2 image: all-zero clusters stay unallocated, the rest is written (compressed with -c). */
class Qcow2Sink implements ConvertSink {
  readonly ordered = false;
  readonly parallelWrites: number;
  private sizeBytes: number;

  private constructor(readonly path: string, private readonly image: Qcow2Image, readonly zeroInitialized: boolean, private readonly compress: boolean) {
    this.sizeBytes = image.virtualSize;
    this.parallelWrites = compress ? 2 : 1;
  }

  static async open(path: string, o: OpenSinkOptions): Promise<Qcow2Sink> {
    const openHostFile = destinationOpener(o);
    if (o.create) await createImage(path, { ...o.createOptions, virtualSize: o.virtualSize ?? o.createOptions?.virtualSize ?? STREAM_INITIAL_BYTES, openHostFile });
    const image = await openImage(path, {
      // convert decides itself which clusters to write (all of them with -S 0): every write is meant.
      readOnly: false, compress: o.compress ?? false, cache: imageCache(o.cache), openHostFile, detectZeroes: false,
      ...(o.compressedWriter ? { compressedWriter: o.compressedWriter } : {}),
    });
    if (!o.create && o.virtualSize !== undefined && image.virtualSize < o.virtualSize) {
      await image.close();
      throw new ConvertError('EINVAL', `${path}: the target image is smaller than the source (${image.virtualSize} < ${o.virtualSize} bytes)`, { path });
    }
    return new Qcow2Sink(path, image, o.create, o.compress ?? false);
  }

  /**
   * Compressed: whole clusters (the unit compressed). Otherwise qemu-img's 4 KiB: a cluster written
   * in part is completed by the driver (zeros), and with extended L2 the untouched subclusters stay
   * unallocated — as qemu-img leaves them.
   */
  get granuleBytes(): number {
    return this.compress ? this.image.geometry.clusterSize : Math.min(this.image.geometry.clusterSize, 4096);
  }

  async ensureSize(bytes: number): Promise<void> {
    if (bytes <= this.sizeBytes) return;
    this.sizeBytes = Math.max(bytes, 2 * this.sizeBytes);
    await this.image.resize(this.sizeBytes);
  }

  writeData(guestOffset: number, data: Buffer): Promise<void> {
    return this.image.write(guestOffset, data);
  }

  writeZeroes(guestOffset: number, bytes: number): Promise<void> {
    // Compressed: zero clusters go through the writer (which unallocates or zero-flags them) rather
    // than writeZeroes, which would flush the writer each time.
    if (this.compress) return this.image.write(guestOffset, zeroBlock(bytes));
    return this.image.writeZeroes(guestOffset, bytes);
  }

  async finish(virtualSize: number): Promise<void> {
    if (virtualSize !== this.image.virtualSize && this.zeroInitialized) await this.image.resize(virtualSize);
    await this.image.close();
  }

  async abort(): Promise<void> {
    await this.image.close().catch(() => undefined);
  }
}

/**
 * Empty the regular file at `path` through a handle of its own. ext4 (auto_da_alloc) marks a file
 * truncated to size 0 and, when the handle that truncated it is closed, allocates and starts
 * writeback of everything written meanwhile, in close(): had the copy's handle truncated, its close
 * would spend ~0.5 s flushing an 835 MiB restore (qemu-img truncates at create, on another handle).
 */
async function emptyFile(path: string): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    await handle.truncate(0);
  } finally {
    await handle.close();
  }
}

/** A raw file (created sparse, only non-zero data written) or a block device. */
class RawSink implements ConvertSink {
  readonly ordered = false;
  readonly parallelWrites = 1;

  private constructor(readonly path: string, private readonly file: HostFile, readonly zeroInitialized: boolean,
    readonly granuleBytes: number, private readonly sync: boolean, private readonly regular: boolean) {}

  static async open(path: string, o: OpenSinkOptions): Promise<RawSink> {
    if (o.create) await writeFile(path, '', { flag: 'a' });
    const stats = statSync(path);
    const opener = o.openHostFile ?? openNodeHostFile;
    const file = await opener(path, { readOnly: false, lock: true });
    const regular = stats.isFile();
    try {
      if (o.create && regular) {
        await emptyFile(path);
        if (o.virtualSize !== undefined) await file.truncate(o.virtualSize);
      } else if (o.virtualSize !== undefined && hostSizeBytes(path, stats) < o.virtualSize && !regular) {
        throw new ConvertError('EINVAL', `${path}: the target device is smaller than the source (${hostSizeBytes(path, stats)} < ${o.virtualSize} bytes)`, { path });
      }
    } catch (err) {
      await file.close();
      throw err;
    }
    const granule = o.minSparseBytes === undefined || o.minSparseBytes === 0 ? 4096 : o.minSparseBytes;
    return new RawSink(path, file, o.create && regular, granule, o.cache !== undefined && o.cache !== 'unsafe', regular);
  }

  async ensureSize(): Promise<void> {}

  writeData(guestOffset: number, data: Buffer): Promise<void> {
    return this.file.pwrite(data, guestOffset);
  }

  async writeZeroes(guestOffset: number, bytes: number): Promise<void> {
    if (this.regular && await this.file.punchHole(guestOffset, bytes)) return;
    await this.file.pwrite(zeroBlock(bytes), guestOffset);
  }

  async finish(virtualSize: number): Promise<void> {
    try {
      if (this.regular && this.zeroInitialized && (await this.file.size()) !== virtualSize) await this.file.truncate(virtualSize);
      if (this.sync) await this.file.fdatasync();
    } finally {
      await this.file.close();
    }
  }

  async abort(): Promise<void> {
    await this.file.close().catch(() => undefined);
  }
}

/** stdout: every byte, in order (holes written as zeros). */
class StdoutSink implements ConvertSink {
  readonly path = '-';
  readonly granuleBytes = 4096;
  readonly zeroInitialized = false;
  readonly ordered = true;
  readonly parallelWrites = 1;
  private positionBytes = 0;

  constructor(private readonly out: Writable) {
    // Write errors also reach the callbacks; without a listener they would crash the process (EPIPE).
    out.on('error', () => undefined);
  }

  async ensureSize(): Promise<void> {}

  writeData(guestOffset: number, data: Buffer): Promise<void> {
    if (guestOffset !== this.positionBytes) throw new ConvertError('EINVAL', `stdout is written in order (at ${this.positionBytes}, asked ${guestOffset})`, { path: '-' });
    this.positionBytes += data.length;
    return new Promise((resolve, reject) => {
      this.out.write(data, (err) => (err ? reject(err) : resolve()));
    });
  }

  async writeZeroes(guestOffset: number, bytes: number): Promise<void> {
    const step = 1024 * 1024;
    for (let done = 0; done < bytes; done += step) await this.writeData(guestOffset + done, zeroBlock(Math.min(step, bytes - done)));
  }

  async finish(virtualSize: number): Promise<void> {
    if (virtualSize > this.positionBytes) await this.writeZeroes(this.positionBytes, virtualSize - this.positionBytes);
  }

  async abort(): Promise<void> {}
}
