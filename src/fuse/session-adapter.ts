/**
 * The session adapter: turns the requests of our own FUSE session (native/fuse_session.c, libfuse3's
 * low-level API) into calls of the path-based handlers of ops.ts, and their results into replies.
 *
 * - Inodes: the low-level API names files by inode number. Each path gets one number the first time
 *   the kernel sees it (lookup, readdir) and keeps it for the session's life (root is 1), so the
 *   kernel's forget needs no bookkeeping (the tree is a handful of fixed files).
 * - Every request is answered exactly once (requests.ts); errors become errnos from their `code`.
 * - Data: a read is answered straight from the Buffer the handler returned; a write's data is the
 *   session's own (a piece of a slab of small writes, a copy, or a receive buffer handed over whole:
 *   fuse_session.c), so the device may keep it.
 * - setattr carries truncate/ftruncate (size), utimens (times) and chmod/chown (refused).
 * - With the kernel's writeback cache, session-cache.ts's rules: generated files get an inode per
 *   size and direct_io, lseek waits for the kernel's write-back, compressed mounts drop pages.
 */
import { constants as osConstants } from 'node:os';
import { fuseSession, type FuseDispatch, type StatFields, type StatfsFields } from '../io/native.js';
import { fsError } from './errno.js';
import type { FileStat, FsHandlers, FsStat } from './ops.js';
import type { KernelCacheMode } from './options.js';
import { createRequestTracker, type RequestTracker, type TrackerOptions } from './requests.js';
import { KernelCacheRules, type KernelCache } from './session-cache.js';

export type { KernelCache } from './session-cache.js';

const OP = fuseSession.OP;
const ROOT_INO = 1;
const S_IFDIR = 0o040000;

/** FUSE_SET_ATTR_* bits of a setattr request. */
export const SET_ATTR = Object.freeze({ MODE: 1, UID: 2, GID: 4, SIZE: 8, ATIME: 16, MTIME: 32, ATIME_NOW: 128, MTIME_NOW: 256 });

export interface SessionAdapterOptions extends TrackerOptions {
  /** Seconds the kernel may cache attributes and name lookups. */
  attrTimeout: number;
  entryTimeout: number;
  /** How opened files are cached by the kernel (direct_io / keep_cache per open). */
  kernelCache: KernelCacheMode;
  /** The mount has the kernel's writeback cache (session-cache.ts); default false. */
  writebackCache?: boolean;
  /** With writebackCache: drop pages once written back or read (compressed mounts). */
  dropCachedData?: boolean;
  /** Path of the raw file ("/disk.raw"); needed with writebackCache. */
  rawPath?: string;
}

export interface SessionAdapter {
  /** The function the native session calls for every request. */
  dispatch: FuseDispatch;
  /** Requests received and not yet answered. */
  inFlight(): number;
  /** Resolves once no request is in flight. */
  drained(): Promise<void>;
  /** The mount's kernel cache (session.ts, with writeback_cache). */
  attachKernelCache(kernel: KernelCache): void;
}

/** Stable inode numbers for paths (and, for generated files, for each size a path is seen with). */
class InodeTable {
  private readonly byPath = new Map<string, number>([['/', ROOT_INO]]);
  private readonly byIno = new Map<number, string>([[ROOT_INO, '/']]);
  private readonly bySizedPath = new Map<string, number>();
  private next = ROOT_INO + 1;

  /** The inode of `path` at `size`: a new one the first time the path has that size, and the path's own from then on. */
  inodeAtSize(path: string, size: number): number {
    const key = `${size}:${path}`;
    let ino = this.bySizedPath.get(key);
    if (ino === undefined) {
      ino = this.next++;
      this.bySizedPath.set(key, ino);
      this.byIno.set(ino, path);
    }
    this.byPath.set(path, ino);
    return ino;
  }

  inodeOf(path: string): number {
    let ino = this.byPath.get(path);
    if (ino === undefined) {
      ino = this.next++;
      this.byPath.set(path, ino);
      this.byIno.set(ino, path);
    }
    return ino;
  }

  path(ino: number): string {
    const path = this.byIno.get(ino);
    if (path === undefined) throw fsError('ESTALE', `unknown inode ${ino}`);
    return path;
  }

  child(parentIno: number, name: string): string {
    const parent = this.path(parentIno);
    if (name === '' || name === '.' || name === '..' || name.includes('/')) throw fsError('ENOENT', `${parent}: no entry '${name}'`);
    return parent === '/' ? `/${name}` : `${parent}/${name}`;
  }

  parentOf(path: string): number {
    const slash = path.lastIndexOf('/');
    return this.inodeOf(slash <= 0 ? '/' : path.slice(0, slash));
  }
}

function statFields(ino: number, st: FileStat): StatFields {
  return [ino, st.mode, st.nlink, st.uid, st.gid, st.size, st.blocks, st.blksize, st.atime.getTime(), st.mtime.getTime(), st.ctime.getTime()];
}

function statfsFields(st: FsStat): StatfsFields {
  return [st.bsize, st.frsize, st.blocks, st.bfree, st.bavail, st.files, st.ffree, st.favail, st.fsid, st.flag, st.namemax];
}

const ERRNO = osConstants.errno as Readonly<Record<string, number>>;

/** A write's data: `bytes` bytes at `start` of the Buffer the session passed (a slab piece, or all of it). */
function writeData(buffer: Buffer, start: number, bytes: number): Buffer {
  return start === 0 && buffer.length === bytes ? buffer : buffer.subarray(start, start + bytes);
}

/** The reply functions the adapter answers with (the native session's; tests pass recorders). */
export type SessionReplies = Pick<typeof fuseSession, 'replyErr' | 'replyAttr' | 'replyEntry' | 'replyOpen' | 'replyData' | 'replyWrite' |
  'replyLseek' | 'replyStatfs' | 'replyDirents'>;

/** Build the session's dispatch over `handlers`. */
export function createSessionAdapter(handlers: FsHandlers, options: SessionAdapterOptions, replies: SessionReplies = fuseSession): SessionAdapter {
  const inodes = new InodeTable();
  const tracker: RequestTracker = createRequestTracker(options);
  const directIo = options.kernelCache === 'direct_io';
  const keepCache = options.kernelCache === 'kernel_cache';
  const cache = new KernelCacheRules({
    writebackCache: options.writebackCache ?? false, dropCachedData: options.dropCachedData ?? false, rawPath: options.rawPath ?? '',
  });
  const fail = (id: number) => (errno: number) => replies.replyErr(id, errno);
  const ok = (id: number) => () => replies.replyErr(id, 0);

  /** Run one request: `work` resolves to the reply's argument; errors answer their errno. */
  function serve<T>(op: string, id: number, path: () => string, detail: () => string, work: (path: string) => Promise<T>,
    reply: (result: T) => void): void {
    tracker.run(op, id, path, detail, work, reply, fail(id));
  }

  async function setattr(path: string, fh: number, valid: number, size: number, atimeMs: number, mtimeMs: number): Promise<FileStat> {
    if ((valid & SET_ATTR.MODE) !== 0) await handlers.refuse('chmod', path);
    if ((valid & (SET_ATTR.UID | SET_ATTR.GID)) !== 0) await handlers.refuse('chown', path);
    if ((valid & SET_ATTR.SIZE) !== 0) {
      if (fh !== 0) await handlers.ftruncate(path, fh, size);
      else await handlers.truncate(path, size);
    }
    if ((valid & (SET_ATTR.ATIME | SET_ATTR.MTIME)) !== 0) {
      const current = await handlers.getattr(path);
      const now = new Date();
      const time = (set: number, isNow: number, ms: number, keep: Date) =>
        (valid & isNow) !== 0 ? now : (valid & set) !== 0 ? new Date(ms) : keep;
      await handlers.utimens(path, time(SET_ATTR.ATIME, SET_ATTR.ATIME_NOW, atimeMs, current.atime),
        time(SET_ATTR.MTIME, SET_ATTR.MTIME_NOW, mtimeMs, current.mtime));
    }
    return handlers.getattr(path);
  }

  async function readdir(path: string): Promise<{ names: string[]; inos: number[]; modes: number[] }> {
    const names = await handlers.readdir(path);
    const self = inodes.inodeOf(path);
    const inos = names.map((name) => (name === '.' ? self : name === '..' ? inodes.parentOf(path) : inodes.inodeOf(inodes.child(self, name))));
    const modes = names.map((name) => (name === '.' || name === '..' ? S_IFDIR : 0));
    return { names, inos, modes };
  }

  /** A lookup's answer: generated files (writeback cache) get an inode per size and no entry caching. */
  function replyEntry(id: number, path: string, st: FileStat): void {
    const generated = cache.isGenerated(path, st.mode);
    const ino = generated ? inodes.inodeAtSize(path, st.size) : inodes.inodeOf(path);
    replies.replyEntry(id, generated ? 0 : options.entryTimeout, cache.attrTimeout(path, options.attrTimeout), ...statFields(ino, st));
  }

  async function opendir(path: string): Promise<void> {
    const st = await handlers.getattr(path);
    if ((st.mode & S_IFDIR) === 0) throw fsError('ENOTDIR', `${path}: not a directory`);
  }

  const refusals: ReadonlyMap<number, string> = new Map([
    [OP.CREATE, 'create'], [OP.MKNOD, 'mknod'], [OP.MKDIR, 'mkdir'], [OP.UNLINK, 'unlink'], [OP.RMDIR, 'rmdir'],
    [OP.SYMLINK, 'symlink'], [OP.RENAME, 'rename'], [OP.LINK, 'link'],
  ]);

  const dispatch: FuseDispatch = (op, id, ino, fh, n1, n2, n3, extra) => {
    const path = () => inodes.path(ino);
    const none = () => '';
    switch (op) {
      case OP.LOOKUP: {
        const child = () => inodes.child(ino, extra as string);
        return serve('lookup', id, child, none, (p) => handlers.getattr(p), (st) => replyEntry(id, child(), st));
      }
      case OP.GETATTR:
        return serve('getattr', id, path, none, (p) => handlers.getattr(p),
          (st) => replies.replyAttr(id, cache.attrTimeout(path(), options.attrTimeout), ...statFields(ino, st)));
      case OP.SETATTR:
        return serve('setattr', id, path, () => ` valid=0x${n1.toString(16)} size=${n2}`, (p) => setattr(p, fh, n1, n2, n3, extra as number),
          (st) => replies.replyAttr(id, cache.attrTimeout(path(), options.attrTimeout), ...statFields(ino, st)));
      case OP.OPEN:
        return serve('open', id, path, () => ` flags=0x${n1.toString(16)}`, (p) => handlers.open(p, n1),
          (newFh) => replies.replyOpen(id, newFh, directIo || cache.isGenerated(path()), keepCache));
      case OP.READ:
        return serve('read', id, path, () => ` fh=${fh} pos=${n2} len=${n1}`, (p) => handlers.read(p, fh, n1, n2), (data) => {
          const length = Math.min(data.length, n1);
          replies.replyData(id, data, length);
          cache.read(ino, n2, length);
        });
      case OP.WRITE:
        return serve('write', id, path, () => ` fh=${fh} pos=${n2} len=${n1}`, (p) => handlers.write(p, fh, writeData(extra as Buffer, n3, n1), n2), (written) => {
          replies.replyWrite(id, written);
          cache.written(ino, n2, written);
        });
      case OP.FLUSH:
        return serve('flush', id, path, () => ` fh=${fh}`, (p) => handlers.flush(p, fh), ok(id));
      case OP.RELEASE:
        return serve('release', id, path, () => ` fh=${fh}`, (p) => handlers.release(p, fh), () => {
          replies.replyErr(id, 0);
          cache.released(ino);
        });
      case OP.FSYNC:
        return serve('fsync', id, path, () => ` fh=${fh} datasync=${n1}`, (p) => handlers.fsync(p, n1 !== 0, fh), ok(id));
      case OP.OPENDIR:
        return serve('opendir', id, path, none, opendir, () => replies.replyOpen(id, 0, false, false));
      case OP.READDIR:
        return serve('readdir', id, path, () => ` off=${n2}`, readdir, (d) => replies.replyDirents(id, n1, n2, d.names, d.inos, d.modes));
      case OP.STATFS:
        return serve('statfs', id, () => '/', none, (p) => handlers.statfs(p), (st) => replies.replyStatfs(id, ...statfsFields(st)));
      case OP.FALLOCATE:
        return serve('fallocate', id, path, () => ` fh=${fh} mode=0x${n1.toString(16)} off=${n2} len=${n3}`,
          (p) => handlers.fallocate(p, fh, n1, n2, n3), ok(id));
      case OP.LSEEK:
        return serve('lseek', id, path, () => ` fh=${fh} off=${n1} whence=${n2}`, async (p) => {
          await cache.beforeSeek(p, n1);
          return handlers.lseek(p, fh, n1, n2);
        }, (offset) => replies.replyLseek(id, offset));
      default: {
        const refused = refusals.get(op);
        if (refused !== undefined) {
          return serve(refused, id, () => inodes.child(ino, extra as string), none, (p) => handlers.refuse(refused, p), ok(id));
        }
        replies.replyErr(id, ERRNO.ENOSYS);
      }
    }
  };

  return { dispatch, inFlight: () => tracker.inFlight(), drained: () => tracker.drained(), attachKernelCache: (kernel) => cache.attach(kernel) };
}
