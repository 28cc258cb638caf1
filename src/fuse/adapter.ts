/**
 * The fuse-native adapter (`-o transport=fuse-native`): turns the async handlers of ops.ts into
 * fuse-native's callback operations. (The default transport's adapter is session-adapter.ts.)
 *
 * - Every request is answered exactly once (requests.ts): a second answer is dropped and traced; a
 *   handler that throws synchronously is caught too (fuse-native does not catch, and an unanswered
 *   request hangs the caller in the kernel).
 * - Errors become negative errnos from their `code` (errno.ts); unknown errors answer -EIO.
 * - libfuse 2 has no fallocate nor lseek: the kernel answers fallocate EOPNOTSUPP itself, and SEEK_DATA /
 *   SEEK_HOLE with its generic answer (all data, one hole at the end).
 * - fuse-native's read/write buffers point into the kernel request and are detached once answered:
 *   read results are copied into them, written data is copied out of them before the handler runs,
 *   so the device may keep what it is given.
 * - `DEBUG=qcow2fuse:fuse` traces every operation with its arguments, answer and latency.
 */
import type { FileStat, FsHandlers, FsStat } from './ops.js';
import { createRequestTracker, type TrackerOptions } from './requests.js';

type Done = (code: number) => void;
type DoneWith<T> = (code: number, value?: T) => void;

/** The operations object fuse-native calls (its callback conventions: read/write answer a byte count or -errno). */
export interface FuseNativeOps {
  getattr(path: string, cb: DoneWith<FileStat>): void;
  readdir(path: string, cb: DoneWith<string[]>): void;
  open(path: string, flags: number, cb: DoneWith<number>): void;
  create(path: string, mode: number, cb: DoneWith<number>): void;
  release(path: string, fh: number, cb: Done): void;
  read(path: string, fh: number, buf: Buffer, length: number, position: number, cb: Done): void;
  write(path: string, fh: number, buf: Buffer, length: number, position: number, cb: Done): void;
  truncate(path: string, size: number, cb: Done): void;
  ftruncate(path: string, fh: number, size: number, cb: Done): void;
  flush(path: string, fh: number, cb: Done): void;
  fsync(path: string, datasync: number, fh: number, cb: Done): void;
  statfs(path: string, cb: DoneWith<FsStat>): void;
  utimens(path: string, atime: number, mtime: number, cb: Done): void;
  unlink(path: string, cb: Done): void;
  rmdir(path: string, cb: Done): void;
  mkdir(path: string, mode: number, cb: Done): void;
  rename(src: string, dest: string, cb: Done): void;
  link(src: string, dest: string, cb: Done): void;
  symlink(src: string, dest: string, cb: Done): void;
  mknod(path: string, mode: number, dev: number, cb: Done): void;
  chmod(path: string, mode: number, cb: Done): void;
  chown(path: string, uid: number, gid: number, cb: Done): void;
}

export type AdapterOptions = TrackerOptions;

export interface FuseAdapter {
  ops: FuseNativeOps;
  /** Requests received and not yet answered. */
  inFlight(): number;
  /** Resolves once no request is in flight. */
  drained(): Promise<void>;
}

/**
 * fuse-native turns utimens' timespecs into milliseconds, which maps UTIME_NOW and UTIME_OMIT
 * (nanosecond fields near 2^30) to about 1073 ms after the epoch: read those as "now".
 */
function utimeToDate(ms: number): Date {
  return ms < 2000 ? new Date() : new Date(ms);
}

/** Build fuse-native operations over `handlers`. */
export function createFuseAdapter(handlers: FsHandlers, options: AdapterOptions = {}): FuseAdapter {
  const tracker = createRequestTracker(options);

  /**
   * Run `work` for one request and answer it exactly once through fuse-native's callback: `ok(result)`
   * gives the code (and value) to answer with; a throw or rejection answers the error's -errno.
   */
  function answer<T, V>(op: string, path: string, detail: () => string, reply: (code: number, value?: V) => void,
    work: () => Promise<T>, ok: (result: T) => [number, V?]): void {
    tracker.run(op, 0, () => path, detail, work, (result) => {
      const [code, value] = ok(result);
      if (value === undefined) reply(code);
      else reply(code, value);
    }, (errno) => reply(-errno));
  }

  const none = () => '';
  const zero = (): [number] => [0];
  const refusal = (op: string) => (path: string, ...rest: unknown[]) => {
    const cb = rest[rest.length - 1] as Done;
    answer(op, path, none, cb, () => handlers.refuse(op, path), zero);
  };

  const ops: FuseNativeOps = {
    getattr: (path, cb) => answer('getattr', path, none, cb, () => handlers.getattr(path), (st) => [0, st]),
    readdir: (path, cb) => answer('readdir', path, none, cb, () => handlers.readdir(path), (names) => [0, names]),
    open: (path, flags, cb) => answer('open', path, () => ` flags=0x${flags.toString(16)}`, cb,
      () => handlers.open(path, flags), (fh) => [0, fh]),
    create: (path, _mode, cb) => answer('create', path, none, cb, () => handlers.refuse('create', path), zero),
    release: (path, fh, cb) => answer('release', path, () => ` fh=${fh}`, cb, () => handlers.release(path, fh), zero),
    read: (path, fh, buf, length, position, cb) => answer('read', path, () => ` fh=${fh} pos=${position} len=${length}`, cb,
      () => handlers.read(path, fh, length, position), (data) => [data.copy(buf, 0, 0, Math.min(data.length, length, buf.length))]),
    write: (path, fh, buf, length, position, cb) => {
      const data = Buffer.from(buf.subarray(0, length));
      answer('write', path, () => ` fh=${fh} pos=${position} len=${length}`, cb,
        () => handlers.write(path, fh, data, position), (written) => [written]);
    },
    truncate: (path, size, cb) => answer('truncate', path, () => ` size=${size}`, cb, () => handlers.truncate(path, size), zero),
    ftruncate: (path, fh, size, cb) => answer('ftruncate', path, () => ` fh=${fh} size=${size}`, cb,
      () => handlers.ftruncate(path, fh, size), zero),
    flush: (path, fh, cb) => answer('flush', path, () => ` fh=${fh}`, cb, () => handlers.flush(path, fh), zero),
    fsync: (path, datasync, fh, cb) => answer('fsync', path, () => ` fh=${fh} datasync=${datasync}`, cb,
      () => handlers.fsync(path, datasync !== 0, fh), zero),
    statfs: (path, cb) => answer('statfs', path, none, cb, () => handlers.statfs(path), (st) => [0, st]),
    utimens: (path, atime, mtime, cb) => answer('utimens', path, () => ` atime=${atime} mtime=${mtime}`, cb,
      () => handlers.utimens(path, utimeToDate(atime), utimeToDate(mtime)), zero),
    unlink: refusal('unlink'),
    rmdir: refusal('rmdir'),
    mkdir: refusal('mkdir'),
    rename: refusal('rename'),
    link: refusal('link'),
    symlink: refusal('symlink'),
    mknod: refusal('mknod'),
    chmod: refusal('chmod'),
    chown: refusal('chown'),
  };

  return { ops, inFlight: () => tracker.inFlight(), drained: () => tracker.drained() };
}
