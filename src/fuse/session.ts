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
import { fusermountUnmount, libfuseDebug, MountError, setReadahead, type TransportMount } from './transport.js';
import type { SessionAdapter } from './session-adapter.js';

const trace = createDebug('qcow2fuse:session');

/** One live mount served by our session. */
export class SessionMount implements TransportMount {
  private released = false;
  private ended: string | undefined;
  private readonly onEnd: ((why: string) => void)[] = [];

  constructor(readonly mountpoint: string, readonly mountId: number, private readonly handle: FuseSessionHandle) {}

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
  }
}

/**
 * Mount `adapter` on `mountpoint` (a checked, real path) with libfuse3 mount options `options` (and
 * the kernel's writeback cache if asked); resolves once the kernel has initialised the connection and the mount is in the mount table.
 */
export async function mountSession(mountpoint: string, adapter: SessionAdapter, options: readonly string[],
  readaheadBytes?: number, writebackCache = false): Promise<SessionMount> {
  const before = new Set((await readMounts()).filter((m) => m.mountPoint === mountpoint).map((m) => m.mountId));
  let mount: SessionMount | undefined;
  let init!: { resolve: () => void; reject: (err: Error) => void };
  const live = new Promise<void>((resolve, reject) => {
    init = { resolve, reject };
  });
  const onEvent = (kind: string, detail: string) => {
    if (kind === 'init') init.resolve();
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
  try {
    await live;
    const entry = (await readMounts()).filter((m) => m.mountPoint === mountpoint && !before.has(m.mountId)).at(-1);
    if (entry === undefined) throw new MountError('EIO', `mounted on ${mountpoint}, but the mount is not in /proc/self/mountinfo`);
    if (readaheadBytes !== undefined) await setReadahead(entry.device, readaheadBytes);
    mount = new SessionMount(mountpoint, entry.mountId, handle);
    return mount;
  } catch (err) {
    fuseSession.close(handle);
    throw err;
  }
}
