/**
 * Bench `compress-ingest` (issue 7): cp/dd into a compressed mount (`qcow2fuse mount -o compress`)
 * against `qemu-img convert -c -O qcow2` file to file (the reference) and qemu-storage-daemon's FUSE
 * export over a `compress` filter node (dd bs=1M into it, cache.direct=off and on), measured as
 * /work/shared/bench/anchors.sh measures them, side by side in one run, for zlib and zstd:
 *
 *  - data sets: a sparse ext4 image of BENCH_INGEST_BYTES (default 2 GiB) made by `mke2fs -d` from
 *    /usr/lib/x86_64-linux-gnu and /usr/share (file data up to 2/3 of the size, as the anchors' 1.35 GB
 *    in 2 GiB), and a disk of BENCH_INGEST_ONES_BYTES (default 1 GiB) where every byte is 0xFF;
 *  - page cache dropped before every timed run; wall time includes durability: `cp SRC MNT/disk.raw`
 *    then `sync MNT/disk.raw` (fsync), `dd … conv=notrunc,fsync`, `qemu-img convert` then `sync OUT`;
 *    mounts are made before and unmounted after the timed part;
 *  - right after the run (still mounted): `img cache MiB` = fincore of the image file; `mount file
 *    cache MiB` = the FUSE mount file's page cache, through a descriptor opened before the run
 *    (mincore; 0 for a direct_io file — fincore cannot see it, its own open drops it);
 *    `Δcache−src` = growth of `Cached:` in /proc/meminfo over the run minus fincore of the source
 *    (anchors.sh's measure: machine-wide, so on a shared, loaded machine it carries everyone's I/O),
 *    in MiB and in % of the data set's size; `RSS MiB` = peak VmHWM of the daemon (qcow2fuse /
 *    qemu-storage-daemon) or of qemu-img; `CPU s` = user+sys of the daemon and the client (cp/dd)
 *    or of qemu-img; `load1` at the start; `foreign drops` = drop_caches by someone else during the
 *    run (then Δcache is understated);
 *  - `out MiB` (file size), `alloc MiB` (allocated), `size vs qemu-img` (file size / the reference's);
 *  - each output is checked on repetition 1: `qemu-img check` clean and `qemu-img compare` identical.
 * Our rows are held to the acceptance bounds — daemon peak RSS < 300 MiB; on the ext4 data set, page
 * cache created (image + mount file, per file: the noise-free form of Δcache−src) ≤ 2% of the data and
 * image cache ≤ 1% of the image — and a violation is reported as a failed "bounds" row.
 *
 * Ours runs as mounted by default (disk.raw direct_io) and with `-o writeback_cache` (the kernel
 * caches the writes, the session drops the pages once written back). Subsets: BENCH_INGEST_TOOLS,
 * BENCH_INGEST_CODECS, BENCH_INGEST_DATASETS (see selected()).
 *
 * BENCH_INGEST_CPU_PROF=DIR runs our daemon with `node --cpu-prof --cpu-prof-dir=DIR` (one profile per
 * mount, written when it exits); UV_THREADPOOL_SIZE and DEBUG pass through to it.
 */
import { readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import {
  checkIngested, cpuSeconds, createEmptyImage, expectSuccess, IngestMount, MiB, openResidencyProbe, peakRssBytes, start,
  writeOnesFile, type Codec,
} from '../helpers/compress-ingest.js';
import { waitForExit } from '../helpers/exec.js';
import { run } from '../helpers/exec.js';
import { makeExt4Image } from '../helpers/files.js';
import { forceUnmount, waitForMount } from '../helpers/mount.js';
import type { BenchContext, Benchmark, BenchRow } from './harness.js';

const GiB = 2 ** 30;
const MAX_RSS_BYTES = 300 * MiB;

interface Dataset {
  kind: 'ext4' | 'ones';
  label: string;
  path: string;
  bytes: number;
}

/** What one run measured besides its wall time. */
interface Measurement {
  seconds: number;
  cachedGrowthBytes: number;
  foreignDrops: number;
  load1: number;
  rssBytes: number;
  cpuSeconds: number;
  imageResident: number;
  sourceResident: number;
  /** The mount file's page cache (0 for a direct_io file), undefined for file-to-file runs. */
  mountFileResident?: number;
}

interface Case {
  tool: string;
  reference?: boolean;
  /** Set up (untimed), run the timed part, measure, tear down (untimed). */
  run(ctx: BenchContext, data: Dataset, codec: Codec, image: string): Promise<Measurement>;
}

async function dropPagecacheCount(): Promise<number> {
  return Number(/^drop_pagecache (\d+)/m.exec(await readFile('/proc/vmstat', 'utf8'))?.[1] ?? 0);
}

async function load1(): Promise<number> {
  return Number((await readFile('/proc/loadavg', 'utf8')).split(' ')[0]);
}

/** Run a command under GNU time: its peak RSS and CPU seconds. Throws on a non-zero exit. */
async function timedCommand(dir: string, command: string, args: readonly string[]): Promise<{ rssBytes: number; cpuSeconds: number }> {
  const out = join(dir, '.time');
  expectSuccess(`${command} ${args.join(' ')}`, await run('/usr/bin/time', ['-f', '%M %U %S', '-o', out, command, ...args], { timeoutMs: 3_600_000 }));
  const [rssKb, user, sys] = (await readFile(out, 'utf8')).trim().split('\n').at(-1)?.split(' ').map(Number) ?? [];
  return { rssBytes: (rssKb ?? 0) * 1024, cpuSeconds: (user ?? 0) + (sys ?? 0) };
}

/**
 * Time `fn` the harness's way (page cache dropped first, `Cached:` growth recorded) and take the
 * measurements that belong right after it.
 */
async function measure(ctx: BenchContext, data: Dataset, image: string, fn: () => Promise<{ rssBytes: number; cpuSeconds: number }>,
  mountFile?: string): Promise<Measurement> {
  let drops = 0;
  let load = 0;
  // Opened before the copy: only such a descriptor sees what the copy leaves in a FUSE file's cache.
  const probe = mountFile === undefined ? undefined : await openResidencyProbe(mountFile);
  try {
    const timed = await ctx.timed(async () => {
      drops = await dropPagecacheCount();
      load = await load1();
      return fn();
    });
    const mountFileResident = await probe?.measure(data.bytes);
    return {
      seconds: timed.seconds, cachedGrowthBytes: timed.cachedGrowthBytes, foreignDrops: (await dropPagecacheCount()) - drops, load1: load,
      ...timed.value, imageResident: await ctx.residentBytes(image), sourceResident: await ctx.residentBytes(data.path),
      ...(mountFileResident === undefined ? {} : { mountFileResident: mountFileResident === 'direct_io' ? 0 : mountFileResident }),
    };
  } finally {
    await probe?.close();
  }
}

const qemuImgConvert: Case = {
  tool: 'qemu-img convert -c -O qcow2',
  reference: true,
  async run(ctx, data, codec, image) {
    const args = ['convert', '-c', '-O', 'qcow2', ...(codec === 'zstd' ? ['-o', 'compression_type=zstd'] : []), data.path, image];
    return measure(ctx, data, image, async () => {
      const used = await timedCommand(ctx.dir, 'qemu-img', args);
      expectSuccess('sync', await run('sync', [image]));
      return used;
    });
  },
};

/** Our mount: an empty image (size 0 for cp, which grows it; the data set's size for dd), -o compress (and `extra`). */
function ours(tool: string, client: (src: string, disk: string) => [string, string[]], grows: boolean, extra: string[] = []): Case {
  const options = ['compress', ...extra];
  return {
    tool: `qcow2fuse -o ${options.join(',')}: ${tool}`,
    async run(ctx, data, codec, image) {
      await createEmptyImage(image, grows ? 0 : data.bytes, codec);
      const profileDir = process.env.BENCH_INGEST_CPU_PROF;
      const nodeArgs = profileDir === undefined || profileDir === '' ? [] : ['--cpu-prof', `--cpu-prof-dir=${profileDir}`];
      const m = new IngestMount(image, join(ctx.dir, 'mnt'), join(ctx.dir, 'run'), {}, nodeArgs);
      const pid = await m.mount(options);
      try {
        const cpuBefore = await cpuSeconds(pid);
        const measured = await measure(ctx, data, image, async () => {
          const [command, args] = client(data.path, m.disk);
          const used = await timedCommand(ctx.dir, command, args);
          if (grows) expectSuccess('sync', await run('sync', [m.disk]));
          return { rssBytes: await peakRssBytes(pid), cpuSeconds: used.cpuSeconds + (await cpuSeconds(pid)) - cpuBefore };
        }, m.disk);
        await m.unmount();
        await waitForExit(pid);
        return measured;
      } finally {
        await m.cleanup();
      }
    },
  };
}

/** qemu-storage-daemon exporting IMG over a compress filter on a FUSE file, as anchors.sh's qsd_start. */
function qsd(direct: 'on' | 'off'): Case {
  return {
    tool: `qemu-storage-daemon fuse+compress cache.direct=${direct}: dd bs=1M`,
    async run(ctx, data, codec, image) {
      await createEmptyImage(image, data.bytes, codec);
      const mnt = join(ctx.dir, 'qsd.mnt');
      await writeFile(mnt, '');
      const daemon = start('qemu-storage-daemon', [
        '--blockdev', `driver=file,node-name=f,filename=${image},cache.direct=${direct}`,
        '--blockdev', 'driver=qcow2,node-name=q,file=f',
        '--blockdev', 'driver=compress,node-name=c,file=q',
        '--export', `type=fuse,id=e,node-name=c,mountpoint=${mnt},writable=on`,
      ]);
      try {
        const died = daemon.done.then((r) => Promise.reject(new Error(`qemu-storage-daemon exited ${r.code}: ${r.stderr.trim()}`)));
        died.catch(() => undefined);
        await Promise.race([waitForMount(mnt, 20_000), died]);
        const cpuBefore = await cpuSeconds(daemon.pid);
        return await measure(ctx, data, image, async () => {
          const used = await timedCommand(ctx.dir, 'dd', [`if=${data.path}`, `of=${mnt}`, 'bs=1M', 'conv=notrunc,fsync', 'status=none']);
          return { rssBytes: await peakRssBytes(daemon.pid), cpuSeconds: used.cpuSeconds + (await cpuSeconds(daemon.pid)) - cpuBefore };
        }, mnt);
      } finally {
        await forceUnmount(mnt);
        process.kill(daemon.pid, 'SIGTERM');
        await daemon.done;
        await rm(mnt, { force: true });
      }
    },
  };
}

const ddInto = (bs: string) => (src: string, disk: string): [string, string[]] => ['dd', [`if=${src}`, `of=${disk}`, `bs=${bs}`, 'conv=notrunc,fsync', 'status=none']];

const CASES: Case[] = [
  qemuImgConvert,
  ours('cp', (src, disk) => ['cp', [src, disk]], true),
  ours('dd bs=1M', ddInto('1M'), false),
  ours('dd bs=4k', ddInto('4k'), false),
  ours('cp', (src, disk) => ['cp', [src, disk]], true, ['writeback_cache']),
  ours('dd bs=1M', ddInto('1M'), false, ['writeback_cache']),
  ours('dd bs=4k', ddInto('4k'), false, ['writeback_cache']),
  qsd('off'),
  qsd('on'),
];

/**
 * The subsets to run: BENCH_INGEST_TOOLS (comma-separated substrings of the tool names; the
 * reference always runs), BENCH_INGEST_CODECS (zlib,zstd) and BENCH_INGEST_DATASETS (ext4,ones).
 */
function selected<T>(variable: string, all: readonly T[], name: (item: T) => string, keep: (item: T) => boolean = () => false): T[] {
  const wanted = (process.env[variable] ?? '').split(',').map((w) => w.trim()).filter((w) => w !== '');
  return wanted.length === 0 ? [...all] : all.filter((item) => keep(item) || wanted.some((w) => name(item).includes(w)));
}

async function makeDatasets(ctx: BenchContext): Promise<Dataset[]> {
  const ext4Bytes = ctx.envBytes('BENCH_INGEST_BYTES', 2 * GiB);
  const onesBytes = ctx.envBytes('BENCH_INGEST_ONES_BYTES', GiB);
  const disk: Dataset = { kind: 'ext4', label: `${ext4Bytes / GiB} GiB ext4`, path: join(ctx.dir, 'disk.raw'), bytes: ext4Bytes };
  ctx.log(`compress-ingest: building the ${disk.label} data set (mke2fs -d of /usr/lib/x86_64-linux-gnu and /usr/share)`);
  const fs = await makeExt4Image(disk.path, {
    sizeBytes: ext4Bytes, dataBytes: Math.floor(ext4Bytes * 0.63), sources: ['/usr/lib/x86_64-linux-gnu', '/usr/share'], stagingDir: join(ctx.dir, 'staging'),
  });
  ctx.log(`compress-ingest: ${fs.files} files, ${(fs.dataBytes / MiB).toFixed(0)} MiB of file data, ${((await stat(disk.path)).blocks * 512 / MiB).toFixed(0)} MiB allocated`);
  const ones: Dataset = { kind: 'ones', label: `${onesBytes / GiB} GiB of 0xFF`, path: join(ctx.dir, 'ones.raw'), bytes: onesBytes };
  await writeOnesFile(ones.path, onesBytes);
  return [disk, ones];
}

export const benchmark: Benchmark = {
  name: 'compress-ingest',
  description: 'cp / dd bs=1M / dd bs=4k into `qcow2fuse mount -o compress` vs `qemu-img convert -c -O qcow2` (reference) and ' +
    'qemu-storage-daemon FUSE export over a compress filter (dd bs=1M, cache.direct=off/on); 2 GiB ext4 (BENCH_INGEST_BYTES) and ' +
    '1 GiB of 0xFF (BENCH_INGEST_ONES_BYTES); zlib and zstd; cold cache, durable (fsync) times; Δcache−src = Cached: growth minus fincore SRC.',
  async run(ctx) {
    const datasets = selected('BENCH_INGEST_DATASETS', await makeDatasets(ctx), (d) => d.kind);
    const cases = selected('BENCH_INGEST_TOOLS', CASES, (c) => c.tool, (c) => c.reference === true);
    const codecs = selected('BENCH_INGEST_CODECS', ['zlib', 'zstd'] as const, (c) => c);
    const image = join(ctx.dir, 'out.qcow2');
    const rows: BenchRow[] = [];
    for (let rep = 1; rep <= ctx.reps; rep++) {
      for (const data of datasets) {
        for (const codec of codecs) {
          const workload = `ingest ${data.label}, ${codec}`;
          let referenceBytes: number | undefined;
          for (const c of cases) {
            await rm(image, { force: true });
            ctx.log(`compress-ingest rep ${rep}: ${workload}: ${c.tool} (load ${await load1()})`);
            const row: BenchRow = { workload, tool: c.tool, reference: c.reference === true, rep, seconds: 0, bytes: data.bytes };
            const violations: string[] = [];
            try {
              const m = await c.run(ctx, data, codec, image);
              const info = await stat(image);
              if (c.reference === true) referenceBytes = info.size;
              const pollution = m.cachedGrowthBytes - m.sourceResident;
              row.seconds = m.seconds;
              row.metrics = {
                'out MiB': info.size / MiB, 'alloc MiB': info.blocks * 512 / MiB,
                'size vs qemu-img': referenceBytes === undefined ? NaN : info.size / referenceBytes,
                'img cache MiB': m.imageResident / MiB, 'mount file cache MiB': (m.mountFileResident ?? 0) / MiB,
                'Δcache−src MiB': pollution / MiB, 'Δcache−src %': 100 * pollution / data.bytes,
                'RSS MiB': m.rssBytes / MiB, 'CPU s': m.cpuSeconds, load1: m.load1, 'foreign drops': m.foreignDrops,
              };
              ctx.log(`  ${m.seconds.toFixed(2)} s, ${JSON.stringify(row.metrics)}`);
              if (rep === 1) await checkIngested(image, data.path);
              if (c.tool.startsWith('qcow2fuse')) {
                if (m.rssBytes >= MAX_RSS_BYTES) violations.push(`daemon peak RSS ${(m.rssBytes / MiB).toFixed(0)} MiB ≥ 300 MiB`);
                // The page-cache bounds are defined on the file system data set (the 0xFF image is nearly all metadata).
                if (data.kind === 'ext4') {
                  const perFile = m.imageResident + (m.mountFileResident ?? 0);
                  if (perFile > 0.02 * data.bytes) violations.push(`page cache of image + mount file ${(perFile / MiB).toFixed(1)} MiB > 2% of the data`);
                  if (m.imageResident > 0.01 * info.size) violations.push(`image cache ${(m.imageResident / MiB).toFixed(1)} MiB > 1% of the image`);
                }
              }
            } catch (error) {
              row.error = error instanceof Error ? error.message : String(error);
              ctx.log(`  FAILED: ${row.error}`);
            }
            rows.push(row);
            if (violations.length > 0) {
              ctx.log(`  bounds violated: ${violations.join('; ')}`);
              rows.push({ workload: `bounds: ${workload}`, tool: c.tool, rep, seconds: 0, bytes: data.bytes, error: violations.join('; ') });
            }
          }
        }
      }
    }
    await rm(image, { force: true });
    return rows;
  },
};
