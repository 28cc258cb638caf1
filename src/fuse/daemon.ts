/**
 * The mount daemon and the commands around it.
 *
 * serveMount: run one mount in this process until it ends — signals (SIGINT, SIGTERM, SIGHUP), an
 * external umount/fusermount -u, or `qcow2fuse unmount` — then close the image. It records the daemon
 * in the runtime directory (runtime.ts) while the mount is live. An exception nothing caught (a bug)
 * is logged and ends the mount the same way, so the image is still flushed and closed.
 *
 * startBackgroundMount: the parent side of the default (background) mount. It spawns the daemon as a
 * detached process (its output going to a log file in the runtime directory) and returns only once the
 * daemon reports, over a pipe on fd 3, that the mount is live — or throws with the reason it is not.
 *
 * unmountMountpoint: `qcow2fuse unmount MNT`. It unmounts (fusermount -u, which fails while the mount
 * is busy), then waits for the recorded daemon process to exit, which it does only after the image is
 * flushed, closed and unlocked. A daemon that died (stale mount) is reported, and its mount cleared.
 */
import { spawn } from 'node:child_process';
import { closeSync, openSync, writeSync } from 'node:fs';
import { readFile, realpath, stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { FS_TYPE, findMount } from './mountinfo.js';
import { fusermountUnmount, MountError, MountSession, type SessionRequest } from './mount.js';
import { ensureRuntimeDir, isDaemonAlive, processStartTime, readState, removeState, writeState, type DaemonState } from './runtime.js';

/** What a daemon child writes on its report pipe: one JSON line. */
export interface ReadyReport {
  ok: boolean;
  pid: number;
  message?: string;
}

export interface ServeRequest extends SessionRequest {
  /** The -o arguments as given (recorded in the state file). */
  optionSpecs: readonly string[];
  /** Runtime directory for the state file (default runtime.ts's runtimeDir()). */
  runtimeDir?: string;
  logFile?: string;
  /** Called once the mount is live and recorded. */
  onReady?: (state: DaemonState) => void;
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * Mount and serve until the mount ends; resolves with the exit code (0 when the image closed cleanly).
 * Throws (nothing mounted, nothing left open) when the mount cannot be made.
 */
export async function serveMount(req: ServeRequest): Promise<number> {
  const log = req.log ?? (() => undefined);
  let session: MountSession | undefined;
  /** A stop asked for while the mount was still being made. */
  let earlyStop: string | undefined;
  let fatal = false;
  const stop = (reason: string) => {
    if (session === undefined) earlyStop ??= reason;
    else void session.stop(reason).catch(() => undefined);
  };
  const onSignal = (signal: NodeJS.Signals) => {
    log(`received ${signal}`);
    stop(signal);
  };
  const onFatal = (err: unknown) => {
    fatal = true;
    log(`fatal: ${err instanceof Error ? err.stack ?? err.message : String(err)}`);
    stop('fatal error');
  };
  const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
  for (const signal of signals) process.on(signal, onSignal);
  process.on('uncaughtException', onFatal);
  process.on('unhandledRejection', onFatal);
  try {
    session = await MountSession.start({ ...req, log });
    if (earlyStop !== undefined) {
      await session.stop(earlyStop).catch(() => undefined);
      throw new MountError('EINTR', `mount interrupted (${earlyStop}); the image was closed`);
    }
    const state: DaemonState = {
      pid: process.pid, startTime: processStartTime(process.pid) ?? '', mountpoint: session.mountpoint, image: session.image,
      options: [...req.optionSpecs], mountedAt: new Date().toISOString(), ...(req.logFile === undefined ? {} : { logFile: req.logFile }),
    };
    try {
      await writeState(state, req.runtimeDir);
    } catch (err) {
      log(`cannot record the daemon in the runtime directory: ${errorMessage(err)}`);
      await session.stop('the mount could not be recorded').catch(() => undefined);
      throw new MountError('EIO', `cannot record the mount: ${errorMessage(err)}`, {}, err);
    }
    req.onReady?.(state);
    try {
      await session.closed;
    } catch (err) {
      await writeState({ ...state, closeError: errorMessage(err) }, req.runtimeDir).catch(() => undefined);
      return 1;
    }
    await removeState(session.mountpoint, req.runtimeDir);
    return fatal ? 1 : 0;
  } finally {
    for (const signal of signals) process.off(signal, onSignal);
    process.off('uncaughtException', onFatal);
    process.off('unhandledRejection', onFatal);
  }
}

/**
 * Write the daemon's report to the parent's pipe and close it. A parent that is gone (EPIPE) is no
 * reason to stop serving: failures are returned, not thrown.
 */
export function reportToParent(fd: number, report: ReadyReport): Error | undefined {
  try {
    writeSync(fd, `${JSON.stringify(report)}\n`);
    closeSync(fd);
    return undefined;
  } catch (err) {
    return err instanceof Error ? err : new Error(String(err));
  }
}

export interface BackgroundRequest {
  /** Arguments for `process.execPath` that run the daemon (it reports on fd 3). */
  args: readonly string[];
  /** The daemon's stdout and stderr are appended here. */
  logFile: string;
  runtimeDir?: string;
}

/** The last lines of a log file, for an error message ('' when unreadable). */
async function logTail(path: string, lines = 15): Promise<string> {
  try {
    return (await readFile(path, 'utf8')).trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '';
  }
}

/**
 * Spawn the daemon detached (own session, cwd /, stdin closed) and wait for its report. Resolves with
 * the daemon's pid once the mount is live; throws a MountError with the daemon's reason otherwise.
 */
export async function startBackgroundMount(req: BackgroundRequest): Promise<number> {
  await ensureRuntimeDir(req.runtimeDir);
  const logFd = openSync(req.logFile, 'a', 0o600);
  let child;
  try {
    child = spawn(process.execPath, [...req.args], { detached: true, cwd: '/', stdio: ['ignore', logFd, logFd, 'pipe'] });
  } finally {
    closeSync(logFd);
  }
  const pipe = child.stdio[3] as NodeJS.ReadableStream & { destroy(): void };
  const outcome = await new Promise<{ report?: ReadyReport; exit?: string }>((resolvePromise) => {
    let text = '';
    pipe.setEncoding('utf8');
    pipe.on('data', (chunk: string) => {
      text += chunk;
      const nl = text.indexOf('\n');
      if (nl < 0) return;
      try {
        resolvePromise({ report: JSON.parse(text.slice(0, nl)) as ReadyReport });
      } catch {
        resolvePromise({ exit: `unreadable report from the daemon: ${text.slice(0, nl)}` });
      }
    });
    pipe.on('error', () => undefined);
    child.on('error', (err) => resolvePromise({ exit: `cannot start the daemon: ${err.message}` }));
    child.on('exit', (code, signal) => resolvePromise({ exit: `the daemon exited (${signal ?? `code ${code}`}) before the mount was live` }));
  });
  pipe.destroy();
  child.unref();
  if (outcome.report?.ok === true) return outcome.report.pid;
  const reason = outcome.report?.message ?? outcome.exit ?? 'unknown failure';
  const tail = outcome.report === undefined ? await logTail(req.logFile) : '';
  throw new MountError('EIO', tail === '' ? reason : `${reason}\n${tail}`);
}

export interface UnmountRequest {
  mountpoint: string;
  runtimeDir?: string;
  /** Called when the daemon takes long to close (for a progress note). */
  onSlowClose?: (state: DaemonState) => void;
}

/** Wait until the recorded daemon process has exited. */
async function waitForExit(state: DaemonState, onSlow: () => void): Promise<void> {
  const slowAt = Date.now() + 3000;
  let noted = false;
  while (isDaemonAlive(state)) {
    if (!noted && Date.now() > slowAt) {
      noted = true;
      onSlow();
    }
    await sleep(20);
  }
}

/**
 * `qcow2fuse unmount MNT`: resolves once the mount is gone and its daemon has flushed, closed and
 * unlocked the image and exited. Throws a MountError saying what is wrong otherwise (not mounted, not
 * ours, busy, the daemon died, closing failed).
 */
export async function unmountMountpoint(req: UnmountRequest): Promise<void> {
  const given = resolve(req.mountpoint);
  const mountpoint = await realpath(given).catch(() => given);
  const state = await readState(mountpoint, req.runtimeDir);
  const alive = state !== undefined && isDaemonAlive(state);
  const entry = await findMount(mountpoint);

  if (entry !== undefined && entry.fsType !== FS_TYPE) {
    throw new MountError('EINVAL', `${mountpoint} is not a qcow2fuse mount (${entry.fsType} from ${entry.source})`);
  }
  if (entry === undefined && !alive) {
    if (state !== undefined) await removeState(mountpoint, req.runtimeDir);
    throw new MountError('EINVAL', `${mountpoint} is not mounted`);
  }
  if (!alive || state === undefined) {
    const image = state?.image ?? entry?.source ?? 'IMAGE';
    const stale = await stat(mountpoint).then(() => false, (err: NodeJS.ErrnoException) => err.code === 'ENOTCONN');
    await fusermountUnmount(mountpoint, true);
    if (state !== undefined) await removeState(mountpoint, req.runtimeDir);
    throw new MountError('EIO', `the qcow2fuse daemon of ${mountpoint} is not running${stale ? ' (stale mount)' : ''}; the mount was ` +
      `cleared, but the image ${image} was not closed cleanly: check it with \`qcow2fuse check ${image}\``);
  }
  const daemon = state;
  if (entry !== undefined) await fusermountUnmount(mountpoint, false);
  // The daemon notices the unmount itself (its session's reads end; fuse-native polls); the signal only saves it the wait.
  try {
    process.kill(daemon.pid, 'SIGTERM');
  } catch {
    // Already gone.
  }
  await waitForExit(daemon, () => req.onSlowClose?.(daemon));
  const after = await readState(mountpoint, req.runtimeDir);
  if (after === undefined || after.pid !== daemon.pid) return;
  if (after.closeError !== undefined) {
    throw new MountError('EIO', `${mountpoint} was unmounted, but closing ${after.image} failed: ${after.closeError}` +
      `${after.logFile === undefined ? '' : ` (log: ${after.logFile})`}`);
  }
  await removeState(mountpoint, req.runtimeDir);
  throw new MountError('EIO', `the daemon of ${mountpoint} exited without closing ${after.image} cleanly` +
    `${after.logFile === undefined ? '' : ` (log: ${after.logFile})`}; check it with \`qcow2fuse check ${after.image}\``);
}
