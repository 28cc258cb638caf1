/**
 * What both transports share: the mount errors, the mountpoint check, unmounting with fusermount,
 * the bdi read-ahead, and the TransportMount interface MountSession drives (session.ts: our libfuse3
 * session, the default; fuse-native.ts: fuse-native on libfuse 2, `-o transport=fuse-native`).
 */
import { execFile } from 'node:child_process';
import { readdir, realpath, stat, writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import createDebug from 'debug';
import { CodedError } from '../io/errors.js';
import { FS_TYPE, findMount } from './mountinfo.js';

const trace = createDebug('qcow2fuse:mount');

/** libfuse's own request trace (its `debug` option) is on when DEBUG names 'qcow2fuse:libfuse'. */
export function libfuseDebug(): boolean {
  return (process.env.DEBUG ?? '').split(/[\s,]+/).includes('qcow2fuse:libfuse');
}

/** A mount that could not be made or unmade, with a message meant for the user. */
export class MountError extends CodedError {
  constructor(code: string, message: string, details: Record<string, unknown> = {}, cause?: unknown) {
    super(code, message, details, cause === undefined ? undefined : { cause });
  }
}

/** One live mount, whichever transport serves it. */
export interface TransportMount {
  readonly mountpoint: string;
  /** True while the kernel still has this mount (by mount id: a mount stacked on top does not count). */
  isMounted(): Promise<boolean>;
  /** fusermount -u [-z]; throws a MountError with fusermount's reason (busy …). */
  unmount(lazy: boolean): Promise<void>;
  /** Call `onGone` once when the mount ends without us (an external umount). Returns a stop function. */
  watch(onGone: () => void): () => void;
  /** Let go of the transport (after the mount is gone and no request is in flight). Idempotent. */
  release(): void;
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

/**
 * Set the read-ahead of the mount's bdi (/sys/class/bdi/MAJOR:MINOR/read_ahead_kb). Only an
 * optimisation: where it cannot be set (no root, no sysfs) the kernel's default stays, with a trace.
 */
export async function setReadahead(device: string, bytes: number): Promise<void> {
  try {
    await writeFile(`/sys/class/bdi/${device}/read_ahead_kb`, `${bytes / 1024}\n`);
  } catch (err) {
    trace('cannot set read-ahead of bdi %s to %d bytes: %o', device, bytes, err);
  }
}

