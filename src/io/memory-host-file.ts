/**
 * An in-memory HostFile for tests and examples.
 *
 * Contents live in fixed-size chunks (64 KiB by default) held in a map: chunks never written are
 * absent and read as zeros, so a large sparse image costs only what was written. punchHole and
 * zeroRange drop whole chunks and zero partial ones; allocate only moves the size. With
 * `directAlignment` the file behaves like an O_DIRECT handle: an offset, length or buffer address
 * that is not a multiple of it fails with EINVAL, as the kernel does, so code paths that must align
 * their I/O can be tested without a real disk.
 */
import { isAddressAligned } from './aligned-buffer.js';
import { HostIoError } from './errors.js';
import type { HostFile, WritePoint } from './host-file.js';

const DEFAULT_CHUNK_BYTES = 64 * 1024;

export interface MemoryHostFileOptions {
  /** Name used in error messages. Default `memory:N`. */
  path?: string;
  readOnly?: boolean;
  /** Emulate O_DIRECT with this alignment (bytes, a power of two) for offsets, lengths and memory. */
  directAlignment?: number;
  /** With directAlignment, also require aligned buffer addresses (default true). */
  checkMemoryAlignment?: boolean;
  /** Initial contents (copied). */
  initialBytes?: Uint8Array;
  /** Chunk granularity of the sparse store (a power of two). Default 64 KiB. */
  chunkBytes?: number;
}

/** Operation counts, for tests that assert how a layer used its file. */
export interface MemoryHostFileStats {
  preads: number;
  pwrites: number;
  bytesWritten: number;
  fdatasyncs: number;
  zeroRanges: number;
  punchHoles: number;
  allocates: number;
  truncates: number;
}

let instanceCount = 0;

export class MemoryHostFile implements HostFile {
  readonly path: string;
  readonly readOnly: boolean;
  readonly direct: boolean;
  readonly dioAlignment: number;
  readonly stats: MemoryHostFileStats = {
    preads: 0, pwrites: 0, bytesWritten: 0, fdatasyncs: 0, zeroRanges: 0, punchHoles: 0, allocates: 0, truncates: 0,
  };
  private readonly chunkBytes: number;
  private readonly checkMemoryAlignment: boolean;
  private readonly chunks = new Map<number, Buffer>();
  private sizeBytes = 0;
  private closed = false;

  constructor(options: MemoryHostFileOptions = {}) {
    instanceCount += 1;
    this.path = options.path ?? `memory:${instanceCount}`;
    this.readOnly = options.readOnly ?? false;
    this.direct = options.directAlignment !== undefined;
    this.dioAlignment = options.directAlignment ?? 1;
    this.checkMemoryAlignment = this.direct && (options.checkMemoryAlignment ?? true);
    this.chunkBytes = options.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    if (options.initialBytes !== undefined) {
      this.writeBytes(options.initialBytes, 0);
    }
  }

  /** A new MemoryHostFile holding a copy of `bytes`. */
  static from(bytes: Uint8Array, options: Omit<MemoryHostFileOptions, 'initialBytes'> = {}): MemoryHostFile {
    return new MemoryHostFile({ ...options, initialBytes: bytes });
  }

  /** A copy of the whole contents. */
  snapshot(): Buffer {
    const out = Buffer.alloc(this.sizeBytes);
    this.readBytes(out, 0);
    return out;
  }

  /** Bytes of chunk storage in use (a measure of how sparse the file is). */
  allocatedBytes(): number {
    return this.chunks.size * this.chunkBytes;
  }

  /** Size in bytes, synchronously. */
  sizeSync(): number {
    return this.sizeBytes;
  }

  private check(operation: string, hostOffset: number, bytes: number, write: boolean, memory?: Uint8Array): void {
    if (this.closed) {
      throw new HostIoError('EBADF', this.path, operation, undefined, 'file is closed');
    }
    if (write && this.readOnly) {
      throw new HostIoError('EBADF', this.path, operation, hostOffset, 'file is open read-only');
    }
    if (!Number.isSafeInteger(hostOffset) || hostOffset < 0 || !Number.isSafeInteger(bytes) || bytes < 0 ||
      !Number.isSafeInteger(hostOffset + bytes)) {
      throw new HostIoError('EINVAL', this.path, operation, undefined, `invalid range: offset ${hostOffset}, ${bytes} bytes`);
    }
    if (memory !== undefined && this.direct) {
      const alignment = this.dioAlignment;
      if (hostOffset % alignment !== 0 || bytes % alignment !== 0 ||
        (this.checkMemoryAlignment && bytes > 0 && !isAddressAligned(memory, alignment))) {
        throw new HostIoError('EINVAL', this.path, operation, hostOffset,
          `unaligned direct I/O (alignment ${alignment}, ${bytes} bytes)`);
      }
    }
  }

  /** Copy stored bytes at hostOffset into `out` (zeros for absent chunks). */
  private readBytes(out: Uint8Array, hostOffset: number): void {
    let doneBytes = 0;
    while (doneBytes < out.length) {
      const position = hostOffset + doneBytes;
      const chunkIndex = Math.floor(position / this.chunkBytes);
      const inChunk = position - chunkIndex * this.chunkBytes;
      const pieceBytes = Math.min(this.chunkBytes - inChunk, out.length - doneBytes);
      const chunk = this.chunks.get(chunkIndex);
      if (chunk === undefined) {
        out.fill(0, doneBytes, doneBytes + pieceBytes);
      } else {
        out.set(chunk.subarray(inChunk, inChunk + pieceBytes), doneBytes);
      }
      doneBytes += pieceBytes;
    }
  }

  /** Store `data` at hostOffset, growing the size as needed. */
  private writeBytes(data: Uint8Array, hostOffset: number): void {
    let doneBytes = 0;
    while (doneBytes < data.length) {
      const position = hostOffset + doneBytes;
      const chunkIndex = Math.floor(position / this.chunkBytes);
      const inChunk = position - chunkIndex * this.chunkBytes;
      const pieceBytes = Math.min(this.chunkBytes - inChunk, data.length - doneBytes);
      let chunk = this.chunks.get(chunkIndex);
      if (chunk === undefined) {
        chunk = Buffer.alloc(this.chunkBytes);
        this.chunks.set(chunkIndex, chunk);
      }
      chunk.set(data.subarray(doneBytes, doneBytes + pieceBytes), inChunk);
      doneBytes += pieceBytes;
    }
    this.sizeBytes = Math.max(this.sizeBytes, hostOffset + data.length);
  }

  /** Make [start, end) read as zeros: whole chunks are dropped, partial ones zeroed. */
  private clearBytes(start: number, end: number): void {
    for (let position = start; position < end;) {
      const chunkIndex = Math.floor(position / this.chunkBytes);
      const chunkStart = chunkIndex * this.chunkBytes;
      const pieceEnd = Math.min(end, chunkStart + this.chunkBytes);
      if (position === chunkStart && pieceEnd === chunkStart + this.chunkBytes) {
        this.chunks.delete(chunkIndex);
      } else {
        this.chunks.get(chunkIndex)?.fill(0, position - chunkStart, pieceEnd - chunkStart);
      }
      position = pieceEnd;
    }
  }

  async pread(buf: Uint8Array, hostOffset: number, _point?: WritePoint): Promise<number> {
    this.check('pread', hostOffset, buf.length, false, buf);
    this.stats.preads += 1;
    const readBytes = Math.max(0, Math.min(buf.length, this.sizeBytes - hostOffset));
    this.readBytes(buf.subarray(0, readBytes), hostOffset);
    return readBytes;
  }

  async pwrite(buf: Uint8Array, hostOffset: number, _point?: WritePoint): Promise<void> {
    this.check('pwrite', hostOffset, buf.length, true, buf);
    this.stats.pwrites += 1;
    this.stats.bytesWritten += buf.length;
    this.writeBytes(buf, hostOffset);
  }

  async fdatasync(): Promise<void> {
    this.check('fdatasync', 0, 0, false);
    this.stats.fdatasyncs += 1;
  }

  async size(): Promise<number> {
    this.check('size', 0, 0, false);
    return this.sizeBytes;
  }

  async truncate(bytes: number): Promise<void> {
    this.check('truncate', bytes, 0, true);
    this.stats.truncates += 1;
    if (bytes < this.sizeBytes) {
      this.clearBytes(bytes, this.sizeBytes);
    }
    this.sizeBytes = bytes;
  }

  async zeroRange(offset: number, length: number, keepSize = false): Promise<boolean> {
    this.check('zeroRange', offset, length, true);
    this.stats.zeroRanges += 1;
    const end = keepSize ? Math.min(offset + length, this.sizeBytes) : offset + length;
    this.clearBytes(offset, Math.max(offset, end));
    if (!keepSize) {
      this.sizeBytes = Math.max(this.sizeBytes, offset + length);
    }
    return true;
  }

  async punchHole(offset: number, length: number): Promise<boolean> {
    this.check('punchHole', offset, length, true);
    this.stats.punchHoles += 1;
    this.clearBytes(offset, Math.max(offset, Math.min(offset + length, this.sizeBytes)));
    return true;
  }

  async allocate(offset: number, length: number, keepSize = false): Promise<boolean> {
    this.check('allocate', offset, length, true);
    this.stats.allocates += 1;
    if (!keepSize) {
      this.sizeBytes = Math.max(this.sizeBytes, offset + length);
    }
    return true;
  }

  async dropCache(offset: number, length: number): Promise<void> {
    this.check('dropCache', offset, length, false);
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}
