/**
 * Temporary directories that never leak files or mounts.
 *
 * Everything lives under one base on a real disk filesystem that accepts O_DIRECT (tmpfs is
 * skipped: /tmp may be one): $QCOW2FUSE_TEST_TMPDIR, else /var/tmp, else os.tmpdir(). During a vitest
 * run the global setup makes a per-run directory there (QCOW2FUSE_TEST_RUN_DIR) and removes it at
 * the end, so even a crashed worker leaves nothing behind.
 *
 *   const dir = await tempDir();          // in a test: removed after that test; elsewhere: after the file
 *   const tmp = useTempDir();             // in a describe: tmp.path is a fresh dir for each test
 *   await withTempDir(async (dir) => …);  // removed when the callback settles
 *
 * Removal first unmounts anything mounted below the directory (mount.ts), then deletes it.
 */
import { closeSync, constants, mkdirSync, openSync, statfsSync, unlinkSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, expect } from 'vitest';
import { unmountAllUnder } from './mount.js';

export const TEMP_PREFIX = 'qcow2fuse-test-';

const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;

/** True when `dir` is on a disk filesystem where files can be opened O_DIRECT. */
export function supportsDirectIo(dir: string): boolean {
  try {
    const type = statfsSync(dir).type;
    if (type === TMPFS_MAGIC || type === RAMFS_MAGIC) return false;
    const probe = join(dir, `.${TEMP_PREFIX}odirect-${process.pid}`);
    const fd = openSync(probe, constants.O_CREAT | constants.O_WRONLY | constants.O_DIRECT, 0o600);
    closeSync(fd);
    unlinkSync(probe);
    return true;
  } catch {
    return false;
  }
}

let base: string | undefined;

/** The directory all test files go under (see the module comment); chosen once per process. */
export function tempBase(): string {
  if (base !== undefined) return base;
  const runDir = process.env.QCOW2FUSE_TEST_RUN_DIR;
  if (runDir !== undefined && runDir !== '') {
    mkdirSync(runDir, { recursive: true });
    return (base = runDir);
  }
  const candidates = [process.env.QCOW2FUSE_TEST_TMPDIR, '/var/tmp', tmpdir()].filter((d): d is string => d !== undefined && d !== '');
  const chosen = candidates.find((d) => supportsDirectIo(d));
  if (chosen === undefined) throw new Error(`no O_DIRECT-capable temp directory among ${candidates.join(', ')}; set QCOW2FUSE_TEST_TMPDIR`);
  return (base = chosen);
}

/** A new, unregistered directory `BASE/qcow2fuse-test-PREFIX-XXXXXX`; the caller removes it. */
export async function makeTempDir(prefix = 'tmp'): Promise<string> {
  return mkdtemp(join(tempBase(), `${TEMP_PREFIX}${prefix}-`));
}

/** Unmount everything below `dir` (newest first), then delete it recursively. Returns the mount points it had to unmount. */
export async function removeTempDir(dir: string): Promise<string[]> {
  const unmounted = await unmountAllUnder(dir);
  await rm(dir, { recursive: true, force: true, maxRetries: 3 });
  return unmounted;
}

const testScoped: string[] = [];
const fileScoped: string[] = [];

/** A registered temp dir: removed after the current test when created in one, else after the test file. */
export async function tempDir(prefix = 'tmp'): Promise<string> {
  const dir = await makeTempDir(prefix);
  (expect.getState().currentTestName !== undefined ? testScoped : fileScoped).push(dir);
  return dir;
}

async function removeAll(dirs: string[]): Promise<string[]> {
  const unmounted: string[] = [];
  while (dirs.length > 0) unmounted.push(...await removeTempDir(dirs.pop() as string));
  return unmounted;
}

/** Remove the temp dirs of the test that just ended (called from setup.ts). Returns mounts it had to unmount. */
export function cleanupTestTempDirs(): Promise<string[]> {
  return removeAll(testScoped);
}

/** Remove every registered temp dir (called from setup.ts after each file). Returns mounts it had to unmount. */
export async function cleanupAllTempDirs(): Promise<string[]> {
  return [...await removeAll(testScoped), ...await removeAll(fileScoped)];
}

export interface TempDirHandle {
  /** The current test's directory (valid inside tests and their hooks). */
  readonly path: string;
  /** `path` joined with `name`. */
  file(name: string): string;
}

/**
 * Register, in the current describe, a fresh temp dir for each test (beforeEach / afterEach). A mount
 * still below it after the test is unmounted and fails the test.
 */
export function useTempDir(prefix = 'tmp'): TempDirHandle {
  let current: string | undefined;
  beforeEach(async () => {
    current = await makeTempDir(prefix);
  });
  afterEach(async () => {
    const dir = current;
    current = undefined;
    if (dir === undefined) return;
    const leaked = await removeTempDir(dir);
    if (leaked.length > 0) throw new Error(`after test: mounts left behind (now unmounted): ${leaked.join(', ')}`);
  });
  return {
    get path(): string {
      if (current === undefined) throw new Error('useTempDir: path is only valid inside a test');
      return current;
    },
    file(name: string): string {
      return join(this.path, name);
    },
  };
}

/** Run `fn` with a fresh temp dir that is removed (mounts first) when it settles. */
export async function withTempDir<T>(fn: (dir: string) => Promise<T>, prefix = 'tmp'): Promise<T> {
  const dir = await makeTempDir(prefix);
  try {
    return await fn(dir);
  } finally {
    await removeTempDir(dir);
  }
}
