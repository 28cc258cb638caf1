/**
 * Runtime state of mount daemons: one JSON file per mountpoint in the runtime directory, written by
 * the daemon once its mount is live and removed after the image is closed. `qcow2fuse unmount` finds
 * the daemon through it and waits for that process to exit; a file that outlives its process tells
 * that the daemon died without closing the image.
 *
 * Directory: $QCOW2FUSE_RUNTIME_DIR, else /run/qcow2fuse for root, else $XDG_RUNTIME_DIR/qcow2fuse,
 * else /tmp/qcow2fuse-UID. Files are keyed by a hash of the mountpoint's absolute path; each daemon's
 * log sits beside its state file.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

export interface DaemonState {
  pid: number;
  /** The process's start time (field 22 of /proc/PID/stat), so a recycled pid is not mistaken for it. */
  startTime: string;
  mountpoint: string;
  image: string;
  options: string[];
  mountedAt: string;
  logFile?: string;
  /** Set when closing the image failed; the daemon then exits non-zero and leaves this file. */
  closeError?: string;
}

export function runtimeDir(): string {
  const override = process.env.QCOW2FUSE_RUNTIME_DIR;
  if (override !== undefined && override !== '') return override;
  const uid = process.getuid?.() ?? 0;
  if (uid === 0) return '/run/qcow2fuse';
  const xdg = process.env.XDG_RUNTIME_DIR;
  return xdg !== undefined && xdg !== '' ? join(xdg, 'qcow2fuse') : `/tmp/qcow2fuse-${uid}`;
}

function key(mountpoint: string): string {
  return createHash('sha256').update(mountpoint).digest('hex').slice(0, 24);
}

export function statePath(mountpoint: string, dir = runtimeDir()): string {
  return join(dir, `${key(mountpoint)}.json`);
}

export function logPath(mountpoint: string, dir = runtimeDir()): string {
  return join(dir, `${key(mountpoint)}.log`);
}

export async function ensureRuntimeDir(dir = runtimeDir()): Promise<string> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  return dir;
}

/** Write the state atomically (write a temporary file, then rename). */
export async function writeState(state: DaemonState, dir = runtimeDir()): Promise<void> {
  await ensureRuntimeDir(dir);
  const path = statePath(state.mountpoint, dir);
  const tmp = `${path}.${process.pid}.tmp`;
  await writeFile(tmp, `${JSON.stringify(state, null, 2)}\n`, { mode: 0o600 });
  await rename(tmp, path);
}

/** The recorded state for `mountpoint`, or undefined when there is none (or it is unreadable). */
export async function readState(mountpoint: string, dir = runtimeDir()): Promise<DaemonState | undefined> {
  try {
    return JSON.parse(await readFile(statePath(mountpoint, dir), 'utf8')) as DaemonState;
  } catch {
    return undefined;
  }
}

export async function removeState(mountpoint: string, dir = runtimeDir()): Promise<void> {
  await rm(statePath(mountpoint, dir), { force: true });
}

/**
 * Start time of a running process (clock ticks since boot, as text), or undefined when it does not
 * exist or has exited (a zombie not yet reaped counts as exited).
 */
export function processStartTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) is parenthesised and may contain spaces: fields resume after the last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return fields[0] === 'Z' || fields[0] === 'X' ? undefined : fields[19];
  } catch {
    return undefined;
  }
}

/** True while the process recorded in `state` is still running (same pid and start time). */
export function isDaemonAlive(state: DaemonState): boolean {
  return processStartTime(state.pid) === state.startTime;
}
