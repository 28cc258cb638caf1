/**
 * Typed wrapper of the native addon (native/*.c): the only module that loads it.
 *
 * Every offset and length is a byte count carried as a safe integer (the addon rejects anything
 * else with a RangeError). Syscall failures reject/throw an Error with `code` = errno name
 * ('EOPNOTSUPP', 'EAGAIN' …), `errno` = negated errno (Node's convention) and `syscall`.
 * Buffers handed to an asynchronous call (compress, decompress) must not be modified until the
 * promise settles: the work runs on the libuv threadpool directly on their memory.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export type CompressionType = 'zlib' | 'zstd';
export type OfdLockType = 'read' | 'write';

/** A lock that would block the request, as F_OFD_GETLK reports it (pid is -1 for OFD locks). */
export interface OfdLockInfo {
  type: OfdLockType;
  start: number;
  len: number;
  pid: number;
}

/** O_DIRECT constraints of an open file: buffer address alignment and file offset/length alignment. */
export interface DioAlignment {
  memAlign: number;
  offsetAlign: number;
  /** 'statx' when the kernel reported it (STATX_DIOALIGN), 'fallback' (4096/4096) otherwise. */
  source: 'statx' | 'fallback';
}

/** The Error shape of a failed syscall in the addon. */
export interface NativeErrnoError extends Error {
  code: string;
  errno: number;
  syscall: string;
}

interface NativeAddon {
  alignedBuffer(bytes: number, alignment: number): Buffer;
  bufferAddressAlignment(view: ArrayBufferView): number;
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<void>;
  fadvise(fd: number, offset: number, length: number, advice: number): Promise<void>;
  ofdSetLock(fd: number, type: OfdLockType | 'unlock', start: number, len: number): void;
  ofdGetLock(fd: number, type: OfdLockType, start: number, len: number): OfdLockInfo | null;
  dioAlignment(fd: number): DioAlignment;
  compress(type: CompressionType, src: ArrayBufferView, maxOutBytes: number): Promise<Buffer | null>;
  decompress(type: CompressionType, src: ArrayBufferView, dst: ArrayBufferView): Promise<void>;
  decompressBatch(type: CompressionType, src: ArrayBufferView, dst: ArrayBufferView, spans: Uint32Array): Promise<Buffer | null>;
  aioCreate(capacity: number, outSlots: Int32Array, outResults: Float64Array, onComplete: (count: number) => void): AioHandle;
  aioSubmit(handle: AioHandle, slot: number, write: boolean, fd: number, view: ArrayBufferView, offset: number): void;
  threadIoCreate(nbThreads: number, capacity: number, outSlots: Int32Array, outResults: Float64Array,
    onComplete: (count: number) => void): ThreadIoHandle;
  threadIoSubmit(handle: ThreadIoHandle, slot: number, write: boolean, fd: number, view: ArrayBufferView, offset: number): void;
  preadNowait(fd: number, view: ArrayBufferView, offset: number): number;
  sessionMount(mountpoint: string, args: readonly string[], dispatch: FuseDispatch, onEvent: FuseSessionEvent,
    writebackCache: boolean): FuseSessionHandle;
  sessionClose(session: FuseSessionHandle): void;
  sessionNotifyInval(session: FuseSessionHandle, ino: number, offset: number, length: number): boolean;
  sessionWriteBack(session: FuseSessionHandle, path: string, offset: number, token: number): boolean;
  replyErr: (id: number, errno: number) => number;
  replyNone: (id: number) => void;
  replyAttr: (id: number, timeout: number, ...stat: StatFields) => number;
  replyEntry: (id: number, entryTimeout: number, attrTimeout: number, ...stat: StatFields) => number;
  replyOpen: (id: number, fh: number, directIo: boolean, keepCache: boolean) => number;
  replyData: (id: number, data: ArrayBufferView, length: number) => number;
  replyWrite: (id: number, count: number) => number;
  replyLseek: (id: number, offset: number) => number;
  replyStatfs: (id: number, ...fields: StatfsFields) => number;
  replyDirents: (id: number, size: number, offset: number, names: readonly string[], inos: readonly number[], modes: readonly number[]) => number;
  FUSE_OP: FuseOpCodes;
  FALLOC: { DEFAULT: number; KEEP_SIZE: number; PUNCH_HOLE: number; ZERO_RANGE: number };
  FADVISE: { NORMAL: number; RANDOM: number; SEQUENTIAL: number; WILLNEED: number; DONTNEED: number; NOREUSE: number };
}

/**
 * Events of a FUSE session: 'init' (the mount is live), 'exited' (detail: why), 'written-back' (a
 * sessionWriteBack with this token ended; errno 0 or the failure's errno).
 */
export type FuseSessionEvent = (kind: string, detail: string, token: number, errno: number) => void;

/** A FUSE session of the addon (opaque). */
export type FuseSessionHandle = { readonly __brand: 'FuseSessionHandle' };

/**
 * One request from the kernel: op (FUSE_OP), its request id (answer it exactly once with a reply
 * function), the inode, the file handle (0 when none) and the op's arguments (see FuseSession in
 * src/fuse/session.ts for what n1, n2, n3 and extra carry per op).
 */
export type FuseDispatch = (op: number, id: number, ino: number, fh: number, n1: number, n2: number, n3: number,
  extra: string | Buffer | number | undefined) => void;

/** ino, mode, nlink, uid, gid, size, blocks, blksize, atimeMs, mtimeMs, ctimeMs. */
export type StatFields = [number, number, number, number, number, number, number, number, number, number, number];
/** bsize, frsize, blocks, bfree, bavail, files, ffree, favail, fsid, flag, namemax. */
export type StatfsFields = [number, number, number, number, number, number, number, number, number, number, number];

export interface FuseOpCodes {
  LOOKUP: number; GETATTR: number; SETATTR: number; SYMLINK: number; MKNOD: number; MKDIR: number; UNLINK: number;
  RMDIR: number; RENAME: number; LINK: number; OPEN: number; READ: number; WRITE: number; STATFS: number;
  RELEASE: number; FSYNC: number; FLUSH: number; OPENDIR: number; READDIR: number; CREATE: number;
  FALLOCATE: number; LSEEK: number; MAX_WRITE_BYTES: number;
}

/** A Linux AIO context of the addon (opaque). */
export type AioHandle = { readonly __brand: 'AioHandle' };

/** A thread pool of the addon (opaque; native/threadio.c). */
export type ThreadIoHandle = { readonly __brand: 'ThreadIoHandle' };

const ADDON_FILE = 'qcow2fuse_native.node';

/**
 * The package root: the nearest ancestor of this module's directory holding the qcow2fuse
 * package.json (works from src/io/ under vitest and from dist/src/io/ when compiled).
 */
function findPackageRoot(startDir: string): string {
  let dir = startDir;
  for (;;) {
    const manifest = join(dir, 'package.json');
    if (existsSync(manifest)) {
      const parsed = JSON.parse(readFileSync(manifest, 'utf8')) as { name?: unknown };
      if (parsed.name === 'qcow2fuse') {
        return dir;
      }
    }
    const parent = dirname(dir);
    if (parent === dir) {
      throw new Error(`qcow2fuse: cannot find the package root above ${startDir}`);
    }
    dir = parent;
  }
}

/** Every export of the addon (the Record makes the compiler keep it complete), checked at load. */
const ADDON_EXPORTS: Record<keyof NativeAddon, true> = {
  alignedBuffer: true, bufferAddressAlignment: true, fallocate: true, fadvise: true, ofdSetLock: true, ofdGetLock: true,
  dioAlignment: true, compress: true, decompress: true, decompressBatch: true, aioCreate: true, aioSubmit: true,
  threadIoCreate: true, threadIoSubmit: true, preadNowait: true, sessionMount: true, sessionClose: true,
  sessionNotifyInval: true, sessionWriteBack: true, replyErr: true, replyNone: true, replyAttr: true, replyEntry: true,
  replyOpen: true, replyData: true, replyWrite: true, replyLseek: true, replyStatfs: true, replyDirents: true,
  FUSE_OP: true, FALLOC: true, FADVISE: true,
};

/** The exports this build needs that `loaded` (an addon's exports) lacks: non-empty for a stale build. */
export function missingAddonExports(loaded: object): string[] {
  return Object.keys(ADDON_EXPORTS).filter((name) => !(name in loaded));
}

/** Load the addon built in native/build; a missing or out-of-date build is a clear error. */
function loadAddon(): NativeAddon {
  const root = findPackageRoot(dirname(fileURLToPath(import.meta.url)));
  const candidates = ['Release', 'Debug'].map((kind) => join(root, 'native', 'build', kind, ADDON_FILE));
  const found = candidates.find((path) => existsSync(path));
  if (found === undefined) {
    throw new Error(`qcow2fuse: native addon not built (looked for ${candidates.join(', ')}); ` +
      'run `npm run install` (node-gyp rebuild --directory native)');
  }
  const require = createRequire(import.meta.url);
  const loaded = require(found) as object;
  const missing = missingAddonExports(loaded);
  if (missing.length > 0) {
    throw new Error(`qcow2fuse: the native addon at ${found} is older than this build (it lacks ${missing.join(', ')}); ` +
      'run `npm run install` (node-gyp rebuild --directory native)');
  }
  return loaded as NativeAddon;
}

const addon: NativeAddon = loadAddon();

/** fallocate(2) modes. */
export const FALLOC = Object.freeze({
  DEFAULT: addon.FALLOC.DEFAULT,
  KEEP_SIZE: addon.FALLOC.KEEP_SIZE,
  ZERO_RANGE: addon.FALLOC.ZERO_RANGE,
  ZERO_RANGE_KEEP_SIZE: addon.FALLOC.ZERO_RANGE + addon.FALLOC.KEEP_SIZE,
  PUNCH_HOLE_KEEP_SIZE: addon.FALLOC.PUNCH_HOLE + addon.FALLOC.KEEP_SIZE,
});

/** posix_fadvise(2) advice values. */
export const FADVISE = Object.freeze({ ...addon.FADVISE });

/**
 * A zero-filled Buffer of `bytes` whose memory starts at a multiple of `alignment` (a power of two).
 * The memory is freed by a finalizer after the Buffer is collected; Node runs finalizers from the
 * event loop, so code allocating many in a loop must yield (or reuse buffers, see AlignedBufferPool).
 */
export function alignedBuffer(bytes: number, alignment: number): Buffer {
  return addon.alignedBuffer(bytes, alignment);
}

/** Largest power of two (at most 2^30) that divides the address of the view's first byte. */
export function bufferAddressAlignment(view: ArrayBufferView): number {
  return addon.bufferAddressAlignment(view);
}

/** fallocate(2) on the threadpool; `mode` is one of FALLOC. */
export function fallocate(fd: number, mode: number, offset: number, length: number): Promise<void> {
  return addon.fallocate(fd, mode, offset, length);
}

/** posix_fadvise(2) on the threadpool; `advice` is one of FADVISE. length 0 = to the end of file. */
export function fadvise(fd: number, offset: number, length: number, advice: number): Promise<void> {
  return addon.fadvise(fd, offset, length, advice);
}

/**
 * Take ('read'/'write') or release ('unlock') an OFD byte-range lock without waiting
 * (F_OFD_SETLK). Throws a NativeErrnoError with code EAGAIN (or EACCES) on conflict.
 */
export function ofdSetLock(fd: number, type: OfdLockType | 'unlock', start: number, len: number): void {
  addon.ofdSetLock(fd, type, start, len);
}

/**
 * F_OFD_GETLK: the lock held through another open file description that would conflict with
 * taking `type` on [start, start+len), or null when none would.
 */
export function ofdGetLock(fd: number, type: OfdLockType, start: number, len: number): OfdLockInfo | null {
  return addon.ofdGetLock(fd, type, start, len);
}

/** O_DIRECT alignment of the open file (statx STATX_DIOALIGN, else 4096/4096). */
export function dioAlignment(fd: number): DioAlignment {
  return addon.dioAlignment(fd);
}

/**
 * Compress `src` as QEMU's qcow2 does (zlib: raw deflate, 12-bit window, memLevel 9, default
 * level; zstd: one ZSTD_e_end stream at default level). Resolves null when the result would not
 * fit in `maxOutBytes`.
 */
export function compress(type: CompressionType, src: ArrayBufferView, maxOutBytes: number): Promise<Buffer | null> {
  return addon.compress(type, src, maxOutBytes);
}

/**
 * Decompress `src` into all of `dst` as QEMU's qcow2 does; bytes after the stream are ignored.
 * Rejects with code 'EBADCOMPRESSED' when the data cannot produce exactly dst.byteLength bytes.
 */
export function decompress(type: CompressionType, src: ArrayBufferView, dst: ArrayBufferView): Promise<void> {
  return addon.decompress(type, src, dst);
}

/**
 * Decompress several chunks in one threadpool job: chunk i is src[spans[4i], +spans[4i+1]) and fills
 * exactly dst[spans[4i+2], +spans[4i+3]) (each as `decompress`). Resolves null when every chunk
 * decoded, else a Buffer with one byte per chunk: 0 decoded, non-zero bad data (that part of dst is
 * undefined). Rejects (ENOMEM) only when a codec context cannot be allocated.
 */
export function decompressBatch(type: CompressionType, src: ArrayBufferView, dst: ArrayBufferView, spans: Uint32Array): Promise<Buffer | null> {
  return addon.decompressBatch(type, src, dst, spans);
}

/**
 * A Linux native AIO context on the event loop with `capacity` request slots. Completions are
 * written into outSlots[i] (the slot) and outResults[i] (bytes transferred, or -errno) for
 * i < count, then onComplete(count) is called; it must read them before returning. Throws the
 * io_setup/eventfd error (ENOSYS, EAGAIN when fs.aio-max-nr is used up) when the kernel cannot.
 */
export function aioCreate(capacity: number, outSlots: Int32Array, outResults: Float64Array, onComplete: (count: number) => void): AioHandle {
  return addon.aioCreate(capacity, outSlots, outResults, onComplete);
}

/**
 * Queue a pread (write=false) or pwrite of all of `view` at `offset` on `fd` in free slot `slot`;
 * the kernel gets it before the event loop next waits. fd must be open with O_DIRECT (AIO is
 * synchronous otherwise) and view, offset and length aligned for it; view must stay alive and
 * untouched until the slot's completion.
 */
export function aioSubmit(handle: AioHandle, slot: number, write: boolean, fd: number, view: ArrayBufferView, offset: number): void {
  addon.aioSubmit(handle, slot, write, fd, view, offset);
}

/**
 * A pool of `nbThreads` threads of our own doing pread/pwrite, with `capacity` request slots;
 * completions are reported as aioCreate's. Throws the pthread_create/eventfd error when it cannot start.
 */
export function threadIoCreate(nbThreads: number, capacity: number, outSlots: Int32Array, outResults: Float64Array,
  onComplete: (count: number) => void): ThreadIoHandle {
  return addon.threadIoCreate(nbThreads, capacity, outSlots, outResults, onComplete);
}

/**
 * Queue one pread (write=false) or pwrite of `view` at `offset` on `fd` in free slot `slot`; a pool
 * thread runs it. view must stay alive and untouched until the slot's completion.
 */
export function threadIoSubmit(handle: ThreadIoHandle, slot: number, write: boolean, fd: number, view: ArrayBufferView, offset: number): void {
  addon.threadIoSubmit(handle, slot, write, fd, view, offset);
}

/**
 * One preadv2(RWF_NOWAIT) on the calling thread: bytes read (short where the rest is not cached,
 * or at end of file) or -errno (-EAGAIN: nothing of it is in the page cache).
 */
export function preadNowait(fd: number, view: ArrayBufferView, offset: number): number {
  return addon.preadNowait(fd, view, offset);
}

/** True for an Error raised by a failed syscall in the addon (or Node's fs, which has the same shape). */
export function isErrnoError(error: unknown): error is NativeErrnoError {
  return error instanceof Error && typeof (error as Partial<NativeErrnoError>).code === 'string' &&
    typeof (error as Partial<NativeErrnoError>).errno === 'number';
}

/** The string `code` of an Error (errno name for syscall failures), or undefined. */
export function errorCodeOf(error: unknown): string | undefined {
  if (error instanceof Error) {
    const code: unknown = (error as { code?: unknown }).code;
    return typeof code === 'string' ? code : undefined;
  }
  return undefined;
}

/**
 * The FUSE session binding (native/fuse_session.c): libfuse3's low-level API served on this thread's
 * event loop. Used by src/fuse/session.ts only.
 */
export const fuseSession = Object.freeze({
  mount: (mountpoint: string, args: readonly string[], dispatch: FuseDispatch, onEvent: FuseSessionEvent,
    writebackCache = false) => addon.sessionMount(mountpoint, args, dispatch, onEvent, writebackCache),
  close: (session: FuseSessionHandle) => addon.sessionClose(session),
  /** (writeback_cache) Drop the kernel's cached pages of `ino` in a range, from the session's kernel thread. */
  notifyInval: (session: FuseSessionHandle, ino: number, offset: number, length: number) => addon.sessionNotifyInval(session, ino, offset, length),
  /** (writeback_cache) Have the kernel write its dirty pages of `path` from `offset` on back; 'written-back' follows. */
  writeBack: (session: FuseSessionHandle, path: string, offset: number, token: number) => addon.sessionWriteBack(session, path, offset, token),
  replyErr: addon.replyErr,
  replyNone: addon.replyNone,
  replyAttr: addon.replyAttr,
  replyEntry: addon.replyEntry,
  replyOpen: addon.replyOpen,
  replyData: addon.replyData,
  replyWrite: addon.replyWrite,
  replyLseek: addon.replyLseek,
  replyStatfs: addon.replyStatfs,
  replyDirents: addon.replyDirents,
  OP: Object.freeze({ ...addon.FUSE_OP }),
});
