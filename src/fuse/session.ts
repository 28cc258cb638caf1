/**
 * The default transport: our own FUSE session (native/fuse_session.c, libfuse3's low-level API)
 * served on this process's event loop, in front of the session adapter (session-adapter.ts).
 *
 * mountSession mounts, waits until the kernel's INIT is answered (the mount is live) and returns a
 * SessionMount; a mount libfuse refuses fails with libfuse's own words ("fuse: failed to open
 * /dev/fuse: Permission denied", "fuse: unknown option(s): …"). The session itself notices when the
 * mount goes away (an external umount / fusermount -u ends its fd reads with ENODEV): watch() reports
 * it without polling the mount table.
 *
 * Nothing in this process may touch the mountpoint synchronously: the thread that would wait is the
 * one serving the mount.
 */
import createDebug from 'debug';
import { fuseSession, type FuseSessionHandle } from '../io/native.js';
import { readMounts, isMountPresent } from './mountinfo.js';
import { fsError } from './errno.js';
import { fusermountUnmount, libfuseDebug, MountError, setReadahead, type TransportMount } from './transport.js';
import type { KernelCache, SessionAdapter } from './session-adapter.js';

const trace = createDebug('qcow2fuse:session');

/**
 * The kernel's page cache of a session mounted with writeback_cache, driven through the session's
 * kernel thread (native/fuse_kernel_worker.c): drops and write-backs the daemon asks for.
 */
class SessionKernelCache implements KernelCache {
  private nextToken = 1;
  private readonly pending = new Map<number, { resolve: () => void; reject: (err: Error) => void }>();

  constructor(private readonly handle: FuseSessionHandle) {}

  dropPages(ino: number, offsetBytes: number, lengthBytes: number): void {
    fuseSession.notifyInval(this.handle, ino, offsetBytes, lengthBytes);
  }

  writeBack(path: string, offsetBytes: number): Promise<void> {
    const token = this.nextToken++;
    return new Promise((resolve, reject) => {
      if (!fuseSession.writeBack(this.handle, path, offsetBytes, token)) {
        reject(fsError('EIO', `${path}: the session is closed, its kernel cache cannot be written back`));
        return;
      }
      this.pending.set(token, { resolve, reject });
    });
  }

  /** A write-back ended (the session's 'written-back' event). */
  settle(token: number, errno: number): void {
    const waiter = this.pending.get(token);
    if (waiter === undefined) return;
    this.pending.delete(token);
    if (errno === 0) waiter.resolve();
    else waiter.reject(fsError('EIO', `writing the kernel's cached pages back failed (errno ${errno})`));
  }

  /** The session closed: nothing pending will end. */
  abandon(): void {
    for (const waiter of this.pending.values()) waiter.reject(fsError('EIO', 'the FUSE session closed'));
    this.pending.clear();
  }
}

/** One live mount served by our session. */
export class SessionMount implements TransportMount {
  private released = false;
  private ended: string | undefined;
  private readonly onEnd: ((why: string) => void)[] = [];

  constructor(readonly mountpoint: string, readonly mountId: number, private readonly handle: FuseSessionHandle,
    private readonly kernelCache: SessionKernelCache | undefined) {}

  /** Called by the session's event callback when it ended by itself. */
  noteEnded(why: string): void {
    if (this.ended !== undefined) return;
    this.ended = why;
    trace('session on %s ended: %s', this.mountpoint, why);
    for (const callback of this.onEnd.splice(0)) callback(why);
  }

  async isMounted(): Promise<boolean> {
    return this.ended === undefined && !this.released && isMountPresent(this.mountId);
  }

  unmount(lazy: boolean): Promise<void> {
    return fusermountUnmount(this.mountpoint, lazy);
  }

  /** Call `onGone` once when the session ends by itself (unmounted from outside, connection aborted). */
  watch(onGone: () => void): () => void {
    let active = true;
    const callback = () => {
      if (active) onGone();
    };
    if (this.ended !== undefined) queueMicrotask(callback);
    else this.onEnd.push(callback);
    return () => {
      active = false;
    };
  }

  /** Stop serving and free the session (requests still pending are answered EIO). Idempotent. */
  release(): void {
    if (this.released) return;
    this.released = true;
    fuseSession.close(this.handle);
    this.kernelCache?.abandon();
  }
}

/**
 * Mount `adapter` on `mountpoint` (a checked, real path) with libfuse3 mount options `options` (and
 * the kernel's writeback cache if asked: the adapter then gets the mount's KernelCache); resolves
 * once the kernel has initialised the connection and the mount is in the mount table.
 */
export async function mountSession(mountpoint: string, adapter: SessionAdapter, options: readonly string[],
  readaheadBytes?: number, writebackCache = false): Promise<SessionMount> {
  const before = new Set((await readMounts()).filter((m) => m.mountPoint === mountpoint).map((m) => m.mountId));
  let mount: SessionMount | undefined;
  let init!: { resolve: () => void; reject: (err: Error) => void };
  const live = new Promise<void>((resolve, reject) => {
    init = { resolve, reject };
  });
  let kernelCache: SessionKernelCache | undefined;
  const onEvent = (kind: string, detail: string, token: number, errno: number) => {
    if (kind === 'written-back') kernelCache?.settle(token, errno);
    else if (kind === 'init') init.resolve();
    else if (kind === 'exited') {
      init.reject(new MountError('EIO', `cannot mount on ${mountpoint}: the FUSE session ended before the mount was live (${detail})`));
      mount?.noteEnded(detail);
    }
  };
  let handle: FuseSessionHandle;
  try {
    handle = fuseSession.mount(mountpoint, ['-o', [...options, ...(libfuseDebug() ? ['debug'] : [])].join(',')], adapter.dispatch, onEvent, writebackCache);
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    throw new MountError(typeof code === 'string' ? code : 'EIO', `cannot mount on ${mountpoint}: ${(err as Error).message}`, {}, err);
  }
  if (writebackCache) {
    kernelCache = new SessionKernelCache(handle);
    adapter.attachKernelCache(kernelCache);
  }
  try {
    await live;
    const entry = (await readMounts()).filter((m) => m.mountPoint === mountpoint && !before.has(m.mountId)).at(-1);
    if (entry === undefined) throw new MountError('EIO', `mounted on ${mountpoint}, but the mount is not in /proc/self/mountinfo`);
    if (readaheadBytes !== undefined) await setReadahead(entry.device, readaheadBytes);
    mount = new SessionMount(mountpoint, entry.mountId, handle, kernelCache);
    return mount;
  } catch (err) {
    fuseSession.close(handle);
    kernelCache?.abandon();
    throw err;
  }
}
