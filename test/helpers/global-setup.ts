/**
 * vitest globalSetup: one run directory for all temp files of this run (inherited by the forked
 * workers through QCOW2FUSE_TEST_RUN_DIR); at the end, anything still mounted below it is
 * force-unmounted (reported as a leak, failing the run) and the directory is deleted.
 *
 * A run killed before its teardown (e.g. by `timeout`) leaves its directory behind; each run first
 * sweeps run directories whose vitest process (the pid in the name) no longer exists.
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { makeTempDir, removeTempDir, tempBase, TEMP_PREFIX } from './tmp.js';

function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Remove (unmounting first) the run directories under `base` whose owning process is gone; returns their paths. */
export async function sweepStaleRuns(base: string): Promise<string[]> {
  const pattern = new RegExp(`^${TEMP_PREFIX}run(\\d+)-`);
  const removed: string[] = [];
  for (const name of await readdir(base)) {
    const pid = Number(pattern.exec(name)?.[1] ?? NaN);
    if (!Number.isInteger(pid) || pid === process.pid || processExists(pid)) continue;
    await removeTempDir(join(base, name));
    removed.push(join(base, name));
  }
  return removed;
}

export default async function setup(): Promise<() => Promise<void>> {
  for (const dir of await sweepStaleRuns(tempBase())) console.warn(`removed stale test run directory ${dir} (its vitest process is gone)`);
  const runDir = await makeTempDir(`run${process.pid}`);
  process.env.QCOW2FUSE_TEST_RUN_DIR = runDir;
  return async () => {
    const leaked = await removeTempDir(runDir);
    if (leaked.length > 0) throw new Error(`test run left mounts behind (now unmounted): ${leaked.join(', ')}`);
  };
}
