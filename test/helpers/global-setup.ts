/**
 * vitest globalSetup: one run directory for all temp files of this run (inherited by the forked
 * workers through QCOW2FUSE_TEST_RUN_DIR); at the end, anything still mounted below it is
 * force-unmounted (reported as a leak, failing the run) and the directory is deleted.
 */
import { makeTempDir, removeTempDir } from './tmp.js';

export default async function setup(): Promise<() => Promise<void>> {
  const runDir = await makeTempDir(`run${process.pid}`);
  process.env.QCOW2FUSE_TEST_RUN_DIR = runDir;
  return async () => {
    const leaked = await removeTempDir(runDir);
    if (leaked.length > 0) throw new Error(`test run left mounts behind (now unmounted): ${leaked.join(', ')}`);
  };
}
