/**
 * Bench `mount-io`: I/O through `qcow2fuse mount` against qemu-storage-daemon's FUSE export of a
 * qcow2 node on a file (the reference: cache.direct=off; cache.direct=on beside it, as in
 * bench/anchor-baseline.md), side by side in one run, page cache dropped before every timed run:
 *
 * - read: `dd bs=1M` of the whole raw file of a qcow2 image holding an ext4 file system of
 *   BENCH_MOUNTIO_BYTES (default 2 GiB; 40% of it files from /usr/lib and /usr/share/doc, made by
 *   `mke2fs -d`), converted by qemu-img uncompressed, zlib- and zstd-compressed; mounted read-only
 *   (qsd writable=off, ours -o ro). Rep 1 checks the data with `cmp` against the file system image.
 * - write: `dd bs=1M` and `dd bs=4k` (conv=notrunc,fsync) of that file system image into an empty
 *   image of its size (`qemu-img create` for qsd, `qcow2fuse create` for ours). Every image gets
 *   `qemu-img check`; rep 1 also `qemu-img compare` against the source.
 * Ours runs twice: as mounted by default (read-write: the kernel's writeback cache, which caches
 * writes and sends them coalesced) and with `-o no_writeback_cache` (every write(2) one request).
 * - fio: 4 KiB random read/write (randrw 50/50, libaio, iodepth 16, O_DIRECT) over the first
 *   BENCH_MOUNTIO_FIO_BYTES (default 512 MiB) of a copy of the uncompressed image, that many bytes
 *   in all (capped at 300 s). The time is fio's own job run time.
 *
 * Metrics per run: peak RSS (VmHWM) and CPU seconds of the daemon, growth of `Cached:` (page cache
 * the run created, including the mount file's), residency of the qcow2 file, the 1-minute load
 * average at the start and the page-cache drops someone else made during the run (the machine may be
 * shared: such a run's cache figures mean nothing), and for fio the read and write IOPS.
 * BENCH_MOUNTIO_CASES=read,write,fio selects the parts (default all).
 */
import { copyFile, mkdir, rm, writeFile } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { CLI, cpuSeconds, type MountedDaemon, pageCacheDrops, peakRssBytes, startOurMount, startQsdExport } from '../helpers/bench-mount.js';
import { makeExt4Image } from '../helpers/files.js';
import type { BenchContext, Benchmark, BenchRow } from './harness.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const CASES = ['read', 'write', 'fio'] as const;
type Case = (typeof CASES)[number];

interface Tool {
  name: string;
  reference: boolean;
  /** Mount `image`; `writable` false mounts read-only. */
  start(image: string, writable: boolean): Promise<MountedDaemon>;
  /** Make an empty qcow2 image of `bytes` bytes, the way this tool's users would. */
  create(ctx: BenchContext, image: string, bytes: number): Promise<void>;
}

function tools(dir: string): Tool[] {
  const qsdFile = join(dir, 'qsd.mnt');
  const ourDir = join(dir, 'ours.mnt');
  const qemuCreate = async (ctx: BenchContext, image: string, bytes: number) => {
    await ctx.exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(bytes)]);
  };
  return [
    {
      name: 'qemu-storage-daemon fuse, cache.direct=off', reference: true, create: qemuCreate,
      start: async (image, writable) => {
        await writeFile(qsdFile, '');
        return startQsdExport(image, qsdFile, { direct: false, writable });
      },
    },
    {
      name: 'qemu-storage-daemon fuse, cache.direct=on', reference: false, create: qemuCreate,
      start: async (image, writable) => {
        await writeFile(qsdFile, '');
        return startQsdExport(image, qsdFile, { direct: true, writable });
      },
    },
    {
      name: 'qcow2fuse mount', reference: false,
      create: async (ctx, image, bytes) => {
        await ctx.exec(process.execPath, [CLI, 'create', '-q', image, String(bytes)]);
      },
      start: async (image, writable) => {
        await mkdir(ourDir, { recursive: true });
        return startOurMount(image, ourDir, writable ? [] : ['ro']);
      },
    },
    {
      name: 'qcow2fuse mount -o no_writeback_cache', reference: false,
      create: async (ctx, image, bytes) => {
        await ctx.exec(process.execPath, [CLI, 'create', '-q', image, String(bytes)]);
      },
      start: async (image, writable) => {
        await mkdir(ourDir, { recursive: true });
        return startOurMount(image, ourDir, writable ? ['no_writeback_cache'] : ['ro', 'no_writeback_cache']);
      },
    },
  ];
}

/** What one mounted run measured besides its time. */
interface RunResult<T> {
  seconds: number;
  value: T;
  metrics: Record<string, number>;
}

/**
 * Mount `image` with `tool`, time `work(file)` (cold cache), collect the daemon's metrics, then
 * `after(file)` (checks, still mounted), and always unmount.
 */
async function mountedRun<T>(
  ctx: BenchContext, tool: Tool, image: string, writable: boolean,
  work: (file: string) => Promise<T>, after: (file: string) => Promise<void> = async () => undefined,
): Promise<RunResult<T>> {
  const daemon = await tool.start(image, writable);
  try {
    const load = loadavg()[0] ?? 0;
    const cpuBefore = await cpuSeconds(daemon.pid);
    const timed = await ctx.timed(async () => {
      const drops = await pageCacheDrops();
      const value = await work(daemon.file);
      return { value, foreignDrops: (await pageCacheDrops()) - drops };
    });
    const metrics = {
      'daemon CPU s': (await cpuSeconds(daemon.pid)) - cpuBefore,
      'peak RSS MiB': (await peakRssBytes(daemon.pid)) / MiB,
      'Δ Cached MiB': timed.cachedGrowthBytes / MiB,
      'img cache MiB': (await ctx.residentBytes(image)) / MiB,
      load1: load,
      'foreign cache drops': timed.value.foreignDrops,
    };
    await after(daemon.file);
    return { seconds: timed.seconds, value: timed.value.value, metrics };
  } finally {
    await daemon.stop();
  }
}

function failure(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

async function qemuCheck(ctx: BenchContext, image: string): Promise<void> {
  const { stdout } = await ctx.exec('qemu-img', ['check', image]);
  if (!stdout.includes('No errors were found')) throw new Error(`qemu-img check ${image}: ${stdout.trim()}`);
}

interface FioResult {
  jobs: { job_runtime: number; read: { iops: number; io_bytes: number }; write: { iops: number; io_bytes: number } }[];
}

function selectedCases(): Case[] {
  const text = process.env.BENCH_MOUNTIO_CASES ?? '';
  if (text.trim() === '') return [...CASES];
  const wanted = text.split(',').map((s) => s.trim()).filter((s) => s !== '');
  for (const name of wanted) if (!(CASES as readonly string[]).includes(name)) throw new Error(`BENCH_MOUNTIO_CASES: unknown case '${name}' (${CASES.join(', ')})`);
  return CASES.filter((c) => wanted.includes(c));
}

export const benchmark: Benchmark = {
  name: 'mount-io',
  description: 'I/O through `qcow2fuse mount` vs qemu-storage-daemon\'s FUSE export (qcow2 node on a file; cache.direct=off is the reference): ' +
    'dd bs=1M reads of an ext4 image (BENCH_MOUNTIO_BYTES, default 2 GiB) uncompressed/zlib/zstd, dd bs=1M and bs=4k writes ' +
    'into an empty image, fio 4 KiB randrw iodepth 16 O_DIRECT (BENCH_MOUNTIO_FIO_BYTES, default 512 MiB); cold cache.',
  async run(ctx) {
    const cases = selectedCases();
    const sizeBytes = ctx.envBytes('BENCH_MOUNTIO_BYTES', 2 * GiB);
    const fioBytes = Math.min(ctx.envBytes('BENCH_MOUNTIO_FIO_BYTES', 512 * MiB), sizeBytes);
    const size = sizeBytes % GiB === 0 ? `${sizeBytes / GiB} GiB` : `${sizeBytes / MiB} MiB`;
    const raw = join(ctx.dir, 'fs.raw');
    ctx.log(`mount-io: building a ${size} ext4 image`);
    const fs = await makeExt4Image(raw, { sizeBytes, stagingDir: join(ctx.dir, 'staging') });
    ctx.log(`mount-io: ${fs.files} files, ${(fs.dataBytes / MiB).toFixed(0)} MiB of file data`);
    const sources = [
      { label: 'uncompressed', path: join(ctx.dir, 'plain.qcow2'), convertArgs: [] },
      { label: 'zlib', path: join(ctx.dir, 'zlib.qcow2'), convertArgs: ['-c'] },
      { label: 'zstd', path: join(ctx.dir, 'zstd.qcow2'), convertArgs: ['-c', '-o', 'compression_type=zstd'] },
    ].filter((s) => cases.includes('read') || (cases.includes('fio') && s.label === 'uncompressed'));
    for (const source of sources) {
      ctx.log(`mount-io: making the ${source.label} qcow2 image with qemu-img convert`);
      await ctx.exec('qemu-img', ['convert', ...source.convertArgs, '-O', 'qcow2', raw, source.path]);
    }
    const all = tools(ctx.dir);
    const scratch = join(ctx.dir, 'scratch.qcow2');
    const rows: BenchRow[] = [];
    const record = async (row: BenchRow, body: () => Promise<void>) => {
      try {
        await body();
      } catch (error) {
        row.error = failure(error);
        ctx.log(`mount-io: ${row.workload} / ${row.tool} rep ${row.rep} FAILED: ${row.error}`);
      }
      rows.push(row);
    };
    for (let rep = 1; rep <= ctx.reps; rep++) {
      if (cases.includes('read')) {
        for (const source of sources) {
          for (const tool of all) {
            const row: BenchRow = { workload: `read dd bs=1M, ${size} ext4, ${source.label}`, tool: tool.name, reference: tool.reference, rep, seconds: 0, bytes: sizeBytes };
            ctx.log(`mount-io rep ${rep}: ${row.workload}: ${tool.name}`);
            await record(row, async () => {
              const result = await mountedRun(ctx, tool, source.path, false,
                (file) => ctx.exec('dd', [`if=${file}`, 'of=/dev/null', 'bs=1M', 'status=none']),
                async (file) => { if (rep === 1) await ctx.exec('cmp', [file, raw]); });
              row.seconds = result.seconds;
              row.metrics = result.metrics;
            });
          }
        }
      }
      if (cases.includes('write')) {
        for (const bs of ['1M', '4k']) {
          for (const tool of all) {
            const row: BenchRow = { workload: `write dd bs=${bs} conv=notrunc,fsync, ${size} ext4 into an empty image`, tool: tool.name, reference: tool.reference, rep, seconds: 0, bytes: sizeBytes };
            ctx.log(`mount-io rep ${rep}: ${row.workload}: ${tool.name}`);
            await record(row, async () => {
              await rm(scratch, { force: true });
              await tool.create(ctx, scratch, sizeBytes);
              const result = await mountedRun(ctx, tool, scratch, true,
                (file) => ctx.exec('dd', [`if=${raw}`, `of=${file}`, `bs=${bs}`, 'conv=notrunc,fsync', 'status=none']));
              row.seconds = result.seconds;
              row.metrics = result.metrics;
              await qemuCheck(ctx, scratch);
              if (rep === 1) await ctx.exec('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', raw, scratch]);
            });
          }
        }
      }
      if (cases.includes('fio')) {
        const plain = sources.find((s) => s.label === 'uncompressed');
        if (plain === undefined) throw new Error('mount-io: no uncompressed image for fio');
        for (const tool of all) {
          const row: BenchRow = {
            workload: `fio randrw 4k iodepth 16 libaio O_DIRECT, ${fioBytes / MiB} MiB over ${fioBytes / MiB} MiB of the uncompressed ext4 image`,
            tool: tool.name, reference: tool.reference, rep, seconds: 0, bytes: fioBytes,
          };
          ctx.log(`mount-io rep ${rep}: ${row.workload}: ${tool.name}`);
          await record(row, async () => {
            await rm(scratch, { force: true });
            await copyFile(plain.path, scratch);
            const result = await mountedRun(ctx, tool, scratch, true, async (file) => {
              const { stdout } = await ctx.exec('fio', [
                '--name=randrw', `--filename=${file}`, '--rw=randrw', '--bs=4k', '--iodepth=16', '--ioengine=libaio', '--direct=1',
                `--size=${fioBytes}`, `--io_size=${fioBytes}`, '--runtime=300', '--randseed=1', '--output-format=json',
              ]);
              // fio may print notes before its JSON.
              const job = (JSON.parse(stdout.slice(stdout.indexOf('{'))) as FioResult).jobs[0];
              if (job === undefined) throw new Error(`fio reported no job: ${stdout}`);
              return job;
            });
            row.seconds = result.value.job_runtime / 1000;
            row.bytes = result.value.read.io_bytes + result.value.write.io_bytes;
            row.metrics = { ...result.metrics, 'read IOPS': result.value.read.iops, 'write IOPS': result.value.write.iops };
            await qemuCheck(ctx, scratch);
          });
        }
      }
    }
    await rm(scratch, { force: true });
    return rows;
  },
};
