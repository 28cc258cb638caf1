/**
 * The ops factory: the mount's file tree and what every FUSE operation does to the image.
 *
 *   /                      directory
 *   /disk.raw              the guest contents (name from -o name=): read/write/truncate/fsync/fallocate/lseek
 *   /info.json /map.json /layout.txt /check.json   read-only, generated from the live image (inspect.ts)
 *   /snapshots/            directory of /snapshots/NAME.raw, read-only views of internal snapshots
 *
 * Handlers are plain async functions (path, fh, …) → result that throw coded errors; the adapters turn
 * them into FUSE replies and errnos. Nothing here touches FUSE, so every rule is unit-tested by calling
 * the handlers directly.
 *
 * disk.raw behaves like a regular file (raw-file.ts: logical size vs image size, growth ahead, nogrow,
 * fallocate modes, SEEK_DATA/SEEK_HOLE): st_size is the file's exact size, st_blocks the host bytes the
 * image allocates / 512. Writes past the end grow the image, truncate (and O_TRUNC) resize it, so `cp
 * SRC disk.raw` leaves an image equal to SRC. On a read-only mount every modification fails EROFS.
 * FUSE `flush` (each close(2)) does nothing: durability is fsync's (and unmount's) job, as on any
 * filesystem.
 *
 * The other files refuse modification as read-only files do: EACCES for an open for writing,
 * truncate or utimens (EROFS on a read-only mount). fallocate on them answers EBADF, what the kernel
 * answers for a file opened read-only (they cannot be opened otherwise) — EROFS on snapshot views,
 * which are read-only images, and on read-only mounts. SEEK_DATA/SEEK_HOLE work on every file: an
 * inspection file is all data; a snapshot view answers from the snapshot's own L1 table.
 */
import { constants as fsConstants } from 'node:fs';
import { createRequire } from 'node:module';
import type { InspectableDevice, SeekableDevice, SnapshotSummary } from '../qcow2/engine/block-device.js';
import { fsError } from './errno.js';
import { INSPECTION_FILES, InspectionCache, type AcquiredContent, type CaptureOptions } from './inspect.js';
import { RawFile, seekWithin } from './raw-file.js';

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

const BLKSIZE = 131072;
/** Access-mode bits of open(2) flags (not in Node's fs.constants). */
const O_ACCMODE = 3;
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;

type Node =
  | { kind: 'root' }
  | { kind: 'raw' }
  | { kind: 'inspect'; name: string }
  | { kind: 'snapdir' }
  | { kind: 'snapshot'; file: string; ref: string; summary: SnapshotSummary };

type Handle =
  | { kind: 'raw'; writable: boolean }
  | { kind: 'content'; name: string; content: AcquiredContent }
  | { kind: 'snapshot'; ref: string; view: SeekableDevice };

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

/** Read-only views of internal snapshots, opened once and shared by every handle on the same snapshot. */
class SnapshotViews {
  private readonly views = new Map<string, { refs: number; opening: Promise<SeekableDevice> }>();

  constructor(private readonly device: InspectableDevice) {}

  async open(ref: string): Promise<SeekableDevice> {
    let view = this.views.get(ref);
    if (view === undefined) {
      const created = { refs: 0, opening: this.device.openSnapshot(ref) };
      created.opening.catch(() => this.views.delete(ref));
      this.views.set(ref, created);
      view = created;
    }
    view.refs++;
    try {
      return await view.opening;
    } catch (err) {
      view.refs--;
      throw err;
    }
  }

  async close(ref: string): Promise<void> {
    const view = this.views.get(ref);
    if (view === undefined || --view.refs > 0) return;
    this.views.delete(ref);
    await (await view.opening).close();
  }
}

/** The handlers of one mount (see the module comment); createHandlers is its public face. */
class MountOps implements FsHandlers {
  private readonly statVfs: StatVfs;
  private readonly mountedAt = new Date();
  private readonly raw: RawFile;
  private readonly inspection: InspectionCache;
  private readonly views: SnapshotViews;
  private readonly handles = new Map<number, Handle>();
  private nextFh = 1;

  constructor(private readonly device: InspectableDevice, private readonly options: OpsOptions) {
    this.statVfs = options.statVfs ?? fsExtStatVfs;
    this.raw = new RawFile(device, { readOnly: options.readOnly, nogrow: options.nogrow }, this.mountedAt);
    this.inspection = new InspectionCache(device, options.capture, () => this.raw.trim());
    this.views = new SnapshotViews(device);
  }

  async getattr(path: string): Promise<FileStat> {
    const node = this.resolve(path);
    const dirTimes = { atime: this.mountedAt, mtime: this.mountedAt, ctime: this.mountedAt };
    switch (node.kind) {
      case 'root': return this.stat(S_IFDIR | 0o755, 4096, 0, dirTimes, 3);
      case 'snapdir': return this.stat(S_IFDIR | 0o755, 4096, 0, dirTimes, 2);
      case 'raw': {
        const allocated = await this.raw.allocatedBytes();
        return this.stat(S_IFREG | (this.options.readOnly ? 0o444 : 0o644), this.raw.size, Math.ceil(allocated / 512), this.raw.times);
      }
      case 'inspect': {
        const { size, at } = await this.inspection.stat(node.name, this.raw.generation);
        return this.stat(S_IFREG | 0o444, size, Math.ceil(size / 512), { atime: at, mtime: at, ctime: at });
      }
      case 'snapshot': return this.stat(S_IFREG | 0o444, node.summary.virtualSize, 0, dirTimes);
    }
  }

  async readdir(path: string): Promise<string[]> {
    const node = this.resolve(path);
    if (node.kind === 'root') return ['.', '..', this.options.rawName, ...INSPECTION_FILES.keys(), 'snapshots'];
    if (node.kind === 'snapdir') return ['.', '..', ...snapshotFiles(this.device.listSnapshots()).keys()];
    throw fsError('ENOTDIR', `${path}: not a directory`);
  }

  async open(path: string, flags: number): Promise<number> {
    const node = this.resolve(path);
    const writable = (flags & O_ACCMODE) !== fsConstants.O_RDONLY;
    switch (node.kind) {
      case 'root':
      case 'snapdir':
        throw fsError('EISDIR', `${path}: is a directory`);
      case 'raw':
        if (writable && this.options.readOnly) throw this.readOnlyError(path);
        if (writable && (flags & fsConstants.O_TRUNC) !== 0) await this.raw.resize(path, 0);
        return this.addHandle({ kind: 'raw', writable });
      case 'inspect':
        if (writable) this.refuseModification(path, 'an inspection file');
        return this.addHandle({ kind: 'content', name: node.name, content: await this.inspection.acquire(node.name, this.raw.generation) });
      case 'snapshot':
        if (writable) this.refuseModification(path, 'a snapshot view');
        return this.addHandle({ kind: 'snapshot', ref: node.ref, view: await this.views.open(node.ref) });
    }
  }

  async release(path: string, fh: number): Promise<void> {
    await this.releaseHandle(fh, this.handle(path, fh));
  }

  async read(path: string, fh: number, length: number, position: number): Promise<Buffer> {
    const h = this.handle(path, fh);
    switch (h.kind) {
      case 'raw': return this.raw.read(length, position);
      case 'content': return h.content.snapshot.read(position, length);
      case 'snapshot': {
        const end = Math.min(h.view.virtualSize, position + length);
        return position >= end ? Buffer.alloc(0) : h.view.read(position, end - position);
      }
    }
  }

  async write(path: string, fh: number, data: Buffer, position: number): Promise<number> {
    this.assertWritableRaw(path, fh);
    return this.raw.write(path, data, position);
  }

  async truncate(path: string, size: number): Promise<void> {
    const node = this.resolve(path);
    if (node.kind === 'raw') return this.raw.resize(path, size);
    if (node.kind === 'root' || node.kind === 'snapdir') throw fsError('EISDIR', `${path}: is a directory`);
    this.refuseModification(path, node.kind === 'inspect' ? 'an inspection file' : 'a snapshot view');
  }

  async ftruncate(path: string, fh: number, size: number): Promise<void> {
    this.assertWritableRaw(path, fh);
    return this.raw.resize(path, size);
  }

  async flush(path: string, fh: number): Promise<void> {
    this.handle(path, fh);
  }

  async fsync(path: string, _datasync: boolean, fh: number): Promise<void> {
    if (this.handle(path, fh).kind !== 'raw') return;
    await this.raw.trim();
    await this.device.flush();
  }

  async fallocate(path: string, fh: number, mode: number, offset: number, length: number): Promise<void> {
    const h = this.handle(path, fh);
    if (this.options.readOnly) throw this.readOnlyError(path);
    if (h.kind === 'snapshot') throw fsError('EROFS', `${path}: a snapshot view is read-only`);
    this.assertWritableRaw(path, fh);
    await this.raw.fallocate(path, mode, offset, length);
  }

  async lseek(path: string, fh: number, offset: number, whence: number): Promise<number> {
    const h = this.handle(path, fh);
    switch (h.kind) {
      case 'raw': return this.raw.seek(path, offset, whence);
      case 'content': return seekWithin(path, h.content.snapshot.size, offset, whence, async (at, target) => (target === 'data' ? at : undefined));
      case 'snapshot': return seekWithin(path, h.view.virtualSize, offset, whence, (at, target) => h.view.seek(at, target));
    }
  }

  async statfs(_path: string): Promise<FsStat> {
    return toFsStat(await this.statVfs(this.options.statfsPath), this.options.readOnly);
  }

  async utimens(path: string, atime: Date, mtime: Date): Promise<void> {
    const node = this.resolve(path);
    if (node.kind !== 'raw') this.refuseModification(path, 'this entry');
    if (this.options.readOnly) throw this.readOnlyError(path);
    this.raw.setTimes(atime, mtime);
  }

  async refuse(op: string, path: string): Promise<never> {
    throw this.options.readOnly ? this.readOnlyError(path) : fsError('EPERM', `${path}: ${op} is not supported: the mount's entries are fixed`);
  }

  async dispose(): Promise<void> {
    const open = [...this.handles.entries()];
    const results = await Promise.allSettled([this.raw.trim(), ...open.map(([fh, h]) => this.releaseHandle(fh, h)), this.inspection.dispose()]);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed !== undefined) throw failed.reason;
  }

  openHandles(): number {
    return this.handles.size;
  }

  private resolve(path: string): Node {
    if (path === '/') return { kind: 'root' };
    if (path === `/${this.options.rawName}`) return { kind: 'raw' };
    if (path === '/snapshots') return { kind: 'snapdir' };
    if (INSPECTION_FILES.has(path.slice(1)) && path.lastIndexOf('/') === 0) return { kind: 'inspect', name: path.slice(1) };
    if (path.startsWith('/snapshots/')) {
      const file = path.slice('/snapshots/'.length);
      const entry = snapshotFiles(this.device.listSnapshots()).get(file);
      if (entry !== undefined) return { kind: 'snapshot', file, ...entry };
    }
    throw fsError('ENOENT', `${path}: no such file`);
  }

  private handle(path: string, fh: number): Handle {
    const found = this.handles.get(fh);
    if (found === undefined) throw fsError('EBADF', `${path}: unknown file handle ${fh}`);
    return found;
  }

  /** EBADF unless `fh` is disk.raw open for writing. */
  private assertWritableRaw(path: string, fh: number): void {
    const h = this.handle(path, fh);
    if (h.kind !== 'raw' || !h.writable) throw fsError('EBADF', `${path}: not open for writing`);
  }

  private addHandle(h: Handle): number {
    while (this.handles.has(this.nextFh) || this.nextFh === 0) this.nextFh = (this.nextFh + 1) % 0x1_0000_0000;
    const fh = this.nextFh;
    this.handles.set(fh, h);
    this.nextFh = (this.nextFh + 1) % 0x1_0000_0000;
    return fh;
  }

  private async releaseHandle(fh: number, h: Handle): Promise<void> {
    this.handles.delete(fh);
    if (h.kind === 'content') await h.content.release();
    else if (h.kind === 'snapshot') await this.views.close(h.ref);
  }

  private stat(mode: number, size: number, blocks: number, times: { atime: Date; mtime: Date; ctime: Date }, nlink = 1): FileStat {
    return { mode, uid: this.options.uid, gid: this.options.gid, size, blocks, blksize: BLKSIZE, nlink, ...times };
  }

  private readOnlyError(path: string) {
    return fsError('EROFS', `${path}: the mount is read-only`);
  }

  private refuseModification(path: string, what: string): never {
    throw this.options.readOnly ? this.readOnlyError(path) : fsError('EACCES', `${path}: ${what} is read-only`);
  }
}

/** Build the handlers for `device` (which stays owned by the caller: close it after dispose()). */
export function createHandlers(device: InspectableDevice, options: OpsOptions): FsHandlers {
  return new MountOps(device, options);
}
