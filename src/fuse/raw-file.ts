/**
 * disk.raw: the guest contents as a regular file with POSIX size semantics, over an image whose
 * virtual size is a whole number of 512-byte sectors.
 *
 * Logical size vs image size. The file's size (st_size, the end of reads) is the logical size, any
 * byte count: `truncate -s 100000` or a write ending at byte 100001 gives exactly that. The image is
 * at least the logical size rounded up to 512 bytes (QEMU's sector), and beyond the logical size it
 * only ever holds zeros — so bytes past a shrink read as zeros when the file grows again: a shrink to
 * an unaligned size zeroes the rest of its last sector, and the device grows with zeros (a longer
 * backing file does not show through: Qcow2Device.resize). When the file is trimmed (fsync, before an
 * inspection file is generated, at unmount) the image's virtual size becomes the logical size rounded
 * up to 512 bytes, as `qemu-img resize` of that size would leave it.
 *
 * Growth ahead: a sequential copy into an empty image extends the file with every write, and an image
 * resize is a durable header update (an fdatasync). So writes past the end grow the image geometrically
 * (by its size, at least GROW_MIN_BYTES, at most GROW_MAX_BYTES) and the image is trimmed back as
 * above. A crash can leave at most zero-filled slack at the end, never stale data (a shrink always
 * resizes the image exactly). Images with internal snapshots cannot be shrunk (QEMU refuses it too),
 * so they grow exactly.
 *
 * With `nogrow` the size is pinned: a truncate (or fallocate) to another size fails EPERM (EFBIG), a
 * write wholly past the end fails EFBIG, one straddling it is short. On a read-only mount every
 * modification fails EROFS.
 *
 * fallocate(2): PUNCH_HOLE|KEEP_SIZE zeroes the range and releases its storage (the device's
 * zeroRange with unmap: discarded clusters, zero clusters where a backing file would show through);
 * ZERO_RANGE zeroes it keeping it described as zeros (and grows the file without KEEP_SIZE); mode 0
 * grows the file when the range ends past it and is otherwise a no-op (the image allocates on write);
 * KEEP_SIZE alone is a no-op. Other modes (COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE, PUNCH_HOLE
 * without KEEP_SIZE) answer EOPNOTSUPP, as a filesystem without them does. Zeroing takes the size lock
 * exclusively: the device checks the allocation at the edges before zeroing them.
 *
 * lseek(2) SEEK_DATA/SEEK_HOLE: from the device's allocation map, bounded by the logical size.
 */
import type { InspectableDevice, SeekTarget } from '../qcow2/engine/block-device.js';
import { fsError } from './errno.js';

/** Virtual sizes are whole 512-byte sectors (QEMU's BDRV_SECTOR_SIZE). */
export const SIZE_ALIGNMENT = 512;
/** Bounds of one growth-ahead step. */
export const GROW_MIN_BYTES = 64 * 1024 * 1024;
export const GROW_MAX_BYTES = 1024 * 1024 * 1024;

/** fallocate(2) mode bits (linux/falloc.h). */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_COLLAPSE_RANGE = 0x08;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const FALLOC_FL_INSERT_RANGE = 0x20;
export const FALLOC_FL_UNSHARE_RANGE = 0x40;
/** lseek(2) whence values that reach a FUSE filesystem (the kernel answers the others itself). */
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

export function alignUp(bytes: number): number {
  return Math.ceil(bytes / SIZE_ALIGNMENT) * SIZE_ALIGNMENT;
}

/**
 * lseek(2) SEEK_DATA / SEEK_HOLE in a file of `sizeBytes` bytes, `find` saying where data or a hole
 * starts at or after an offset: ENXIO for an offset outside the file and for SEEK_DATA with no data
 * after it; SEEK_HOLE finds the end of the file at the latest. EINVAL for any other whence.
 */
export async function seekWithin(
  path: string, sizeBytes: number, offset: number, whence: number,
  find: (offset: number, target: SeekTarget) => Promise<number | undefined>,
): Promise<number> {
  if (whence !== SEEK_DATA && whence !== SEEK_HOLE) throw fsError('EINVAL', `${path}: lseek whence ${whence} is not SEEK_DATA or SEEK_HOLE`);
  if (!Number.isSafeInteger(offset) || offset < 0 || offset >= sizeBytes) {
    throw fsError('ENXIO', `${path}: lseek offset ${offset} is outside the file (${sizeBytes} bytes)`);
  }
  if (whence === SEEK_HOLE) return Math.min(sizeBytes, (await find(offset, 'hole')) ?? sizeBytes);
  const data = await find(offset, 'data');
  if (data === undefined || data >= sizeBytes) throw fsError('ENXIO', `${path}: no data at or after ${offset}`);
  return data;
}

/**
 * A readers–writer lock: data I/O on disk.raw shares it, size changes and zeroing take it exclusively
 * (so a shrink never runs under an in-flight read or write). FIFO, so a waiting resize is not starved.
 */
export class RwLock {
  private readers = 0;
  private writer = false;
  private readonly queue: { exclusive: boolean; grant: () => void }[] = [];

  async shared<T>(fn: () => Promise<T>): Promise<T> {
    await this.acquire(false);
    try {
      return await fn();
    } finally {
      this.readers--;
      this.wake();
    }
  }

  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    await this.acquire(true);
    try {
      return await fn();
    } finally {
      this.writer = false;
      this.wake();
    }
  }

  private acquire(exclusive: boolean): Promise<void> {
    return new Promise((grant) => {
      this.queue.push({ exclusive, grant });
      this.wake();
    });
  }

  private wake(): void {
    for (let next = this.queue[0]; next !== undefined; next = this.queue[0]) {
      if (this.writer || (next.exclusive && this.readers > 0)) return;
      this.queue.shift();
      if (next.exclusive) this.writer = true;
      else this.readers++;
      next.grant();
    }
  }
}

export interface RawFileOptions {
  readOnly: boolean;
  nogrow: boolean;
}

/** The state and the operations of disk.raw (see the module comment). */
export class RawFile {
  readonly times: { atime: Date; mtime: Date; ctime: Date };
  /** Bumped by every change of contents or size (inspection files are regenerated when it moves). */
  generation = 0;
  private readonly lock = new RwLock();
  /** The file's size (st_size); the device is at least this big, and zero beyond it. */
  private logicalSize: number;
  /** The allocatedBytes() call in progress: concurrent getattrs share it (it may scan the refcounts). */
  private allocatedQuery: Promise<number> | undefined;

  constructor(private readonly device: InspectableDevice, private readonly options: RawFileOptions, mountedAt: Date) {
    this.logicalSize = device.virtualSize;
    this.times = { atime: mountedAt, mtime: mountedAt, ctime: mountedAt };
  }

  get size(): number {
    return this.logicalSize;
  }

  /** Host bytes the image allocates (concurrent callers share one query). */
  allocatedBytes(): Promise<number> {
    this.allocatedQuery ??= this.device.allocatedBytes().finally(() => { this.allocatedQuery = undefined; });
    return this.allocatedQuery;
  }

  /** Up to `length` bytes at `position`, clamped to the file's size. */
  read(length: number, position: number): Promise<Buffer> {
    return this.lock.shared(async () => {
      const end = Math.min(this.logicalSize, position + length);
      return position >= end ? Buffer.alloc(0) : this.device.read(position, end - position);
    });
  }

  /** Write, growing the file (and the image, ahead) when the write ends past it (unless nogrow). */
  async write(path: string, data: Buffer, position: number): Promise<number> {
    this.assertWritable(path);
    if (data.length === 0) return 0;
    for (;;) {
      const written = await this.lock.shared(async () => {
        let length = data.length;
        if (this.options.nogrow && position + length > this.logicalSize) {
          if (position >= this.logicalSize) {
            throw fsError('EFBIG', `${path}: write at ${position} is past the end (${this.logicalSize} bytes) and the mount is nogrow`);
          }
          length = this.logicalSize - position;
        }
        if (position + length > this.device.virtualSize) return undefined;
        await this.device.write(position, length === data.length ? data : data.subarray(0, length));
        this.logicalSize = Math.max(this.logicalSize, position + length);
        return length;
      });
      if (written !== undefined) {
        this.touched();
        return written;
      }
      await this.lock.exclusive(async () => {
        if (this.device.virtualSize < position + data.length) await this.device.resize(this.growTarget(position + data.length));
      });
    }
  }

  /** truncate(2) to `size` bytes exactly. */
  async resize(path: string, size: number): Promise<void> {
    this.assertWritable(path);
    if (!Number.isSafeInteger(size) || size < 0) throw fsError('EINVAL', `${path}: invalid size ${size}`);
    await this.lock.exclusive(async () => {
      if (this.logicalSize === size) return;
      if (this.options.nogrow) throw fsError('EPERM', `${path}: the mount is nogrow; the size stays ${this.logicalSize}`);
      await this.setSizeLocked(size);
    });
    this.touched();
  }

  /** fallocate(2) (see the module comment for the modes). */
  async fallocate(path: string, mode: number, offset: number, length: number): Promise<void> {
    this.assertWritable(path);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0) {
      throw fsError('EINVAL', `${path}: invalid fallocate range [${offset}, +${length})`);
    }
    if (!Number.isSafeInteger(offset + length)) throw fsError('EFBIG', `${path}: fallocate range [${offset}, +${length}) is too large`);
    const keepSize = (mode & FALLOC_FL_KEEP_SIZE) !== 0;
    switch (mode & ~FALLOC_FL_KEEP_SIZE) {
      case 0:
        if (!keepSize) await this.zeroAndGrow(path, offset, offset + length, undefined);
        return;
      case FALLOC_FL_PUNCH_HOLE:
        if (keepSize) return this.zeroAndGrow(path, offset, offset + length, 'punch');
        break;
      case FALLOC_FL_ZERO_RANGE:
        return this.zeroAndGrow(path, offset, offset + length, keepSize ? 'zero' : 'zero-grow');
    }
    throw fsError('EOPNOTSUPP', `${path}: fallocate mode 0x${mode.toString(16)} is not supported (only allocate, PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE)`);
  }

  /** lseek(2) SEEK_DATA / SEEK_HOLE from the device's allocation map. */
  seek(path: string, offset: number, whence: number): Promise<number> {
    return this.lock.shared(() => seekWithin(path, this.logicalSize, offset, whence, (at, target) => this.device.seek(at, target)));
  }

  /** Shrink the image back to the file's size (rounded up to a sector) when it was grown ahead. */
  trim(): Promise<void> {
    return this.lock.exclusive(async () => {
      const target = alignUp(this.logicalSize);
      if (this.device.virtualSize > target && !this.device.readOnly) await this.device.resize(target);
    });
  }

  setTimes(atime: Date, mtime: Date): void {
    this.times.atime = atime;
    this.times.mtime = mtime;
    this.times.ctime = new Date();
  }

  /**
   * Zero [start, end) as `how` says ('punch': release storage; 'zero': keep it described as zeros;
   * 'zero-grow': the same, growing the file to `end`; undefined: only grow the file to `end`). Only
   * the part inside the file is zeroed: beyond it the image holds zeros already.
   */
  private async zeroAndGrow(path: string, start: number, end: number, how: 'punch' | 'zero' | 'zero-grow' | undefined): Promise<void> {
    const grows = (how === undefined || how === 'zero-grow') && end > this.logicalSize;
    if (how === undefined && !grows) return;
    if (grows && this.options.nogrow) throw fsError('EFBIG', `${path}: fallocate to ${end} is past the end (${this.logicalSize} bytes) and the mount is nogrow`);
    await this.lock.exclusive(async () => {
      const zeroEnd = Math.min(end, this.logicalSize);
      if (how !== undefined && start < zeroEnd) await this.device.zeroRange(start, zeroEnd - start, how === 'punch');
      if (grows && end > this.logicalSize) await this.setSizeLocked(end);
    });
    this.touched();
  }

  /** Set the logical size to `size`, resizing the image (exactly on shrink) and zeroing a partial last sector's tail. */
  private async setSizeLocked(size: number): Promise<void> {
    const target = alignUp(size);
    if (size < this.logicalSize) {
      if (target !== this.device.virtualSize) await this.device.resize(target);
      if (size < target) await this.device.zeroRange(size, target - size, false);
    } else if (target > this.device.virtualSize) {
      await this.device.resize(target);
    }
    this.logicalSize = size;
  }


  /** The device size to grow to for a write ending at `end` (ahead of it, unless the image cannot shrink back). */
  private growTarget(end: number): number {
    if (this.device.listSnapshots().length > 0) return alignUp(end);
    const size = this.device.virtualSize;
    return alignUp(Math.max(end, size + Math.min(GROW_MAX_BYTES, Math.max(GROW_MIN_BYTES, size))));
  }

  private assertWritable(path: string): void {
    if (this.options.readOnly) throw fsError('EROFS', `${path}: the mount is read-only`);
  }

  private touched(): void {
    this.generation++;
    this.times.mtime = new Date();
    this.times.ctime = this.times.mtime;
  }
}
