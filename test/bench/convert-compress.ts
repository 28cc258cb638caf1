/**
 * Bench `convert-c` (issue 13): `qcow2fuse convert` raw → qcow2 against `qemu-img convert` (the
 * reference) of the same raw disk: a sparse ext4 image of BENCH_CONVERT_C_BYTES (default 2 GiB)
 * made by `mke2fs -d` with file data up to 63% of it (the compress-ingest data set), side by side in
 * one run: `-c` with zlib and zstd, from the file and through a pipe (`cat disk.raw | qcow2fuse
 * convert -c -O qcow2 - out.qcow2`; qemu-img cannot read a pipe, so its reference stays the file),
 * and uncompressed. Cold page cache; the wall time includes durability (`sync OUT` after the
 * convert). Metrics: `out MiB` (allocated), `size vs qemu-img`, `out cache MiB` (fincore of the
 * output right after: the page cache the output left, ≤ 2% of the data is the bound for -c) and
 * `Δ Cached MiB` (machine-wide growth, noisy on a shared machine). Each output is checked on
 * repetition 1: `qemu-img compare` identical with the raw disk and `qemu-img check` clean.
 *
 * BENCH_CONVERT_C_PROF=DIR runs ours under `node --cpu-prof --cpu-prof-dir=DIR`.
 */
import { rm, stat } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { makeExt4Image } from '../helpers/files.js';
import type { BenchContext, Benchmark, BenchRow } from './harness.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;

/** dist/test/bench → dist/src/cli/main.js */
const CLI = resolve(dirname(fileURLToPath(import.meta.url)), '../../src/cli/main.js');

interface Variant {
  label: string;
  /** qemu-img convert / qcow2fuse convert options. */
  args: string[];
  /** Also run ours through a pipe. */
  pipe: boolean;
}

const VARIANTS: Variant[] = [
  { label: 'zlib', args: ['-c'], pipe: true },
  { label: 'zstd', args: ['-c', '-o', 'compression_type=zstd'], pipe: true },
  { label: 'uncompressed', args: [], pipe: false },
];

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function nodeArgs(): string[] {
  const prof = process.env.BENCH_CONVERT_C_PROF;
  return prof ? ['--cpu-prof', `--cpu-prof-dir=${prof}`] : [];
}

interface Tool {
  tool: string;
  reference: boolean;
  command(disk: string, variant: Variant, out: string): [string, string[]];
}

const TOOLS: Tool[] = [
  { tool: 'qemu-img convert', reference: true, command: (disk, v, out) => ['qemu-img', ['convert', ...v.args, '-O', 'qcow2', disk, out]] },
  { tool: 'qcow2fuse convert', reference: false, command: (disk, v, out) => [process.execPath, [...nodeArgs(), CLI, 'convert', ...v.args, '-O', 'qcow2', disk, out]] },
  {
    tool: 'cat | qcow2fuse convert -', reference: false,
    command: (disk, v, out) => ['sh', ['-c', `cat ${shellQuote(disk)} | ${[process.execPath, ...nodeArgs(), CLI, 'convert', ...v.args, '-O', 'qcow2', '-', out].map(shellQuote).join(' ')}`]],
  },
];

async function allocatedBytes(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}

/** One timed conversion (convert + sync OUT) and its measurements; checks the output on rep 1. */
async function measure(ctx: BenchContext, t: Tool, v: Variant, disk: string, out: string, row: BenchRow, sizeBytes: number): Promise<number> {
  await rm(out, { force: true });
  const [command, args] = t.command(disk, v, out);
  const timed = await ctx.timed(async () => {
    await ctx.exec(command, args);
    await ctx.exec('sync', [out]);
  });
  row.seconds = timed.seconds;
  const allocated = await allocatedBytes(out);
  row.metrics = {
    'out MiB': allocated / MiB, 'out cache MiB': (await ctx.residentBytes(out)) / MiB, 'out cache % of data': (100 * (await ctx.residentBytes(out))) / sizeBytes,
    'Δ Cached MiB': timed.cachedGrowthBytes / MiB,
  };
  if (row.rep === 1) {
    await ctx.exec('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', disk, out]);
    await ctx.exec('qemu-img', ['check', '-q', out]);
  }
  return allocated;
}

export const benchmark: Benchmark = {
  name: 'convert-c',
  description: '`qcow2fuse convert [-c] -O qcow2` (file and pipe) vs `qemu-img convert [-c] -O qcow2` of a 2 GiB ext4 raw disk ' +
    '(BENCH_CONVERT_C_BYTES): zlib, zstd, uncompressed; cold cache, durable (sync OUT).',
  async run(ctx) {
    const sizeBytes = ctx.envBytes('BENCH_CONVERT_C_BYTES', 2 * GiB);
    const disk = join(ctx.dir, 'disk.raw');
    ctx.log(`convert-c: building a ${sizeBytes / MiB} MiB ext4 image`);
    await makeExt4Image(disk, { sizeBytes, dataBytes: Math.floor(sizeBytes * 0.63), sources: ['/usr/lib/x86_64-linux-gnu', '/usr/share'], stagingDir: join(ctx.dir, 'staging') });
    const out = join(ctx.dir, 'out.qcow2');
    const rows: BenchRow[] = [];
    for (let rep = 1; rep <= ctx.reps; rep++) {
      for (const v of VARIANTS) {
        let referenceBytes = 0;
        for (const t of TOOLS) {
          if (t.tool.startsWith('cat') && !v.pipe) continue;
          ctx.log(`convert-c rep ${rep}: ${v.label}: ${t.tool}`);
          const row: BenchRow = { workload: `convert ${v.args.join(' ')} -O qcow2, ${sizeBytes / GiB} GiB ext4 (${v.label})`, tool: t.tool, reference: t.reference, rep, seconds: 0, bytes: sizeBytes };
          try {
            const allocated = await measure(ctx, t, v, disk, out, row, sizeBytes);
            if (t.reference) referenceBytes = allocated;
            else if (referenceBytes > 0) row.metrics!['size vs qemu-img'] = allocated / referenceBytes;
          } catch (error) {
            row.error = error instanceof Error ? error.message : String(error);
          }
          rows.push(row);
        }
      }
    }
    await rm(out, { force: true });
    return rows;
  },
};
