/**
 * Bench `transport`: what the FUSE path costs with nothing behind it. A null file (64 GiB, reads
 * answer zeros, writes are dropped) served three ways, side by side:
 *   C floor      libfuse3 low-level on one thread (test/bench/c/null-floor.c, built now with gcc)
 *   session      our FUSE session from JavaScript (test/helpers/null-fs-daemon.ts session)
 *   fuse-native  libfuse 2 through fuse-native from JavaScript (null-fs-daemon.ts fuse-native)
 * Workloads (as ../shared/bench/transport/floor.sh): dd bs=4k writes (µs per request), dd bs=1M
 * O_DIRECT reads (GB/s), fio 4k random reads at queue depth 16, O_DIRECT (IOPS). Targets for the
 * session against the floor: 4 KiB write cost ≤ 1.5×, 1 MiB direct read throughput ≥ 0.8× (time
 * ≤ 1.25×), queued random read IOPS ≥ 0.5× (time ≤ 2×).
 * Sizes: BENCH_TRANSPORT_WRITE_BYTES (default 256M), BENCH_TRANSPORT_READ_BYTES (2G),
 * BENCH_TRANSPORT_IOS (100k random reads).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { findMount, forceUnmount } from '../helpers/mount.js';
import type { Benchmark, BenchContext, BenchRow } from './harness.js';

const here = dirname(fileURLToPath(import.meta.url));
/** dist/test/bench → the package root. */
const packageRoot = resolve(here, '../../..');
const FLOOR_SOURCE = join(packageRoot, 'test/bench/c/null-floor.c');
const NULL_DAEMON = resolve(here, '../helpers/null-fs-daemon.js');
const MiB = 2 ** 20;

interface Server {
  tool: string;
  reference: boolean;
  start(mountpoint: string): ChildProcess;
}

async function buildFloor(ctx: BenchContext): Promise<string> {
  const binary = join(ctx.dir, 'null-floor');
  const flags = (await ctx.exec('pkg-config', ['--cflags', '--libs', 'fuse3'])).stdout.trim().split(/\s+/);
  await ctx.exec('gcc', ['-O2', '-o', binary, FLOOR_SOURCE, ...flags]);
  return binary;
}

/** Start a server and wait until its mount is in the mount table. */
async function serve(server: Server, mountpoint: string): Promise<ChildProcess> {
  const child = server.start(mountpoint);
  let exited = false;
  child.on('exit', () => { exited = true; });
  for (let i = 0; i < 300; i++) {
    if ((await findMount(mountpoint)) !== undefined) return child;
    if (exited) break;
    await sleep(20);
  }
  child.kill('SIGKILL');
  throw new Error(`${server.tool}: the null file system did not mount on ${mountpoint}`);
}

async function stop(child: ChildProcess, mountpoint: string): Promise<void> {
  const gone = new Promise((resolveExit) => child.once('exit', resolveExit));
  if (child.exitCode === null) child.kill('SIGTERM');
  await forceUnmount(mountpoint);
  await Promise.race([gone, sleep(5000)]);
  if (child.exitCode === null) child.kill('SIGKILL');
}

interface Workload {
  name: string;
  /** Run it on `file`; returns [seconds, bytes, metrics]. */
  run(ctx: BenchContext, file: string): Promise<[number, number, Record<string, number>]>;
}

function workloads(ctx: BenchContext): Workload[] {
  const writeBytes = ctx.envBytes('BENCH_TRANSPORT_WRITE_BYTES', 256 * MiB);
  const readBytes = ctx.envBytes('BENCH_TRANSPORT_READ_BYTES', 2048 * MiB);
  const ios = ctx.envBytes('BENCH_TRANSPORT_IOS', 100_000);
  return [
    {
      name: `dd bs=4k write ${writeBytes / MiB} MiB`,
      async run(c, file) {
        const count = writeBytes / 4096;
        const { seconds } = await c.timed(() => c.exec('dd', ['if=/dev/zero', `of=${file}`, 'bs=4k', `count=${count}`, 'conv=notrunc', 'status=none']), { cold: false });
        return [seconds, writeBytes, { 'µs/request': (seconds / count) * 1e6 }];
      },
    },
    {
      name: `dd bs=1M O_DIRECT read ${readBytes / MiB} MiB`,
      async run(c, file) {
        const { seconds } = await c.timed(() => c.exec('dd', [`if=${file}`, 'of=/dev/null', 'bs=1M', `count=${readBytes / MiB}`, 'iflag=direct', 'status=none']), { cold: false });
        return [seconds, readBytes, { 'GB/s': readBytes / seconds / 1e9 }];
      },
    },
    {
      name: `fio 4k randread qd16 O_DIRECT ${ios} I/Os`,
      async run(c, file) {
        const { stdout } = await c.exec('fio', ['--name=r', `--filename=${file}`, '--rw=randread', '--bs=4k', '--size=1G', '--iodepth=16',
          '--ioengine=libaio', '--direct=1', `--number_ios=${ios}`, '--output-format=terse']);
        const iops = Number(stdout.split(';')[7]);
        if (!(iops > 0)) throw new Error(`fio reported no IOPS: ${stdout.slice(0, 200)}`);
        return [ios / iops, ios * 4096, { IOPS: iops }];
      },
    },
  ];
}

export const benchmark: Benchmark = {
  name: 'transport',
  description: 'A null file through the FUSE transport alone: our session from JS and fuse-native from JS vs the C floor ' +
    '(libfuse3 low-level, one thread). Targets for the session: 4k write ≤ 1.5× the floor\'s time, 1M direct read ≤ 1.25× ' +
    '(≥ 0.8× throughput), queued random reads ≤ 2× (≥ 0.5× IOPS).',
  async run(ctx) {
    const floor = await buildFloor(ctx);
    const servers: Server[] = [
      { tool: 'C floor (libfuse3 ll, 1 thread)', reference: true, start: (mnt) => spawn(floor, [mnt], { stdio: 'ignore' }) },
      { tool: 'session (JS)', reference: false, start: (mnt) => spawn(process.execPath, [NULL_DAEMON, 'session', mnt], { stdio: 'ignore' }) },
      { tool: 'fuse-native (JS)', reference: false, start: (mnt) => spawn(process.execPath, [NULL_DAEMON, 'fuse-native', mnt], { stdio: 'ignore' }) },
    ];
    const mountpoint = join(ctx.dir, 'mnt');
    await mkdir(mountpoint, { recursive: true });
    const rows: BenchRow[] = [];
    for (let rep = 1; rep <= ctx.reps; rep++) {
      const order = servers.map((_, i) => servers[(i + rep - 1) % servers.length]);
      for (const server of order) {
        const child = await serve(server, mountpoint);
        try {
          for (const workload of workloads(ctx)) {
            try {
              const [seconds, bytes, metrics] = await workload.run(ctx, join(mountpoint, 'f'));
              rows.push({ workload: workload.name, tool: server.tool, reference: server.reference, rep, seconds, bytes, metrics });
            } catch (err) {
              rows.push({ workload: workload.name, tool: server.tool, reference: server.reference, rep, seconds: 0, bytes: 0, error: String(err) });
            }
          }
        } finally {
          await stop(child, mountpoint);
        }
      }
    }
    return rows;
  },
};
