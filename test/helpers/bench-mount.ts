/**
 * Mount daemons for benchmarks, and what /proc tells about them.
 *
 * - startOurMount: `qcow2fuse mount [-o …] IMAGE DIR` (it backgrounds once the mount is live); the
 *   daemon's pid comes from its runtime state file (src/fuse/runtime.ts); stop() is
 *   `qcow2fuse unmount DIR`, which returns once the image is flushed and closed.
 * - startQsdExport: qemu-storage-daemon's FUSE export of a qcow2 node on a file node, mounted on a
 *   regular file, exactly as bench/anchors.sh runs it; stop() is SIGTERM (qsd closes the export and
 *   flushes the image) and waits for the process to exit.
 *
 * Both stop() functions end with a lazy force-unmount if something is still mounted, so a benchmark
 * calling stop() in a finally block never leaves a mount behind.
 */
import { spawn } from 'node:child_process';
import { readFile, realpath } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { readState } from '../../src/fuse/runtime.js';
import { run } from './exec.js';
import { forceUnmount, waitForMount } from './mount.js';

/** dist/test/helpers → dist/src/cli/main.js */
export const CLI = resolve(dirname(fileURLToPath(import.meta.url)), '../../src/cli/main.js');

/** Clock ticks per second of /proc/PID/stat's utime and stime (USER_HZ; 100 on Linux x86-64). */
const USER_HZ = 100;

export interface MountedDaemon {
  /** The file holding the image's guest contents, to read and write. */
  readonly file: string;
  /** The daemon process serving it. */
  readonly pid: number;
  /** Unmount and wait until the daemon has exited (image flushed and closed). */
  stop(): Promise<void>;
}

/** `qcow2fuse mount -o OPTIONS IMAGE DIR`; the raw file is DIR/disk.raw. */
export async function startOurMount(image: string, dir: string, options: readonly string[] = []): Promise<MountedDaemon> {
  const optionArgs = options.length === 0 ? [] : ['-o', options.join(',')];
  const mounted = await run(process.execPath, [CLI, 'mount', ...optionArgs, image, dir], { timeoutMs: 60_000 });
  if (mounted.code !== 0) throw new Error(`qcow2fuse mount failed (${mounted.code}): ${mounted.stderr.trim()}`);
  const mountpoint = await realpath(dir);
  const state = await readState(mountpoint);
  if (state === undefined) {
    await forceUnmount(mountpoint);
    throw new Error(`qcow2fuse mount of ${mountpoint} left no runtime state file`);
  }
  return {
    file: join(mountpoint, 'disk.raw'),
    pid: state.pid,
    async stop() {
      const result = await run(process.execPath, [CLI, 'unmount', mountpoint], { timeoutMs: 600_000 });
      const leaked = await forceUnmount(mountpoint);
      if (result.code !== 0) throw new Error(`qcow2fuse unmount failed (${result.code}): ${result.stderr.trim()}`);
      if (leaked) throw new Error(`${mountpoint} was still mounted after qcow2fuse unmount`);
    },
  };
}

export interface QsdExportOptions {
  /** cache.direct of the file node: O_DIRECT host I/O. */
  direct: boolean;
  writable: boolean;
}

/**
 * qemu-storage-daemon --blockdev driver=file,node-name=f,filename=IMAGE,cache.direct=on|off
 *   --blockdev driver=qcow2,node-name=q,file=f --export type=fuse,id=e,node-name=q,mountpoint=FILE,writable=on|off
 * FILE must be an existing regular file.
 */
export async function startQsdExport(image: string, file: string, options: QsdExportOptions): Promise<MountedDaemon> {
  const onOff = (flag: boolean) => (flag ? 'on' : 'off');
  const args = [
    '--blockdev', `driver=file,node-name=f,filename=${image},cache.direct=${onOff(options.direct)}`,
    '--blockdev', 'driver=qcow2,node-name=q,file=f',
    '--export', `type=fuse,id=e,node-name=q,mountpoint=${file},writable=${onOff(options.writable)}`,
  ];
  const child = spawn('qemu-storage-daemon', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (chunk: string) => { stderr += chunk; });
  const exited = new Promise<number | null>((resolveExit) => {
    child.on('error', (err) => { stderr += String(err); resolveExit(null); });
    child.on('exit', (code) => resolveExit(code));
  });
  const pid = child.pid;
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    await exited;
    if (await forceUnmount(file)) throw new Error(`qemu-storage-daemon left ${file} mounted`);
  };
  const failed = exited.then((code) => { throw new Error(`qemu-storage-daemon exited (${code}) before mounting: ${stderr.trim()}`); });
  try {
    if (pid === undefined) throw new Error(`qemu-storage-daemon did not start: ${stderr.trim()}`);
    await Promise.race([waitForMount(file, 30_000, 'fuse'), failed]);
  } catch (error) {
    await stop().catch(() => undefined);
    throw error;
  }
  return { file, pid, stop };
}

/** Peak resident set size (VmHWM) of a running process, in bytes. */
export async function peakRssBytes(pid: number): Promise<number> {
  const match = /^VmHWM:\s+(\d+) kB/m.exec(await readFile(`/proc/${pid}/status`, 'utf8'));
  if (match === null) throw new Error(`no VmHWM for pid ${pid}`);
  return Number(match[1]) * 1024;
}

/**
 * How often the page cache has been dropped machine-wide (`drop_pagecache` in /proc/vmstat): a change
 * over a timed run that did not drop it itself means someone else did, and its cache figures are void.
 */
export async function pageCacheDrops(): Promise<number> {
  const match = /^drop_pagecache (\d+)$/m.exec(await readFile('/proc/vmstat', 'utf8'));
  return match === null ? 0 : Number(match[1]);
}

/** User + system CPU seconds a running process has used so far. */
export async function cpuSeconds(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  // Fields resume after the parenthesised command name; utime and stime are fields 14 and 15.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / USER_HZ;
}
