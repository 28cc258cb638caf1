/**
 * Mount-table helpers for FUSE tests: is a path mounted, wait for a mount to appear or vanish,
 * and tear down mounts a test left behind.
 *
 * Never leak mounts: a test that mounts something calls `registerMount(dir)`; the per-file setup
 * (test/helpers/setup.ts) unmounts every registered mount after the file, temp-dir cleanup unmounts
 * anything below a directory before deleting it, and the global teardown sweeps the whole test run
 * directory. Mount points are compared as `path.resolve`d strings (no realpath: a dead FUSE mount
 * answers ENOTCONN).
 */
import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { run } from './exec.js';
import { findAnyTool, findTool } from './tools.js';

export interface MountEntry {
  mountId: number;
  parentId: number;
  /** Absolute mount point, escapes decoded. */
  mountPoint: string;
  /** e.g. 'fuse', 'fuse.qcow2fuse', 'ext4'. */
  fsType: string;
  source: string;
  /** Per-mount options (rw, nosuid, …). */
  options: string[];
  /** Per-superblock options (user_id=0, …). */
  superOptions: string[];
}

const unescape = (field: string) => field.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));

/** Parse /proc/PID/mountinfo text (proc(5)), in mount order. */
export function parseMountinfo(text: string): MountEntry[] {
  const entries: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const fields = line.split(' ');
    const dash = fields.indexOf('-');
    if (dash < 6 || fields.length < dash + 4) throw new Error(`unparsable mountinfo line: ${line}`);
    entries.push({
      mountId: Number(fields[0]),
      parentId: Number(fields[1]),
      mountPoint: unescape(fields[4] ?? ''),
      options: (fields[5] ?? '').split(','),
      fsType: fields[dash + 1] ?? '',
      source: unescape(fields[dash + 2] ?? ''),
      superOptions: (fields[dash + 3] ?? '').split(','),
    });
  }
  return entries;
}

/** The current mount table of this process's mount namespace. */
export async function readMounts(): Promise<MountEntry[]> {
  return parseMountinfo(await readFile('/proc/self/mountinfo', 'utf8'));
}

/** The topmost mount whose mount point is exactly `dir`, if any. */
export async function findMount(dir: string): Promise<MountEntry | undefined> {
  const target = resolve(dir);
  return (await readMounts()).filter((m) => m.mountPoint === target).at(-1);
}

/** True when something is mounted on `dir` (a directory or, for file mounts, a regular file). */
export async function isMounted(dir: string): Promise<boolean> {
  return (await findMount(dir)) !== undefined;
}

/** Mounts on `dir` or anywhere below it, most recent first (the order to unmount them in). */
export async function mountsUnder(dir: string): Promise<MountEntry[]> {
  const target = resolve(dir);
  return (await readMounts()).filter((m) => m.mountPoint === target || m.mountPoint.startsWith(`${target}/`)).reverse();
}

/** Resolves with the mount entry once `dir` is mounted (optionally with that fsType prefix); rejects after timeoutMs. */
export async function waitForMount(dir: string, timeoutMs = 10_000, fsTypePrefix?: string): Promise<MountEntry> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const entry = await findMount(dir);
    if (entry !== undefined && (fsTypePrefix === undefined || entry.fsType.startsWith(fsTypePrefix))) return entry;
    if (Date.now() >= deadline) throw new Error(`${dir} was not mounted within ${timeoutMs} ms`);
    await sleep(20);
  }
}

/** Resolves once nothing is mounted on `dir`; rejects after timeoutMs. */
export async function waitForUnmount(dir: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (await isMounted(dir)) {
    if (Date.now() >= deadline) throw new Error(`${dir} was still mounted after ${timeoutMs} ms`);
    await sleep(20);
  }
}

/**
 * Detach whatever is mounted on `dir` (every stacked layer): FUSE mounts with `fusermount -u -z`,
 * anything else (or when fusermount fails) with `umount -l`. Lazy, so a busy or dead daemon cannot
 * block it. Returns true when something was mounted. Throws when the mount survives.
 */
export async function forceUnmount(dir: string): Promise<boolean> {
  const target = resolve(dir);
  let entry = await findMount(target);
  if (entry === undefined) return false;
  for (let attempt = 0; entry !== undefined; attempt++) {
    if (attempt >= 10) throw new Error(`cannot unmount ${target} (${entry.fsType})`);
    const fusermount = findAnyTool('fusermount3', 'fusermount');
    let done = false;
    if (entry.fsType.startsWith('fuse') && fusermount !== undefined) {
      done = (await run(fusermount, ['-u', '-z', target], { timeoutMs: 30_000 })).code === 0;
    }
    if (!done) await run(findTool('umount') ?? 'umount', ['-l', target], { timeoutMs: 30_000 });
    entry = await findMount(target);
    if (entry !== undefined) await sleep(100);
  }
  return true;
}

const registered = new Set<string>();

/** Record a mount made by a test so it is torn down even when the test fails. */
export function registerMount(dir: string): void {
  registered.add(resolve(dir));
}

/** Forget a mount the test unmounted itself. */
export function unregisterMount(dir: string): void {
  registered.delete(resolve(dir));
}

/** Force-unmount every registered mount still mounted; returns those mount points (each one a test's leak). */
export async function unmountRegistered(): Promise<string[]> {
  const leaked: string[] = [];
  for (const dir of [...registered].reverse()) {
    if (await forceUnmount(dir)) leaked.push(dir);
    registered.delete(dir);
  }
  return leaked;
}

/** Force-unmount everything mounted on or below `dir`, newest first; returns the mount points. */
export async function unmountAllUnder(dir: string): Promise<string[]> {
  const done: string[] = [];
  for (const entry of await mountsUnder(dir)) {
    if (await forceUnmount(entry.mountPoint)) done.push(entry.mountPoint);
    registered.delete(entry.mountPoint);
  }
  return done;
}
