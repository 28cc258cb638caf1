/**
 * Convert sources: where guest bytes come from. A qcow2 image (its active layer or an internal
 * snapshot, with its backing chain), a raw file or block device (holes found with SEEK_DATA /
 * SEEK_HOLE, as QEMU's file-posix block status), or a stream (a pipe: no size up front, read strictly
 * in order). The format is probed as qemu-img does it (qcow2 magic, else raw) unless given.
 */
import type { Readable } from 'node:stream';
import { statSync } from 'node:fs';
import { nodeHostAllocationProbe, type HostAllocationProbe } from '../io/host-allocation.js';
import { openNodeHostFile } from '../io/node-host-file.js';
import type { HostFile, HostFileOpener } from '../io/host-file.js';
import { Qcow2Image, type CacheMode } from '../qcow2/engine/image.js';
import { openImage } from '../node.js';
import { openSnapshotView, type SnapshotRef } from '../qcow2/engine/snapshot.js';
import { mapEntries } from '../qcow2/tools/map.js';
import type { ClusterMap } from '../qcow2/engine/cluster-map.js';
import type { BackingReader } from '../qcow2/engine/backing.js';
import { QCOW2_MAGIC } from '../qcow2/format/constants.js';
import { ConvertError } from './errors.js';
import { hostSizeBytes } from './host-source.js';

export type ImageFormat = 'raw' | 'qcow2';

/** A run of guest bytes: `zero` when block status says it reads as zeros (never read then). */
export interface SourceExtent {
  guestOffset: number;
  bytes: number;
  zero: boolean;
}

export interface ConvertSource {
  readonly path: string;
  readonly format: ImageFormat;
  /** Guest size in bytes; undefined for a stream (known only once it has ended). */
  readonly virtualSize: number | undefined;
  /** A stream: read in order with readInto only (no extents, no read-ahead in parallel). */
  readonly sequential: boolean;
  /** Every host file the source reads (an image, its data file and backing chain): none may be DEST. */
  readonly hostPaths: string[];
  /** Extents covering [0, virtualSize) in guest order (not for streams). */
  extents(): AsyncIterable<SourceExtent>;
  /** Read into `buf` from `guestOffset`; returns the bytes read (short only at the end of a stream). */
  readInto(guestOffset: number, buf: Buffer): Promise<number>;
  close(): Promise<void>;
}

export interface OpenSourceOptions {
  /** -f: the format; probed (qcow2 magic, else raw) when absent. */
  format?: ImageFormat;
  /** -l: read an internal snapshot of a qcow2 source. */
  snapshot?: SnapshotRef;
  /** -T: host cache mode of the source ('none' = O_DIRECT). */
  cache?: CacheMode;
  /** Take QEMU's reader locks (default true). */
  lock?: boolean;
  /** -U: share every permission (read an image another process writes), as qemu-img's force-share. */
  forceShare?: boolean;
  /** How host files are opened (tests inject faults). */
  openHostFile?: HostFileOpener;
  /** The stream read for path '-' (default process.stdin). */
  stdin?: Readable;
}

/**
 * Largest single read of a window: a cold 835 MiB image read 8 requests of 2 MiB at a time in
 * 540–610 ms, 7 of 8 MiB at a time in 700–760 ms (the host's read-ahead keeps more requests busy).
 */
const SOURCE_READ_BYTES = 2 * 1024 * 1024;

/** Read all of `buf` from `guestOffset` as pieces of at most SOURCE_READ_BYTES, all at once. */
async function readInPieces(guestOffset: number, buf: Buffer, read: (guestOffset: number, piece: Buffer) => Promise<void>): Promise<void> {
  const pieces: Promise<void>[] = [];
  for (let done = 0; done < buf.length; done += SOURCE_READ_BYTES) {
    pieces.push(read(guestOffset + done, buf.subarray(done, Math.min(buf.length, done + SOURCE_READ_BYTES))));
  }
  await Promise.all(pieces);
}

/** Whether the first bytes of an image are the qcow2 magic (qemu-img's probe). */
export function hasQcow2Magic(first: Uint8Array): boolean {
  return first.length >= 4 && Buffer.from(first.buffer, first.byteOffset, 4).readUInt32BE(0) === QCOW2_MAGIC;
}

/** Open SOURCE as convert reads it: '-' is a stream, anything else a file or device (format probed). */
export async function openConvertSource(path: string, options: OpenSourceOptions = {}): Promise<ConvertSource> {
  if (path === '-') return StreamSource.open(options.stdin ?? process.stdin, options.format);
  const opener = options.openHostFile ?? openNodeHostFile;
  const file = await opener(path, { readOnly: true, direct: options.cache === 'none', lock: options.lock ?? true, forceShare: options.forceShare ?? false });
  let format = options.format;
  if (format === undefined) {
    const first = Buffer.alloc(Math.max(file.dioAlignment, 512));
    const n = await file.pread(first, 0).catch(() => 0);
    format = hasQcow2Magic(first.subarray(0, n)) ? 'qcow2' : 'raw';
  }
  if (format === 'raw') {
    if (options.snapshot !== undefined) {
      await file.close();
      throw new ConvertError('EINVAL', `${path}: a raw image has no snapshots (-l)`, { path });
    }
    return new RawSource(path, file, hostSizeBytes(path, statSync(path)), nodeHostAllocationProbe());
  }
  await file.close();
  return Qcow2Source.open(path, options, opener);
}

/** A qcow2 image's guest contents (active layer, or a snapshot as `qemu-img convert -l`). */
class Qcow2Source implements ConvertSource {
  readonly format = 'qcow2' as const;
  readonly sequential = false;
  private readonly probe: HostAllocationProbe = nodeHostAllocationProbe();

  get hostPaths(): string[] {
    const paths: string[] = [];
    let layer: BackingReader | undefined = this.image;
    while (layer) {
      paths.push(layer.path);
      if (!(layer instanceof Qcow2Image)) break;
      if (layer.dataFilePath !== undefined) paths.push(layer.dataFilePath);
      layer = layer.backing;
    }
    return paths;
  }

  private constructor(readonly path: string, readonly image: Qcow2Image, readonly virtualSize: number,
    private readonly read: (guestOffset: number, buf: Buffer) => Promise<void>, private readonly topMap?: ClusterMap) {}

  static async open(path: string, options: OpenSourceOptions, opener: HostFileOpener): Promise<Qcow2Source> {
    const image = await openImage(path, {
      readOnly: true, openHostFile: opener, lock: options.lock ?? true, forceShare: options.forceShare ?? false, ...(options.cache ? { cache: options.cache } : {}),
    });
    try {
      if (options.snapshot === undefined) return new Qcow2Source(path, image, image.virtualSize, (o, b) => image.readInto(o, b));
      // As qemu-img convert -l: the snapshot's tables, the image's current size.
      const view = await openSnapshotView(image, options.snapshot, { virtualSizeBytes: image.virtualSize });
      return new Qcow2Source(path, image, view.virtualSize, (o, b) => view.readInto(o, b), view.map);
    } catch (err) {
      await image.close();
      throw err;
    }
  }

  async *extents(): AsyncGenerator<SourceExtent> {
    // Zero is what qemu-img's block status says: by mapping, and host holes under preallocated
    // clusters (never read: reading unwritten extents would even turn them into "data" for SEEK_DATA).
    for await (const entry of mapEntries(this.image, { probe: this.probe, ...(this.topMap ? { topMap: this.topMap } : {}) })) {
      yield { guestOffset: entry.start, bytes: entry.length, zero: entry.zero };
    }
  }

  async readInto(guestOffset: number, buf: Buffer): Promise<number> {
    await readInPieces(guestOffset, buf, this.read);
    return buf.length;
  }

  async close(): Promise<void> {
    this.probe.close();
    await this.image.close();
  }
}

/** A raw file or block device: data and holes as lseek SEEK_DATA/SEEK_HOLE report them. */
class RawSource implements ConvertSource {
  readonly format = 'raw' as const;
  readonly sequential = false;

  get hostPaths(): string[] {
    return [this.path];
  }

  constructor(readonly path: string, private readonly file: HostFile, readonly virtualSize: number, private readonly probe: HostAllocationProbe) {}

  async *extents(): AsyncGenerator<SourceExtent> {
    let pos = 0;
    while (pos < this.virtualSize) {
      const extent = await this.probe.extentAt(this.path, pos);
      if (extent.kind === 'trailing-hole') {
        yield { guestOffset: pos, bytes: this.virtualSize - pos, zero: true };
        return;
      }
      const end = extent.kind === 'unknown' ? this.virtualSize : Math.min(this.virtualSize, extent.endBytes);
      if (end <= pos) throw new ConvertError('EIO', `${this.path}: inconsistent allocation at offset ${pos}`, { path: this.path, guestOffset: pos });
      yield { guestOffset: pos, bytes: end - pos, zero: extent.kind === 'hole' };
      pos = end;
    }
  }

  async readInto(guestOffset: number, buf: Buffer): Promise<number> {
    await readInPieces(guestOffset, buf, (offset, piece) => this.readFully(offset, piece));
    return buf.length;
  }

  /** Read all of `buf` (a short read means the source shrank: an error). */
  private async readFully(guestOffset: number, buf: Buffer): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const n = await this.file.pread(buf.subarray(done), guestOffset + done);
      if (n === 0) {
        throw new ConvertError('EIO', `${this.path}: unexpected end of file at offset ${guestOffset + done} (the source shrank?)`,
          { path: this.path, guestOffset: guestOffset + done });
      }
      done += n;
    }
  }

  async close(): Promise<void> {
    this.probe.close();
    await this.file.close();
  }
}

/** A stream (pipe): bytes in order, size unknown until its end. */
class StreamSource implements ConvertSource {
  readonly path = '-';
  readonly format = 'raw' as const;
  readonly virtualSize = undefined;
  readonly sequential = true;
  readonly hostPaths: string[] = [];
  private leftover: Buffer | undefined;
  private positionBytes = 0;

  private constructor(private readonly chunks: AsyncIterator<Buffer>, first: Buffer | undefined) {
    this.leftover = first;
  }

  static async open(stream: Readable, format: ImageFormat | undefined): Promise<StreamSource> {
    const chunks = stream[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
    const first = await chunks.next();
    const firstChunk = first.done ? undefined : Buffer.from(first.value);
    if (format === 'qcow2' || (format === undefined && firstChunk !== undefined && hasQcow2Magic(firstChunk))) {
      stream.destroy();
      throw new ConvertError('EINVAL', 'a qcow2 image cannot be read from a pipe (it needs random access): give its path', { path: '-' });
    }
    return new StreamSource(chunks, firstChunk);
  }

  extents(): AsyncIterable<SourceExtent> {
    throw new ConvertError('EINVAL', 'a stream has no extents', { path: '-' });
  }

  async readInto(guestOffset: number, buf: Buffer): Promise<number> {
    if (guestOffset !== this.positionBytes) throw new ConvertError('EINVAL', `a stream is read in order (at ${this.positionBytes}, asked ${guestOffset})`, { path: '-' });
    let done = 0;
    while (done < buf.length) {
      if (this.leftover === undefined) {
        const next = await this.chunks.next();
        if (next.done) break;
        this.leftover = next.value;
      }
      const n = this.leftover.copy(buf, done);
      this.leftover = n < this.leftover.length ? this.leftover.subarray(n) : undefined;
      done += n;
    }
    this.positionBytes += done;
    return done;
  }

  async close(): Promise<void> {
    await this.chunks.return?.();
  }
}
