/**
 * The ops factory: the mount's file tree and what every FUSE operation does to the image.
 *
 *   /                      directory
 *   /disk.raw              the guest contents (name from -o name=): read/write/truncate/fsync
 *   /info.json /map.json /layout.txt /check.json   read-only, generated when opened (inspect.ts)
 *   /snapshots/            directory of /snapshots/NAME.raw, read-only views of internal snapshots
 *
 * Handlers are plain async functions (path, fh, …) → result that throw coded errors; the adapter turns
 * them into fuse-native callbacks and errnos. Nothing here touches FUSE, so every rule is unit-tested
 * by calling the handlers directly.
 *
 * disk.raw behaves like a regular file: st_size is the virtual size, st_blocks the host bytes the image
 * allocates / 512. Writes past the end grow the image, truncate (and O_TRUNC) resize it, so `cp SRC
 * disk.raw` leaves an image equal to SRC. Virtual sizes are multiples of 512 bytes (QEMU rounds a qcow2
 * size down to whole sectors), so a grow or truncate to an unaligned size rounds up to the next 512-byte
 * boundary; the tail reads as zeros. With `nogrow` the size is pinned: a truncate to another size fails
 * EPERM, a write wholly past the end fails EFBIG ("File too large"), one straddling it is short. On a
 * read-only mount every modification fails EROFS. FUSE `flush` (each close(2)) does nothing: durability
 * is fsync's (and unmount's) job, as on any filesystem.
 *
 * Growth ahead: a sequential copy into an empty image extends the file with every write, and an image
 * resize is a durable header update (an fdatasync). So writes past the end grow the image geometrically
 * (by its size, at least GROW_MIN_BYTES, at most GROW_MAX_BYTES) and the file's size — st_size, the end
 * of reads — is kept here as the logical size, which the image is trimmed back to on fsync, before an
 * inspection file is generated, and at unmount (dispose). Beyond the logical size the image only ever
 * holds zeros (a shrink always resizes the image exactly), so a crash can leave at most zero-filled
 * slack at the end, never stale data. Images with internal snapshots cannot be shrunk (QEMU refuses
 * it too), so they grow exactly.
 */
import { constants as fsConstants } from 'node:fs';
import { createRequire } from 'node:module';
import type { BlockDevice, InspectableDevice, SnapshotSummary } from '../qcow2/engine/block-device.js';
import { fsError } from './errno.js';
import { ContentSnapshot, INSPECTION_FILES, type CaptureOptions, type ContentGenerator } from './inspect.js';

export interface FileStat {
  mode: number;
  uid: number;
  gid: number;
  size: number;
  /** 512-byte blocks allocated. */
  blocks: number;
  /** Preferred I/O size. */
  blksize: number;
  nlink: number;
  atime: Date;
  mtime: Date;
  ctime: Date;
}

/** statvfs(3) fields, each fitting in 32 bits (fuse-native passes them as uint32). */
export interface FsStat {
  bsize: number;
  frsize: number;
  blocks: number;
  bfree: number;
  bavail: number;
  files: number;
  ffree: number;
  favail: number;
  fsid: number;
  flag: number;
  namemax: number;
}

/** Host statvfs of a path, as fs-ext reports it (fields may exceed 32 bits). */
export interface HostStatVfs {
  f_bsize: number;
  f_frsize: number;
  f_blocks: number;
  f_bfree: number;
  f_bavail: number;
  f_files: number;
  f_ffree: number;
  f_favail: number;
  f_namemax: number;
}

export type StatVfs = (path: string) => Promise<HostStatVfs>;

export interface OpsOptions {
  readOnly: boolean;
  nogrow: boolean;
  /** The raw file's name in the root. */
  rawName: string;
  /** A path on the host filesystem that holds the image (statfs reports that filesystem). */
  statfsPath: string;
  uid: number;
  gid: number;
  /** How inspection files are captured (memory limit, spill directory). */
  capture?: CaptureOptions;
  /** statvfs of a host path; default fs-ext's statVFS. */
  statVfs?: StatVfs;
}

/** Every operation the mount implements, as async handlers that throw coded errors. */
export interface FsHandlers {
  getattr(path: string): Promise<FileStat>;
  readdir(path: string): Promise<string[]>;
  /** Returns the file handle (≥ 1). */
  open(path: string, flags: number): Promise<number>;
  release(path: string, fh: number): Promise<void>;
  /** Up to `length` bytes at `position`; shorter at the end of the file. */
  read(path: string, fh: number, length: number, position: number): Promise<Buffer>;
  /** Returns the number of bytes written. `data` may be kept by the device: pass a buffer you own. */
  write(path: string, fh: number, data: Buffer, position: number): Promise<number>;
  truncate(path: string, size: number): Promise<void>;
  ftruncate(path: string, fh: number, size: number): Promise<void>;
  flush(path: string, fh: number): Promise<void>;
  fsync(path: string, datasync: boolean, fh: number): Promise<void>;
  statfs(path: string): Promise<FsStat>;
  /**
   * fallocate(2) on an open file: `mode` is FALLOC_FL_* bits (0 = allocate, PUNCH_HOLE|KEEP_SIZE =
   * discard, ZERO_RANGE[|KEEP_SIZE] = write zeroes); other modes EOPNOTSUPP.
   */
  fallocate(path: string, fh: number, mode: number, offset: number, length: number): Promise<void>;
  /** lseek(2) SEEK_DATA (3) / SEEK_HOLE (4) on an open file: the resulting offset; ENXIO past the end. */
  lseek(path: string, fh: number, offset: number, whence: number): Promise<number>;
  utimens(path: string, atime: Date, mtime: Date): Promise<void>;
  /** Creating, removing, renaming and re-owning entries: always refused (EPERM, EROFS when read-only). */
  refuse(op: string, path: string): Promise<never>;
  /** Trim the image to the file's size, release every open handle and snapshot view (before the device closes). Idempotent. */
  dispose(): Promise<void>;
  /** Number of open file handles. */
  openHandles(): number;
}

/** Virtual sizes are whole 512-byte sectors (QEMU's BDRV_SECTOR_SIZE). */
export const SIZE_ALIGNMENT = 512;
/** Bounds of one growth-ahead step. */
export const GROW_MIN_BYTES = 64 * 1024 * 1024;
export const GROW_MAX_BYTES = 1024 * 1024 * 1024;
const BLKSIZE = 131072;
/** Access-mode bits of open(2) flags (not in Node's fs.constants). */
const O_ACCMODE = 3;
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;

type Node =
  | { kind: 'root' }
  | { kind: 'raw' }
  | { kind: 'inspect'; name: string; generate: ContentGenerator }
  | { kind: 'snapdir' }
  | { kind: 'snapshot'; file: string; ref: string; summary: SnapshotSummary };

type Handle =
  | { kind: 'raw'; writable: boolean }
  | { kind: 'content'; name: string; snapshot: ContentSnapshot }
  | { kind: 'snapshot'; ref: string; view: BlockDevice };

interface SnapshotView {
  refs: number;
  opening: Promise<BlockDevice>;
}

export function alignUp(bytes: number): number {
  return Math.ceil(bytes / SIZE_ALIGNMENT) * SIZE_ALIGNMENT;
}

/** Escape a snapshot name into one path component ('%' and '/' percent-encoded). */
function encodeSnapshotName(name: string): string {
  return name.replace(/%/g, '%25').replace(/\//g, '%2F');
}

/**
 * The file names of the snapshots directory → the snapshot id to open each with (ids are unique; a
 * name may be repeated, empty, or equal to another snapshot's id). A unique, non-empty name is
 * `NAME.raw`; a duplicate or empty one is `NAME@ID.raw`.
 */
export function snapshotFiles(snapshots: readonly SnapshotSummary[]): Map<string, { ref: string; summary: SnapshotSummary }> {
  const counts = new Map<string, number>();
  for (const s of snapshots) counts.set(s.name, (counts.get(s.name) ?? 0) + 1);
  const files = new Map<string, { ref: string; summary: SnapshotSummary }>();
  for (const s of snapshots) {
    const unique = s.name !== '' && counts.get(s.name) === 1;
    const file = unique ? `${encodeSnapshotName(s.name)}.raw` : `${encodeSnapshotName(s.name)}@${encodeSnapshotName(s.id)}.raw`;
    files.set(file, { ref: s.id, summary: s });
  }
  return files;
}

/** Scale host statvfs numbers so each fits fuse-native's uint32 fields (bigger fragments, fewer blocks). */
export function toFsStat(host: HostStatVfs, readOnly: boolean): FsStat {
  const U32 = 0xffffffff;
  let frsize = host.f_frsize || host.f_bsize;
  let { f_blocks: blocks, f_bfree: bfree, f_bavail: bavail } = host;
  while (blocks > U32 && frsize * 2 <= 0x80000000) {
    frsize *= 2;
    blocks = Math.floor(blocks / 2);
    bfree = Math.floor(bfree / 2);
    bavail = Math.floor(bavail / 2);
  }
  const clamp = (n: number) => Math.min(U32, Math.max(0, n));
  return {
    bsize: clamp(host.f_bsize), frsize, blocks: clamp(blocks), bfree: clamp(bfree), bavail: clamp(bavail),
    files: clamp(host.f_files), ffree: clamp(host.f_ffree), favail: clamp(host.f_favail), fsid: 0,
    flag: readOnly ? 1 /* ST_RDONLY */ : 0, namemax: clamp(host.f_namemax),
  };
}

/** fs-ext's statVFS, loaded on first use (a native module). */
function fsExtStatVfs(path: string): Promise<HostStatVfs> {
  const fsExt = createRequire(import.meta.url)('fs-ext') as {
    statVFS(path: string, callback: (err: Error | null, stat: HostStatVfs) => void): void;
  };
  return new Promise((resolve, reject) => fsExt.statVFS(path, (err, stat) => (err ? reject(err) : resolve(stat))));
}

/**
 * A readers–writer lock: data I/O on disk.raw shares it, size changes take it exclusively (so a
 * shrink never runs under an in-flight read or write). FIFO, so a waiting resize is not starved.
 */
class RwLock {
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

/** Build the handlers for `device` (which stays owned by the caller: close it after dispose()). */
export function createHandlers(device: InspectableDevice, options: OpsOptions): FsHandlers {
  const statVfs = options.statVfs ?? fsExtStatVfs;
  const mountedAt = new Date();
  const raw = { atime: mountedAt, mtime: mountedAt, ctime: mountedAt };
  const handles = new Map<number, Handle>();
  let nextFh = 1;
  /** Size and time of the latest content generated per inspection file. */
  const generated = new Map<string, { size: number; at: Date }>();
  const views = new Map<string, SnapshotView>();
  const sizeLock = new RwLock();
  /** The file's size (st_size); the device is at least this big, and zero beyond it. */
  let logicalSize = device.virtualSize;
  /** The allocatedBytes() call in progress: concurrent getattrs share it (it may scan the refcounts). */
  let allocatedQuery: Promise<number> | undefined;
  const allocatedBytes = () => (allocatedQuery ??= device.allocatedBytes().finally(() => { allocatedQuery = undefined; }));

  const readOnlyError = (path: string) => fsError('EROFS', `${path}: the mount is read-only`);

  function resolve(path: string): Node {
    if (path === '/') return { kind: 'root' };
    if (path === `/${options.rawName}`) return { kind: 'raw' };
    if (path === '/snapshots') return { kind: 'snapdir' };
    const inspect = INSPECTION_FILES.get(path.slice(1));
    if (inspect !== undefined && path.lastIndexOf('/') === 0) return { kind: 'inspect', name: path.slice(1), generate: inspect };
    if (path.startsWith('/snapshots/')) {
      const file = path.slice('/snapshots/'.length);
      const entry = snapshotFiles(device.listSnapshots()).get(file);
      if (entry !== undefined) return { kind: 'snapshot', file, ...entry };
    }
    throw fsError('ENOENT', `${path}: no such file`);
  }

  function handle(path: string, fh: number): Handle {
    const found = handles.get(fh);
    if (found === undefined) throw fsError('EBADF', `${path}: unknown file handle ${fh}`);
    return found;
  }

  function addHandle(h: Handle): number {
    while (handles.has(nextFh) || nextFh === 0) nextFh = (nextFh + 1) % 0x1_0000_0000;
    const fh = nextFh;
    handles.set(fh, h);
    nextFh = (nextFh + 1) % 0x1_0000_0000;
    return fh;
  }

  function stat(mode: number, size: number, blocks: number, times: { atime: Date; mtime: Date; ctime: Date }, nlink = 1): FileStat {
    return { mode, uid: options.uid, gid: options.gid, size, blocks, blksize: BLKSIZE, nlink, ...times };
  }

  const touched = () => {
    raw.mtime = new Date();
    raw.ctime = raw.mtime;
  };

  /** Read from disk.raw, clamped to the file's size. */
  function readRaw(length: number, position: number): Promise<Buffer> {
    return sizeLock.shared(async () => {
      const end = Math.min(logicalSize, position + length);
      return position >= end ? Buffer.alloc(0) : device.read(position, end - position);
    });
  }

  /** The device size to grow to for a write ending at `end` (ahead of it, unless the image cannot shrink back). */
  function growTarget(end: number): number {
    if (device.listSnapshots().length > 0) return alignUp(end);
    const size = device.virtualSize;
    return alignUp(Math.max(end, size + Math.min(GROW_MAX_BYTES, Math.max(GROW_MIN_BYTES, size))));
  }

  /** Write to disk.raw, growing the file (and the image, ahead) when the write ends past it (unless nogrow). */
  async function writeRaw(path: string, data: Buffer, position: number): Promise<number> {
    if (options.readOnly) throw readOnlyError(path);
    if (data.length === 0) return 0;
    for (;;) {
      const written = await sizeLock.shared(async () => {
        let length = data.length;
        if (options.nogrow && position + length > logicalSize) {
          if (position >= logicalSize) throw fsError('EFBIG', `${path}: write at ${position} is past the end (${logicalSize} bytes) and the mount is nogrow`);
          length = logicalSize - position;
        }
        if (position + length > device.virtualSize) return undefined;
        await device.write(position, length === data.length ? data : data.subarray(0, length));
        logicalSize = Math.max(logicalSize, alignUp(position + length));
        return length;
      });
      if (written !== undefined) {
        touched();
        return written;
      }
      await sizeLock.exclusive(async () => {
        if (device.virtualSize < position + data.length) await device.resize(growTarget(position + data.length));
      });
    }
  }

  async function resizeRaw(path: string, size: number): Promise<void> {
    if (options.readOnly) throw readOnlyError(path);
    if (!Number.isSafeInteger(size) || size < 0) throw fsError('EINVAL', `${path}: invalid size ${size}`);
    const target = alignUp(size);
    await sizeLock.exclusive(async () => {
      if (logicalSize === target) return;
      if (options.nogrow) throw fsError('EPERM', `${path}: the mount is nogrow; the size stays ${logicalSize}`);
      if (target < logicalSize || target > device.virtualSize) await device.resize(target);
      logicalSize = target;
    });
    touched();
  }

  /** Shrink the image back to the file's size when it was grown ahead (see the module comment). */
  function trim(): Promise<void> {
    return sizeLock.exclusive(async () => {
      if (device.virtualSize > logicalSize && !device.readOnly) await device.resize(logicalSize);
    });
  }

  async function openView(ref: string): Promise<BlockDevice> {
    let view = views.get(ref);
    if (view === undefined) {
      view = { refs: 0, opening: device.openSnapshot(ref) };
      views.set(ref, view);
      view.opening.catch(() => views.delete(ref));
    }
    view.refs++;
    try {
      return await view.opening;
    } catch (err) {
      view.refs--;
      throw err;
    }
  }

  async function closeView(ref: string): Promise<void> {
    const view = views.get(ref);
    if (view === undefined || --view.refs > 0) return;
    views.delete(ref);
    await (await view.opening).close();
  }

  async function releaseHandle(fh: number, h: Handle): Promise<void> {
    handles.delete(fh);
    if (h.kind === 'content') await h.snapshot.close();
    else if (h.kind === 'snapshot') await closeView(h.ref);
  }

  const refuseModification = (path: string, what: string) => {
    throw options.readOnly ? readOnlyError(path) : fsError('EACCES', `${path}: ${what} is read-only`);
  };

  return {
    async getattr(path) {
      const node = resolve(path);
      const dirTimes = { atime: mountedAt, mtime: mountedAt, ctime: mountedAt };
      switch (node.kind) {
        case 'root': return stat(S_IFDIR | 0o755, 4096, 0, dirTimes, 3);
        case 'snapdir': return stat(S_IFDIR | 0o755, 4096, 0, dirTimes, 2);
        case 'raw': {
          const allocated = await allocatedBytes();
          return stat(S_IFREG | (options.readOnly ? 0o444 : 0o644), logicalSize, Math.ceil(allocated / 512), raw);
        }
        case 'inspect': {
          const latest = generated.get(node.name);
          const at = latest?.at ?? mountedAt;
          const size = latest?.size ?? 0;
          return stat(S_IFREG | 0o444, size, Math.ceil(size / 512), { atime: at, mtime: at, ctime: at });
        }
        case 'snapshot': return stat(S_IFREG | 0o444, node.summary.virtualSize, 0, dirTimes);
      }
    },

    async readdir(path) {
      const node = resolve(path);
      if (node.kind === 'root') return ['.', '..', options.rawName, ...INSPECTION_FILES.keys(), 'snapshots'];
      if (node.kind === 'snapdir') return ['.', '..', ...snapshotFiles(device.listSnapshots()).keys()];
      throw fsError('ENOTDIR', `${path}: not a directory`);
    },

    async open(path, flags) {
      const node = resolve(path);
      const writable = (flags & O_ACCMODE) !== fsConstants.O_RDONLY;
      switch (node.kind) {
        case 'root':
        case 'snapdir':
          throw fsError('EISDIR', `${path}: is a directory`);
        case 'raw':
          if (writable && options.readOnly) throw readOnlyError(path);
          if (writable && (flags & fsConstants.O_TRUNC) !== 0) await resizeRaw(path, 0);
          return addHandle({ kind: 'raw', writable });
        case 'inspect': {
          if (writable) refuseModification(path, 'an inspection file');
          await trim();
          const snapshot = await ContentSnapshot.capture(node.generate(device), options.capture);
          generated.set(node.name, { size: snapshot.size, at: snapshot.generatedAt });
          return addHandle({ kind: 'content', name: node.name, snapshot });
        }
        case 'snapshot':
          if (writable) refuseModification(path, 'a snapshot view');
          return addHandle({ kind: 'snapshot', ref: node.ref, view: await openView(node.ref) });
      }
    },

    async release(path, fh) {
      await releaseHandle(fh, handle(path, fh));
    },

    async read(path, fh, length, position) {
      const h = handle(path, fh);
      switch (h.kind) {
        case 'raw': return readRaw(length, position);
        case 'content': return h.snapshot.read(position, length);
        case 'snapshot': {
          const end = Math.min(h.view.virtualSize, position + length);
          return position >= end ? Buffer.alloc(0) : h.view.read(position, end - position);
        }
      }
    },

    async write(path, fh, data, position) {
      const h = handle(path, fh);
      if (h.kind !== 'raw' || !h.writable) throw fsError('EBADF', `${path}: not open for writing`);
      return writeRaw(path, data, position);
    },

    async truncate(path, size) {
      const node = resolve(path);
      if (node.kind === 'raw') return resizeRaw(path, size);
      if (node.kind === 'root' || node.kind === 'snapdir') throw fsError('EISDIR', `${path}: is a directory`);
      refuseModification(path, node.kind === 'inspect' ? 'an inspection file' : 'a snapshot view');
    },

    async ftruncate(path, fh, size) {
      const h = handle(path, fh);
      if (h.kind !== 'raw' || !h.writable) throw fsError('EBADF', `${path}: not open for writing`);
      return resizeRaw(path, size);
    },

    async flush(path, fh) {
      handle(path, fh);
    },

    async fsync(path, _datasync, fh) {
      if (handle(path, fh).kind !== 'raw') return;
      await trim();
      await device.flush();
    },

    async fallocate(path, fh) {
      handle(path, fh);
      throw fsError('EOPNOTSUPP', `${path}: fallocate is not implemented yet`);
    },

    async lseek(path, fh) {
      handle(path, fh);
      throw fsError('EOPNOTSUPP', `${path}: lseek is not implemented yet`);
    },

    async statfs() {
      return toFsStat(await statVfs(options.statfsPath), options.readOnly);
    },

    async utimens(path, atime, mtime) {
      const node = resolve(path);
      if (node.kind !== 'raw') refuseModification(path, 'this entry');
      if (options.readOnly) throw readOnlyError(path);
      raw.atime = atime;
      raw.mtime = mtime;
      raw.ctime = new Date();
    },

    async refuse(op, path) {
      throw options.readOnly ? readOnlyError(path) : fsError('EPERM', `${path}: ${op} is not supported: the mount's entries are fixed`);
    },

    async dispose() {
      const open = [...handles.entries()];
      const results = await Promise.allSettled([trim(), ...open.map(([fh, h]) => releaseHandle(fh, h))]);
      const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed !== undefined) throw failed.reason;
    },

    openHandles() {
      return handles.size;
    },
  };
}
