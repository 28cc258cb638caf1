/**
 * Mounting an image: fuse-native with our options, and the lifecycle from open to close.
 *
 * Qcow2Fuse subclasses fuse-native's Fuse to add libfuse options it has no setting for (big_writes,
 * max_write, attr_timeout=0 …: options.ts) and to switch its 15 s per-request watchdog off for every
 * operation that may legitimately take long (data I/O, fsync, resize, generating an inspection file).
 *
 * MountSession owns one mounted image: start() opens the device (through an injectable opener, so
 * tests can mount a memory device), checks the mountpoint, mounts, and polls the mount table, because
 * fuse-native does not notice an external `umount`/`fusermount -u`. However the mount ends — stop()
 * (signals, the unmount command) or an external unmount — the session unmounts if still mounted,
 * waits for in-flight requests, releases open handles and closes (flushes and unlocks) the device;
 * `closed` settles when that is done.
 */
import { readdir, realpath, stat, writeFile } from 'node:fs/promises';
import { execFile } from 'node:child_process';
import { createRequire } from 'node:module';
import { dirname, resolve } from 'node:path';
import createDebug from 'debug';
import type { InspectableDevice } from '../qcow2/engine/block-device.js';
import { CodedError } from '../io/errors.js';
import { createFuseAdapter, type FuseAdapter, type FuseNativeOps } from './adapter.js';
import { errnoName } from './errno.js';
import type { CaptureOptions } from './inspect.js';
import { FS_TYPE, findMount, isMountPresent, readMounts } from './mountinfo.js';
import { createHandlers, type FsHandlers } from './ops.js';
import { deviceOpenOptions, libfuseOptions, type DeviceOpenOptions, type MountOptions } from './options.js';

/** Opens the image a mount serves (Qcow2Image.open in the CLI, a memory device in tests). */
export type DeviceOpener = (imagePath: string, options: DeviceOpenOptions) => Promise<InspectableDevice>;

/** A mount that could not be made or unmade, with a message meant for the user. */
export class MountError extends CodedError {
  constructor(code: string, message: string, details: Record<string, unknown> = {}, cause?: unknown) {
    super(code, message, details, cause === undefined ? undefined : { cause });
  }
}

/**
 * fuse-native's per-operation watchdog: it answers ETIMEDOUT after 15 s. Off for everything that can
 * legitimately take long (a flush of a large writeback cache, a resize, a check of a huge image, and
 * getattr, whose st_blocks waits for the image's metadata lock); kept for the rest, where a hang is a bug.
 */
export const WATCHDOG: Readonly<Record<string, number | false>> = {
  default: 15_000, read: false, write: false, flush: false, fsync: false, truncate: false, ftruncate: false,
  open: false, release: false, getattr: false,
};

const trace = createDebug('qcow2fuse:mount');

/** libfuse's own request trace (its `debug` option) is on when DEBUG names this namespace. */
const LIBFUSE_DEBUG = 'qcow2fuse:libfuse';

interface FuseInstance {
  readonly mnt: string;
  _thread: Buffer | null;
  mount(cb: (err?: Error | null) => void): void;
  _fuseOptions(): string;
}
type FuseConstructor = new (mnt: string, ops: object, opts: Record<string, unknown>) => FuseInstance;
interface FuseBinding {
  fuse_native_unmount(mnt: string, thread: Buffer): void;
}

let fuseNative: { Qcow2Fuse: new (mnt: string, ops: FuseNativeOps, options: readonly string[]) => FuseInstance; binding: FuseBinding } | undefined;

/** Load fuse-native (and libfuse) on first use, so importing this module needs neither. */
function loadFuseNative(): NonNullable<typeof fuseNative> {
  if (fuseNative !== undefined) return fuseNative;
  const require = createRequire(import.meta.url);
  const Fuse = require('fuse-native') as FuseConstructor;
  const binding = (require('node-gyp-build') as (dir: string) => FuseBinding)(dirname(require.resolve('fuse-native/package.json')));

  /**
   * fuse-native's Fuse with our libfuse options instead of its own (it has no setting for most of
   * them, and turns libfuse's debug output on for any DEBUG containing '*').
   */
  class Qcow2Fuse extends Fuse {
    private readonly libfuseOptions: readonly string[];

    constructor(mnt: string, ops: FuseNativeOps, options: readonly string[]) {
      super(mnt, ops, { timeout: WATCHDOG });
      this.libfuseOptions = options;
    }

    override _fuseOptions(): string {
      const debug = (process.env.DEBUG ?? '').split(/[\s,]+/).includes(LIBFUSE_DEBUG);
      return `-o${[...this.libfuseOptions, ...(debug ? ['debug'] : [])].join(',')}`;
    }
  }
  fuseNative = { Qcow2Fuse, binding };
  return fuseNative;
}

function execFileText(file: string, args: readonly string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolvePromise, reject) => {
    execFile(file, args, { encoding: 'utf8' }, (err, _stdout, stderr) => {
      if (err === null) resolvePromise({ code: 0, stderr });
      else if (typeof err.code === 'number') resolvePromise({ code: err.code, stderr });
      else reject(Object.assign(new Error(err.message), { code: err.code }));
    });
  });
}

/**
 * `fusermount -u [-z] MOUNTPOINT` (fusermount from libfuse 2, else fusermount3). Throws a MountError
 * with fusermount's own message when it fails (busy, not mounted …).
 */
export async function fusermountUnmount(mountpoint: string, lazy: boolean): Promise<void> {
  const args = lazy ? ['-u', '-z', mountpoint] : ['-u', mountpoint];
  for (const tool of ['fusermount', 'fusermount3']) {
    let result: { code: number; stderr: string };
    try {
      result = await execFileText(tool, args);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
      throw err;
    }
    if (result.code === 0) return;
    const message = result.stderr.trim().replace(/^fusermount3?: /, '');
    throw new MountError(/busy/i.test(message) ? 'EBUSY' : 'EIO', `cannot unmount ${mountpoint}: ${message}`);
  }
  throw new MountError('ENOENT', 'fusermount not found (install the fuse or fuse3 package)');
}

/**
 * Check that `mountpoint` can take a mount and return its real path. Refuses, with the reason and
 * the way out: a missing path, a non-directory, a stale FUSE mount (ENOTCONN: its daemon died), an
 * existing mount, a non-empty directory (libfuse 2 refuses those too).
 */
export async function checkMountpoint(mountpoint: string): Promise<string> {
  const given = resolve(mountpoint);
  let real: string;
  try {
    real = await realpath(given);
    if (!(await stat(real)).isDirectory()) throw new MountError('ENOTDIR', `mountpoint ${given} is not a directory`);
  } catch (err) {
    if (err instanceof MountError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTCONN') {
      throw new MountError('ENOTCONN', `${given} is a stale FUSE mount (its daemon is gone); clear it with: fusermount -u ${given}`);
    }
    if (code === 'ENOENT') throw new MountError('ENOENT', `mountpoint ${given} does not exist`);
    throw new MountError(code ?? 'EIO', `mountpoint ${given}: ${(err as Error).message}`);
  }
  const existing = await findMount(real);
  if (existing !== undefined) {
    const hint = existing.fsType === FS_TYPE ? `; unmount it with: qcow2fuse unmount ${real}` : '';
    throw new MountError('EBUSY', `${real} is already a mount point (${existing.fsType} from ${existing.source})${hint}`);
  }
  if ((await readdir(real)).length > 0) throw new MountError('ENOTEMPTY', `mountpoint ${real} is not empty`);
  return real;
}

/** One live FUSE mount made by mountFuse. */
export class FuseMount {
  private released = false;

  constructor(readonly mountpoint: string, readonly mountId: number, private readonly fuse: FuseInstance, private readonly binding: FuseBinding) {}

  /** True while the kernel still has this mount (by mount id: a mount stacked on top does not count). */
  isMounted(): Promise<boolean> {
    return isMountPresent(this.mountId);
  }

  unmount(lazy: boolean): Promise<void> {
    return fusermountUnmount(this.mountpoint, lazy);
  }

  /** Poll the mount table every `intervalMs`; call `onGone` once when this mount has left it. Returns a stop function. */
  watch(intervalMs: number, onGone: () => void): () => void {
    let stopped = false;
    let timer: NodeJS.Timeout | undefined;
    const poll = async () => {
      let present = true;
      try {
        present = await this.isMounted();
      } catch {
        // An unreadable mount table is no proof the mount is gone: poll again.
      }
      if (stopped) return;
      if (present) timer = setTimeout(() => void poll(), intervalMs);
      else onGone();
    };
    timer = setTimeout(() => void poll(), intervalMs);
    return () => {
      stopped = true;
      clearTimeout(timer);
    };
  }

  /** Let go of fuse-native's hold on the event loop (after the mount is gone). Idempotent. */
  release(): void {
    if (this.released || this.fuse._thread === null) return;
    this.released = true;
    this.binding.fuse_native_unmount(this.mountpoint, this.fuse._thread);
  }
}

/**
 * Set the read-ahead of the mount's bdi (/sys/class/bdi/MAJOR:MINOR/read_ahead_kb). Only an
 * optimisation: where it cannot be set (no root, no sysfs) the kernel's default stays, with a trace.
 */
async function setReadahead(device: string, bytes: number): Promise<void> {
  try {
    await writeFile(`/sys/class/bdi/${device}/read_ahead_kb`, `${bytes / 1024}\n`);
  } catch (err) {
    trace('cannot set read-ahead of bdi %s to %d bytes: %o', device, bytes, err);
  }
}

/**
 * Mount `ops` on `mountpoint` (a checked, real path) with the given libfuse options; resolves once the
 * kernel has initialised the connection. If mounting fails half-way, whatever it left mounted is
 * detached before the error is thrown.
 */
export async function mountFuse(mountpoint: string, ops: FuseNativeOps, options: readonly string[], readaheadBytes?: number): Promise<FuseMount> {
  const { Qcow2Fuse, binding } = loadFuseNative();
  const before = new Set((await readMounts()).filter((m) => m.mountPoint === mountpoint).map((m) => m.mountId));
  const newMounts = async () => (await readMounts()).filter((m) => m.mountPoint === mountpoint && !before.has(m.mountId));
  const fuse = new Qcow2Fuse(mountpoint, ops, options);
  try {
    await new Promise<void>((resolvePromise, reject) => fuse.mount((err) => (err ? reject(err) : resolvePromise())));
  } catch (err) {
    if ((await newMounts()).length > 0) await fusermountUnmount(mountpoint, true);
    throw new MountError('EIO', `cannot mount on ${mountpoint}: ${(err as Error).message}`, {}, err);
  }
  const entry = (await newMounts()).at(-1);
  if (entry === undefined) {
    await fusermountUnmount(mountpoint, true).catch(() => undefined);
    throw new MountError('EIO', `mounted on ${mountpoint}, but the mount is not in /proc/self/mountinfo`);
  }
  if (readaheadBytes !== undefined) await setReadahead(entry.device, readaheadBytes);
  return new FuseMount(mountpoint, entry.mountId, fuse, binding);
}

export interface SessionRequest {
  image: string;
  mountpoint: string;
  options: MountOptions;
  opener: DeviceOpener;
  /** Lifecycle events and errors answered EIO/ENOSPC (default: nothing). */
  log?: (line: string) => void;
  /** How often the mount table is checked for an external unmount (default 200 ms). */
  pollIntervalMs?: number;
  /** How inspection files are captured. */
  capture?: CaptureOptions;
}

/** The message for an image that cannot be opened; a lock held elsewhere is named as such. */
function openFailure(image: string, err: unknown): MountError {
  const message = err instanceof Error ? err.message : String(err);
  const code = (err as { code?: unknown }).code;
  if (code === 'ELOCKED') {
    // The lock error names the image, the holder's QEMU permission and what to do (-o ro,force-share …).
    return new MountError('ELOCKED', `cannot mount ${message}`, {}, err);
  }
  return new MountError(typeof code === 'string' ? code : 'EIO', `cannot mount ${image}: ${message}`, {}, err);
}

export class MountSession {
  /** Settles once the image is closed after the mount ended: resolves on a clean close, rejects otherwise. */
  readonly closed: Promise<void>;
  private stopping: Promise<void> | undefined;
  private readonly stopWatch: () => void;
  private settle!: { resolve: () => void; reject: (err: unknown) => void };

  private constructor(
    readonly image: string,
    readonly mountpoint: string,
    readonly device: InspectableDevice,
    private readonly handlers: FsHandlers,
    private readonly adapter: FuseAdapter,
    private readonly mount: FuseMount,
    private readonly log: (line: string) => void,
    pollIntervalMs: number,
  ) {
    this.closed = new Promise((resolvePromise, reject) => {
      this.settle = { resolve: resolvePromise, reject };
    });
    this.closed.catch(() => undefined);
    this.stopWatch = mount.watch(pollIntervalMs, () => void this.stop('unmounted externally').catch(() => undefined));
  }

  /** Open the image, mount it and start watching the mount. Throws a MountError (nothing left open) on failure. */
  static async start(req: SessionRequest): Promise<MountSession> {
    const log = req.log ?? (() => undefined);
    const image = resolve(req.image);
    const mountpoint = await checkMountpoint(req.mountpoint);
    let device: InspectableDevice;
    try {
      device = await req.opener(image, deviceOpenOptions(req.options));
    } catch (err) {
      throw openFailure(image, err);
    }
    try {
      const handlers = createHandlers(device, {
        readOnly: req.options.readOnly || device.readOnly, nogrow: req.options.nogrow, rawName: req.options.name,
        statfsPath: dirname(image), uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, capture: req.capture,
      });
      const adapter = createFuseAdapter(handlers, {
        onError: (op, path, err, errno) => log(`${op} ${path}: ${errno}: ${err instanceof Error ? err.message : String(err)}`),
      });
      const options = { ...req.options, readOnly: req.options.readOnly || device.readOnly };
      const mount = await mountFuse(mountpoint, adapter.ops, libfuseOptions(options, image), options.readaheadBytes);
      log(`mounted ${image} on ${mountpoint}${options.readOnly ? ' (read-only)' : ''}`);
      return new MountSession(image, mountpoint, device, handlers, adapter, mount, log, req.pollIntervalMs ?? 200);
    } catch (err) {
      await device.close().catch((closeErr: unknown) => log(`closing ${image} after a failed mount: ${String(closeErr)}`));
      throw err;
    }
  }

  /**
   * End the mount (idempotent) and close the image; resolves like `closed`. Unmounts if still mounted —
   * detaching lazily when the mount is busy, since the caller asked to stop — then waits for in-flight
   * requests, releases handles and closes the device.
   */
  stop(reason: string): Promise<void> {
    if (this.stopping === undefined) {
      this.stopping = this.shutdown(reason);
      this.stopping.then(this.settle.resolve, this.settle.reject);
    }
    return this.closed;
  }

  private async shutdown(reason: string): Promise<void> {
    this.stopWatch();
    this.log(`stopping: ${reason}`);
    try {
      if (await this.mount.isMounted()) {
        try {
          await this.mount.unmount(false);
        } catch (err) {
          this.log(`${(err as Error).message}; detaching lazily`);
          await this.mount.unmount(true);
        }
      }
    } catch (err) {
      this.log(`could not unmount ${this.mountpoint} (${(err as Error).message}); closing the image anyway`);
    }
    if (this.adapter.inFlight() > 0) {
      this.log(`waiting for ${this.adapter.inFlight()} request(s) in flight`);
      await this.adapter.drained();
    }
    let failure: Error | undefined;
    const asError = (err: unknown) => (err instanceof Error ? err : new Error(String(err)));
    try {
      this.log(`releasing ${this.handlers.openHandles()} open handle(s)`);
      await this.handlers.dispose();
    } catch (err) {
      failure = asError(err);
    }
    try {
      this.log(`closing ${this.image}`);
      await this.device.close();
    } catch (err) {
      failure ??= asError(err);
    }
    this.mount.release();
    if (failure !== undefined) {
      this.log(`closing ${this.image} failed: ${errnoName(failure)}: ${failure.message}`);
      throw failure;
    }
    this.log(`closed ${this.image}`);
  }
}
