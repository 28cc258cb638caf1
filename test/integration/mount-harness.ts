/**
 * Shared by the mount integration tests: run the compiled CLI (dist/src/cli/main.js) and the
 * memory-device mount entry (dist/test/integration/mount-memory-daemon.js) as real processes, with a
 * private runtime directory, and wait for daemons to exit.
 *
 * The daemons run from dist/ (Node 20 cannot run TypeScript), so `npm run build` must be current:
 * checkBuild() fails the file with that instruction when a source is newer than its build.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { run, waitForExit, type ExecResult, type RunOptions } from '../helpers/exec.js';

export { waitForExit };
import { readState } from '../../src/fuse/runtime.js';

const root = fileURLToPath(new URL('../../', import.meta.url));
export const CLI = `${root}dist/src/cli/main.js`;
export const MEMORY_ENTRY = `${root}dist/test/integration/mount-memory-daemon.js`;

const SOURCES_AND_BUILDS: [string, string][] = [
  ['src/fuse/ops.ts', 'dist/src/fuse/ops.js'],
  ['src/fuse/adapter.ts', 'dist/src/fuse/adapter.js'],
  ['src/fuse/mount.ts', 'dist/src/fuse/mount.js'],
  ['src/fuse/daemon.ts', 'dist/src/fuse/daemon.js'],
  ['src/fuse/options.ts', 'dist/src/fuse/options.js'],
  ['src/fuse/inspect.ts', 'dist/src/fuse/inspect.js'],
  ['src/cli/commands/mount.ts', 'dist/src/cli/commands/mount.js'],
  ['src/cli/commands/unmount.ts', 'dist/src/cli/commands/unmount.js'],
  ['test/unit/fuse/memory-device.ts', 'dist/test/unit/fuse/memory-device.js'],
  ['test/integration/mount-memory-daemon.ts', 'dist/test/integration/mount-memory-daemon.js'],
];

/** Throws unless every daemon-side module has a build at least as new as its source. */
export async function checkBuild(): Promise<void> {
  for (const [source, build] of SOURCES_AND_BUILDS) {
    const built = await stat(`${root}${build}`).catch(() => undefined);
    if (built === undefined || built.mtimeMs < (await stat(`${root}${source}`)).mtimeMs) {
      throw new Error(`${build} is missing or older than ${source}: run \`npm run build\` first (npm test does)`);
    }
  }
}

/** Environment for commands of one test: its own runtime directory, plus extras. */
export function testEnv(runtimeDir: string, extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  return { ...process.env, QCOW2FUSE_RUNTIME_DIR: runtimeDir, ...extra };
}

/** `node dist/src/cli/main.js ARGS`. */
export function cli(args: readonly string[], env: NodeJS.ProcessEnv, options: RunOptions = {}): Promise<ExecResult> {
  return run(process.execPath, [CLI, ...args], { ...options, env });
}

/** The mount command over a memory device: `node mount-memory-daemon.js ARGS` (same options as `qcow2fuse mount`). */
export function memoryMount(args: readonly string[], env: NodeJS.ProcessEnv): Promise<ExecResult> {
  return run(process.execPath, [MEMORY_ENTRY, ...args], { env });
}

/** Start the memory mount in the foreground (-f) as a child process of the test. */
export function memoryMountForeground(args: readonly string[], env: NodeJS.ProcessEnv): ChildProcess {
  return spawn(process.execPath, [MEMORY_ENTRY, '-f', ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
}

/** The daemon pid recorded for a mountpoint (throws when none is recorded). */
export async function daemonPid(mountpoint: string, runtimeDir: string): Promise<number> {
  const state = await readState(mountpoint, runtimeDir);
  if (state === undefined) throw new Error(`no daemon recorded for ${mountpoint}`);
  return state.pid;
}

