/**
 * HostFile over a real file: Node's fs for I/O, the native addon for fallocate, fadvise, O_DIRECT
 * alignment and QEMU-compatible locks, fs-ext for flock.
 *
 * Buffered mode passes requests straight to pread/pwrite on our I/O thread pool (thread-io.ts;
 * reads answered from the page cache on the main thread when they can be; libuv's threadpool where
 * the pool cannot start). Direct mode (O_DIRECT) submits them through Linux AIO (aio.ts; the thread
 * pool with `aio: 'threads'` or on a kernel without AIO). It sends a request straight through when its memory, offset and length are aligned
 * (the fast path), and otherwise goes
 * through an aligned bounce buffer: reads read the covering aligned range and copy out; writes
 * read-modify-write the partial edge blocks. A write whose last partial block crosses the end of
 * file restores the exact size with ftruncate afterwards. Writes, fallocate and truncate on a direct
 * handle serialize on overlapping byte ranges (a size-changing read-modify-write holds everything
 * from its first block to infinity), so no read-modify-write can lose a concurrent update.
 *
 * Every failure is a HostIoError carrying the errno name, path, operation and host offset; lock
 * conflicts are LockErrors (see locks.ts).
 */
import { constants as fsConstants, read as fsRead, write as fsWrite, type Stats } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';

import createDebug from 'debug';

import { nativeAio, type AioEngine } from './aio.js';
import { AlignedBufferPool, alignDown, alignUp, DEFAULT_ALIGNMENT_BYTES, isDirectIoReady } from './aligned-buffer.js';
import { CodedError, HostIoError } from './errors.js';
import type { HostFile, HostFileOpenOptions, WritePoint } from './host-file.js';
import { applyQemuLocks, qemuPermissionsFor, releaseFlock, releaseQemuLocks, takeExclusiveFlock } from './locks.js';
import { threadIo, type ThreadIoEngine } from './thread-io.js';
import { dioAlignment as nativeDioAlignment, errorCodeOf, FADVISE, fadvise, FALLOC, fallocate } from './native.js';

const debug = createDebug('qcow2fuse:io');

/** Largest bounce buffer used for one piece of an unaligned direct request. */
const MAX_BOUNCE_BYTES = 4 * 1024 * 1024;

/** Wrap any failure as a HostIoError (kept as is when already coded by us). */
function toHostIoError(error: unknown, path: string, operation: string, hostOffset?: number): CodedError {
  if (error instanceof CodedError) {
    return error;
  }
  const code = errorCodeOf(error) ?? 'EIO';
  const message = error instanceof Error ? error.message : String(error);
  return new HostIoError(code, path, operation, hostOffset, message);
}

function checkRange(path: string, operation: string, hostOffset: number, bytes: number): void {
  if (!Number.isSafeInteger(hostOffset) || hostOffset < 0 || !Number.isSafeInteger(bytes) || bytes < 0 ||
    !Number.isSafeInteger(hostOffset + bytes)) {
    throw new HostIoError('EINVAL', path, operation, Number.isSafeInteger(hostOffset) ? hostOffset : undefined,
      `invalid range: offset ${hostOffset}, ${bytes} bytes`);
  }
}

interface HeldRange {
  start: number;
  end: number;
}

interface WaitingRange {
  range: HeldRange;
  grant: () => void;
}

/**
 * One pread/pwrite on the threadpool through fs's callback API: a FileHandle call costs about twice
 * as much main-thread time (reference counting, its own promise plumbing), which shows at tens of
 * thousands of 4 KiB requests per second. The FileHandle stays open (and owns the fd) meanwhile.
 */
function preadOnce(fd: number, view: Uint8Array, offset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fsRead(fd, view, offset, length, position, (err, bytesRead) => { if (err) reject(err); else resolve(bytesRead); });
  });
}

function pwriteOnce(fd: number, view: Uint8Array, offset: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fsWrite(fd, view, offset, length, position, (err, bytesWritten) => { if (err) reject(err); else resolve(bytesWritten); });
  });
}

/**
 * Async exclusive locks on byte ranges [start, end) (end may be Infinity). Granted in arrival
 * order among overlapping requests; non-overlapping requests never wait for each other.
 */
class ByteRangeLock {
  private readonly held: HeldRange[] = [];
  private readonly waiting: WaitingRange[] = [];

  private static overlaps(a: HeldRange, b: HeldRange): boolean {
    return a.start < b.end && b.start < a.end;
  }

  /** True when `range` overlaps a held range or one of the first `waitersBefore` waiters. */
  private blocked(range: HeldRange, waitersBefore: number): boolean {
    if (this.held.some((other) => ByteRangeLock.overlaps(other, range))) {
      return true;
    }
    return this.waiting.slice(0, waitersBefore).some((waiter) => ByteRangeLock.overlaps(waiter.range, range));
  }

  /** Wait for [start, end) to be free; resolves to the function that releases it. */
  acquire(start: number, end: number): Promise<() => void> {
    const range: HeldRange = { start, end };
    if (!this.blocked(range, this.waiting.length)) {
      this.held.push(range);
      return Promise.resolve(() => this.release(range));
    }
    return new Promise((resolve) => {
      this.waiting.push({ range, grant: () => resolve(() => this.release(range)) });
    });
  }

  private release(range: HeldRange): void {
    const index = this.held.indexOf(range);
    if (index < 0) {
      return;
    }
    this.held.splice(index, 1);
    for (let i = 0; i < this.waiting.length;) {
      const waiter = this.waiting[i];
      if (waiter !== undefined && !this.blocked(waiter.range, i)) {
        this.waiting.splice(i, 1);
        this.held.push(waiter.range);
        waiter.grant();
      } else {
        i++;
      }
    }
  }
}

/** The AIO engine and the open file description a direct handle submits on. */
interface AioChannel {
  engine: AioEngine;
  handle: FileHandle;
}

class NodeHostFile implements HostFile {
  readonly path: string;
  readonly readOnly: boolean;
  readonly direct: boolean;
  readonly dioAlignment: number;
  private readonly handle: FileHandle;
  private readonly fd: number;
  private nbInflight = 0;
  private readonly idleWaiters: (() => void)[] = [];
  private readonly memAlignBytes: number;
  /**
   * Memory alignment a direct write needs to go straight through: at least the page size, since
   * the filesystem serialises and waits for writes from memory less aligned than its block (see
   * DEFAULT_ALIGNMENT_BYTES); a copy into an aligned bounce buffer is far cheaper.
   */
  private readonly writeMemAlignBytes: number;
  private readonly blockBytes: number;
  private readonly pool: AlignedBufferPool;
  private readonly ranges = new ByteRangeLock();
  private readonly locked: boolean;
  /**
   * Linux AIO for this direct handle's reads and writes (null: the threadpool), submitted on the
   * handle's own open file description of the same file, without locks. A request in flight holds a
   * reference to its description, and one completing after a kill -9 drops it from interrupt
   * context, so the kernel closes that description a moment after the process is gone: the locks
   * stay on the main description, never held up by in-flight AIO.
   */
  private readonly aio: AioChannel | null;
  /** The I/O thread pool for what does not go through AIO (null: libuv's threadpool). */
  private readonly threads: ThreadIoEngine | null = threadIo();
  private closed = false;
  /**
   * Direct mode: the file size as this handle last established it (fstat at open, then every
   * completed write, truncate and fallocate). Writes ending past it lock to infinity up front.
   */
  private sizeHintBytes: number;

  constructor(path: string, handle: FileHandle, readOnly: boolean, direct: boolean, locked: boolean, sizeBytes: number,
    aio: AioChannel | null) {
    this.path = path;
    this.handle = handle;
    this.fd = handle.fd;
    this.readOnly = readOnly;
    this.direct = direct;
    this.locked = locked;
    this.sizeHintBytes = sizeBytes;
    this.aio = direct ? aio : null;
    const alignment = nativeDioAlignment(this.fd);
    this.memAlignBytes = direct ? alignment.memAlign : 1;
    this.writeMemAlignBytes = direct ? Math.max(alignment.memAlign, DEFAULT_ALIGNMENT_BYTES) : 1;
    this.blockBytes = direct ? alignment.offsetAlign : 1;
    this.dioAlignment = direct ? Math.max(alignment.memAlign, alignment.offsetAlign) : 1;
    // Bounce buffers for unaligned direct I/O: enough small ones for a queue of 64 requests in flight
    // (qemu-img bench's depth) without a posix_memalign per request; at most 4 MiB per size class.
    this.pool = new AlignedBufferPool(Math.max(DEFAULT_ALIGNMENT_BYTES, this.dioAlignment), 4 * 1024 * 1024, 64, 4 * 1024 * 1024);
  }

  private checkOpen(operation: string): void {
    if (this.closed) {
      throw new HostIoError('EBADF', this.path, operation, undefined, 'file is closed');
    }
  }

  private checkWritable(operation: string, hostOffset?: number): void {
    this.checkOpen(operation);
    if (this.readOnly) {
      throw new HostIoError('EBADF', this.path, operation, hostOffset, 'file is open read-only');
    }
  }

  /** Count a read/write on the raw fd, so close() waits for it (FileHandle cannot see those). */
  private async track<T>(io: Promise<T>): Promise<T> {
    this.nbInflight++;
    try {
      return await io;
    } finally {
      if (--this.nbInflight === 0) for (const wake of this.idleWaiters.splice(0)) wake();
    }
  }

  /** One pread of `view` at hostOffset by the handle's engine; bytes read. */
  private readOnce(view: Uint8Array, hostOffset: number): Promise<number> {
    if (this.aio) return this.aio.engine.submit(false, this.aio.handle.fd, view, hostOffset);
    if (this.threads === null) return preadOnce(this.fd, view, 0, view.length, hostOffset);
    return this.direct ? this.threads.submit(false, this.fd, view, hostOffset) : this.threads.read(this.fd, view, hostOffset);
  }

  /** Read until `view` is full or end of file; returns bytes read. A short direct read means EOF. */
  private async readFully(view: Uint8Array, hostOffset: number): Promise<number> {
    let doneBytes = 0;
    while (doneBytes < view.length) {
      const bytesRead = await this.track(this.readOnce(doneBytes === 0 ? view : view.subarray(doneBytes), hostOffset + doneBytes));
      if (bytesRead === 0) {
        break;
      }
      doneBytes += bytesRead;
      if (this.direct && doneBytes < view.length) {
        break;
      }
    }
    return doneBytes;
  }

  /** Write all of `view` at hostOffset (retrying short writes). */
  private async writeFully(view: Uint8Array, hostOffset: number): Promise<void> {
    // A direct write past the end of file is synchronous in the kernel (ext4 and XFS wait for it
    // inside io_submit, under the exclusive inode lock): it would stall the event loop, so it goes to
    // the threadpool. Measured on the compressed writer, whose packing areas grow the file: cp of a
    // 1.5 GiB ext4 image into a zstd mount 7.8–9.1 s through AIO, 6.8–7.5 s through the threadpool.
    const aio = this.aio !== null && hostOffset + view.length <= this.sizeHintBytes ? this.aio : null;
    let doneBytes = 0;
    while (doneBytes < view.length) {
      const rest = doneBytes === 0 ? view : view.subarray(doneBytes);
      const bytesWritten = await this.track(aio ? aio.engine.submit(true, aio.handle.fd, rest, hostOffset + doneBytes)
        : this.threads ? this.threads.submit(true, this.fd, rest, hostOffset + doneBytes)
          : pwriteOnce(this.fd, rest, 0, rest.length, hostOffset + doneBytes));
      if (bytesWritten === 0) {
        throw new HostIoError('EIO', this.path, 'pwrite', hostOffset + doneBytes, 'write made no progress');
      }
      doneBytes += bytesWritten;
    }
  }

  async pread(buf: Uint8Array, hostOffset: number, _point?: WritePoint): Promise<number> {
    this.checkOpen('pread');
    checkRange(this.path, 'pread', hostOffset, buf.length);
    if (buf.length === 0) {
      return 0;
    }
    try {
      if (!this.direct || isDirectIoReady(buf, hostOffset, this.memAlignBytes, this.blockBytes)) {
        return await this.readFully(buf, hostOffset);
      }
      let doneBytes = 0;
      while (doneBytes < buf.length) {
        const pieceBytes = Math.min(buf.length - doneBytes, MAX_BOUNCE_BYTES);
        const readBytes = await this.bouncedRead(buf.subarray(doneBytes, doneBytes + pieceBytes), hostOffset + doneBytes);
        doneBytes += readBytes;
        if (readBytes < pieceBytes) {
          break;
        }
      }
      return doneBytes;
    } catch (error) {
      throw toHostIoError(error, this.path, 'pread', hostOffset);
    }
  }

  /** Direct read of the aligned range covering [hostOffset, +target.length) through a bounce buffer. */
  private async bouncedRead(target: Uint8Array, hostOffset: number): Promise<number> {
    const alignedStart = alignDown(hostOffset, this.blockBytes);
    const alignedEnd = alignUp(hostOffset + target.length, this.blockBytes);
    const bounce = this.pool.acquire(alignedEnd - alignedStart);
    try {
      const readBytes = await this.readFully(bounce.subarray(0, alignedEnd - alignedStart), alignedStart);
      const headBytes = hostOffset - alignedStart;
      const usableBytes = Math.max(0, Math.min(target.length, readBytes - headBytes));
      target.set(bounce.subarray(headBytes, headBytes + usableBytes));
      return usableBytes;
    } finally {
      this.pool.release(bounce);
    }
  }

  async pwrite(buf: Uint8Array, hostOffset: number, _point?: WritePoint): Promise<void> {
    this.checkWritable('pwrite', hostOffset);
    checkRange(this.path, 'pwrite', hostOffset, buf.length);
    if (buf.length === 0) {
      return;
    }
    try {
      if (!this.direct) {
        await this.writeFully(buf, hostOffset);
        return;
      }
      if (isDirectIoReady(buf, hostOffset, this.writeMemAlignBytes, this.blockBytes)) {
        const release = await this.ranges.acquire(hostOffset, hostOffset + buf.length);
        try {
          await this.writeFully(buf, hostOffset);
          this.sizeHintBytes = Math.max(this.sizeHintBytes, hostOffset + buf.length);
        } finally {
          release();
        }
        return;
      }
      for (let doneBytes = 0; doneBytes < buf.length;) {
        const pieceBytes = Math.min(buf.length - doneBytes, MAX_BOUNCE_BYTES);
        await this.bouncedWrite(buf.subarray(doneBytes, doneBytes + pieceBytes), hostOffset + doneBytes);
        doneBytes += pieceBytes;
      }
    } catch (error) {
      throw toHostIoError(error, this.path, 'pwrite', hostOffset);
    }
  }

  /**
   * Direct write of `data` at hostOffset through a bounce buffer: read the partial head and tail
   * blocks, overlay the data, write the aligned range. When a partial block reaches past the end of
   * file the whole file beyond the first block is locked (decided up front from the size hint, so
   * overlapping writes keep their issue order; retried if only discovered by the reads) and the size
   * is trimmed back to max(old end of file, end of write).
   */
  private async bouncedWrite(data: Uint8Array, hostOffset: number): Promise<void> {
    const block = this.blockBytes;
    const alignedStart = alignDown(hostOffset, block);
    const writeEnd = hostOffset + data.length;
    const alignedEnd = alignUp(writeEnd, block);
    const spanBytes = alignedEnd - alignedStart;
    const headPartial = hostOffset > alignedStart;
    const tailPartial = writeEnd < alignedEnd;
    if (!headPartial && !tailPartial) {
      // Only the memory is unaligned: no block to merge, no size to trim — copy and write.
      const release = await this.ranges.acquire(alignedStart, alignedEnd);
      const bounce = this.pool.acquire(spanBytes);
      try {
        const view = bounce.subarray(0, spanBytes);
        view.set(data);
        await this.writeFully(view, alignedStart);
        this.sizeHintBytes = Math.max(this.sizeHintBytes, writeEnd);
        return;
      } finally {
        this.pool.release(bounce);
        release();
      }
    }
    for (let lockToInfinity = alignedEnd > this.sizeHintBytes; ; lockToInfinity = true) {
      const release = await this.ranges.acquire(alignedStart, lockToInfinity ? Infinity : alignedEnd);
      const bounce = this.pool.acquire(spanBytes);
      try {
        const view = bounce.subarray(0, spanBytes);
        let endOfFile: number | undefined;
        if (headPartial) {
          const readBytes = await this.readFully(view.subarray(0, block), alignedStart);
          if (readBytes < block) {
            endOfFile = alignedStart + readBytes;
          }
        }
        const tailBlockStart = alignedEnd - block;
        if (tailPartial && endOfFile === undefined && !(headPartial && tailBlockStart === alignedStart)) {
          const readBytes = await this.readFully(view.subarray(spanBytes - block), tailBlockStart);
          if (readBytes < block) {
            endOfFile = tailBlockStart + readBytes;
          }
        }
        const crossesEndOfFile = endOfFile !== undefined && endOfFile < alignedEnd;
        if (crossesEndOfFile && !lockToInfinity) {
          continue;
        }
        view.set(data, hostOffset - alignedStart);
        await this.writeFully(view, alignedStart);
        if (crossesEndOfFile) {
          const sizeBytes = Math.max(endOfFile ?? 0, writeEnd);
          if (sizeBytes < alignedEnd) {
            await this.handle.truncate(sizeBytes);
          }
        }
        this.sizeHintBytes = Math.max(this.sizeHintBytes, writeEnd);
        return;
      } finally {
        this.pool.release(bounce);
        release();
      }
    }
  }

  async fdatasync(): Promise<void> {
    this.checkOpen('fdatasync');
    try {
      await this.handle.datasync();
    } catch (error) {
      throw toHostIoError(error, this.path, 'fdatasync');
    }
  }

  async size(): Promise<number> {
    this.checkOpen('size');
    try {
      const stat = await this.handle.stat();
      return stat.size;
    } catch (error) {
      throw toHostIoError(error, this.path, 'fstat');
    }
  }

  async truncate(bytes: number): Promise<void> {
    this.checkWritable('truncate', bytes);
    checkRange(this.path, 'truncate', bytes, 0);
    const release = this.direct ? await this.ranges.acquire(0, Infinity) : undefined;
    try {
      await this.handle.truncate(bytes);
      this.sizeHintBytes = bytes;
    } catch (error) {
      throw toHostIoError(error, this.path, 'ftruncate', bytes);
    } finally {
      release?.();
    }
  }

  /**
   * fallocate with `mode`; false when the host cannot (EOPNOTSUPP/ENOSYS). On a direct handle the
   * range (to infinity when the size may change) is held against concurrent read-modify-writes.
   */
  private async fallocateRange(operation: string, mode: number, offset: number, length: number,
    mayChangeSize: boolean): Promise<boolean> {
    this.checkWritable(operation, offset);
    checkRange(this.path, operation, offset, length);
    if (length === 0) {
      return true;
    }
    const release = this.direct ? await this.ranges.acquire(offset, mayChangeSize ? Infinity : offset + length) : undefined;
    try {
      await fallocate(this.fd, mode, offset, length);
      if (mayChangeSize) {
        this.sizeHintBytes = Math.max(this.sizeHintBytes, offset + length);
      }
      return true;
    } catch (error) {
      const code = errorCodeOf(error);
      if (code === 'EOPNOTSUPP' || code === 'ENOSYS') {
        debug('%s: %s unsupported (%s)', this.path, operation, code);
        return false;
      }
      throw toHostIoError(error, this.path, operation, offset);
    } finally {
      release?.();
    }
  }

  zeroRange(offset: number, length: number, keepSize = false): Promise<boolean> {
    return this.fallocateRange('zeroRange', keepSize ? FALLOC.ZERO_RANGE_KEEP_SIZE : FALLOC.ZERO_RANGE, offset, length, !keepSize);
  }

  punchHole(offset: number, length: number): Promise<boolean> {
    return this.fallocateRange('punchHole', FALLOC.PUNCH_HOLE_KEEP_SIZE, offset, length, false);
  }

  allocate(offset: number, length: number, keepSize = false): Promise<boolean> {
    return this.fallocateRange('allocate', keepSize ? FALLOC.KEEP_SIZE : FALLOC.DEFAULT, offset, length, !keepSize);
  }

  async dropCache(offset: number, length: number): Promise<void> {
    this.checkOpen('dropCache');
    checkRange(this.path, 'dropCache', offset, length);
    try {
      await fadvise(this.fd, offset, length, FADVISE.DONTNEED);
    } catch (error) {
      throw toHostIoError(error, this.path, 'posix_fadvise(DONTNEED)', offset);
    }
  }

  async close(): Promise<void> {
    if (this.closed) {
      return;
    }
    this.closed = true;
    // The fd must outlive every read/write issued on it (it could be reused by another open).
    if (this.nbInflight > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    if (this.locked) {
      try {
        releaseQemuLocks(this.fd);
        if (!this.readOnly) {
          releaseFlock(this.fd);
        }
      } catch (error) {
        debug('%s: releasing locks before close failed (close releases them): %o', this.path, error);
      }
    }
    try {
      await this.aio?.handle.close();
      await this.handle.close();
    } catch (error) {
      throw toHostIoError(error, this.path, 'close');
    }
    debug('closed %s', this.path);
  }
}

/**
 * The second open of a direct file that its AIO requests use (see NodeHostFile.aio); null
 * (the threadpool then) when the path no longer names the same file or cannot be opened again.
 */
async function openAioHandle(path: string, flags: number, opened: Stats, engine: AioEngine): Promise<AioChannel | null> {
  let handle: FileHandle | undefined;
  try {
    handle = await open(path, flags);
    const again = await handle.stat();
    if (again.dev === opened.dev && again.ino === opened.ino) return { engine, handle };
    debug('%s: replaced between opens, using the threadpool', path);
  } catch (error) {
    debug('%s: cannot open a second time for AIO, using the threadpool: %o', path, error);
  }
  await handle?.close().catch(() => undefined);
  return null;
}

/**
 * Open `path` as a HostFile. Read-write opens take an exclusive flock and QEMU's writer locks;
 * read-only opens take QEMU's reader locks (sharing neither write nor resize), or with `forceShare`
 * only the consistent-read byte, sharing everything (see locks.ts). `lock: false` skips all. Fails with LockError when the image is in use, HostIoError for anything else
 * (EINVAL for `direct` on a filesystem without O_DIRECT).
 */
export async function openNodeHostFile(path: string, options: HostFileOpenOptions): Promise<HostFile> {
  const readOnly = options.readOnly;
  const direct = options.direct ?? false;
  const lock = options.lock ?? true;
  const permissions = qemuPermissionsFor(path, readOnly, options.forceShare ?? false);
  const flags = (readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR) |
    (direct ? fsConstants.O_DIRECT : 0) |
    (!readOnly && options.create === true ? fsConstants.O_CREAT : 0);
  let handle: FileHandle;
  try {
    handle = await open(path, flags, 0o644);
  } catch (error) {
    throw toHostIoError(error, path, direct ? 'open (O_DIRECT)' : 'open');
  }
  let aio: AioChannel | null = null;
  try {
    if (lock) {
      if (!readOnly) {
        takeExclusiveFlock(handle.fd, path);
      }
      applyQemuLocks(handle.fd, path, permissions);
    }
    const stat = await handle.stat();
    const engine = direct && options.aio !== 'threads' ? nativeAio() : null;
    aio = engine ? await openAioHandle(path, flags & ~fsConstants.O_CREAT, stat, engine) : null;
    const file = new NodeHostFile(path, handle, readOnly, direct, lock, stat.size, aio);
    debug('opened %s %s%s%s, dio alignment %d', path, readOnly ? 'ro' : 'rw', direct ? (aio ? ' O_DIRECT aio=native' : ' O_DIRECT aio=threads') : '',
      lock ? ' locked' : '', file.dioAlignment);
    return file;
  } catch (error) {
    await aio?.handle.close().catch(() => undefined);
    await handle.close().catch(() => undefined);
    throw toHostIoError(error, path, 'open');
  }
}
