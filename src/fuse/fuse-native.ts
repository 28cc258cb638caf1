/**
 * The libfuse 2 transport (`-o transport=fuse-native`): fuse-native with our options, in front of the
 * callback adapter (adapter.ts).
 *
 * Qcow2Fuse subclasses fuse-native's Fuse to add libfuse options it has no setting for (big_writes,
 * max_write, attr_timeout=0 …: options.ts) and to switch its 15 s per-request watchdog off for every
 * operation that may legitimately take long (data I/O, fsync, resize, generating an inspection file).
 * fuse-native does not notice an external `umount`/`fusermount -u`, so FuseMount polls the mount table.
 */
import { createRequire } from 'node:module';
import { dirname } from 'node:path';
import type { FuseNativeOps } from './adapter.js';
import { isMountPresent, readMounts } from './mountinfo.js';
import { fusermountUnmount, libfuseDebug, MountError, setReadahead, type TransportMount } from './transport.js';

/**
 * fuse-native's per-operation watchdog: it answers ETIMEDOUT after 15 s. Off for everything that can
 * legitimately take long (a flush of a large writeback cache, a resize, a check of a huge image, and
 * getattr, whose st_blocks waits for the image's metadata lock); kept for the rest, where a hang is a bug.
 */
export const WATCHDOG: Readonly<Record<string, number | false>> = {
  default: 15_000, read: false, write: false, flush: false, fsync: false, truncate: false, ftruncate: false,
  open: false, release: false, getattr: false,
};

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
      return `-o${[...this.libfuseOptions, ...(libfuseDebug() ? ['debug'] : [])].join(',')}`;
    }
  }
  fuseNative = { Qcow2Fuse, binding };
  return fuseNative;
}

/** One live FUSE mount made by mountFuse. */
export class FuseMount implements TransportMount {
  private released = false;

  constructor(readonly mountpoint: string, readonly mountId: number, private readonly fuse: FuseInstance, private readonly binding: FuseBinding,
    private readonly pollIntervalMs: number) {}

  /** True while the kernel still has this mount (by mount id: a mount stacked on top does not count). */
  isMounted(): Promise<boolean> {
    return isMountPresent(this.mountId);
  }

  unmount(lazy: boolean): Promise<void> {
    return fusermountUnmount(this.mountpoint, lazy);
  }

  /** Poll the mount table; call `onGone` once when this mount has left it. Returns a stop function. */
  watch(onGone: () => void): () => void {
    const intervalMs = this.pollIntervalMs;
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
 * Mount `ops` on `mountpoint` (a checked, real path) with the given libfuse options; resolves once the
 * kernel has initialised the connection. If mounting fails half-way, whatever it left mounted is
 * detached before the error is thrown.
 */
export async function mountFuse(mountpoint: string, ops: FuseNativeOps, options: readonly string[], readaheadBytes?: number,
  pollIntervalMs = 200): Promise<FuseMount> {
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
  return new FuseMount(mountpoint, entry.mountId, fuse, binding, pollIntervalMs);
}

