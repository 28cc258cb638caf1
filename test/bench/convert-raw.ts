/**
 * Bench `convert-raw`: `qcow2fuse convert -O raw` against `qemu-img convert -O raw` (the reference),
 * side by side, cold page cache, of one real filesystem stored three ways: a qcow2 image holding an
 * ext4 file system of BENCH_CONVERT_BYTES (default 2 GiB; 40% of it files copied from /usr/lib and
 * /usr/share/doc by `mke2fs -d`), made by qemu-img convert uncompressed, compressed with zlib and
 * compressed with zstd. Both tools run as processes and write a sparse raw file, unsynced (qemu-img
 * convert's default cache=unsafe; ours by default too). Our output is checked against the file system
 * image it came from on the first repetition.
 */
import { rm } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { makeExt4Image, sha256File } from '../helpers/files.js';
import type { Benchmark, BenchRow } from './harness.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;

/** dist/test/bench → dist/src/cli/main.js */
const CLI = resolve(dirname(fileURLToPath(import.meta.url)), '../../src/cli/main.js');

interface Source {
  label: string;
  path: string;
  /** qemu-img convert options that make it from the raw file system image. */
  convertArgs: string[];
}

export const benchmark: Benchmark = {
  name: 'convert-raw',
  description: '`qcow2fuse convert -O raw` vs `qemu-img convert -O raw` of a qcow2 image holding an ext4 file system ' +
    '(BENCH_CONVERT_BYTES, default 2 GiB, 40% files): uncompressed, zlib and zstd compressed; cold cache, output not synced (qemu-img\'s default).',
  async run(ctx) {
    const sizeBytes = ctx.envBytes('BENCH_CONVERT_BYTES', 2 * GiB);
    const raw = join(ctx.dir, 'fs.raw');
    ctx.log(`convert-raw: building a ${sizeBytes / MiB} MiB ext4 image`);
    const fs = await makeExt4Image(raw, { sizeBytes, stagingDir: join(ctx.dir, 'staging') });
    ctx.log(`convert-raw: ${fs.files} files, ${(fs.dataBytes / MiB).toFixed(0)} MiB of file data`);
    const expected = await sha256File(raw);
    const sources: Source[] = [
      { label: 'uncompressed', path: join(ctx.dir, 'plain.qcow2'), convertArgs: [] },
      { label: 'zlib', path: join(ctx.dir, 'zlib.qcow2'), convertArgs: ['-c'] },
      { label: 'zstd', path: join(ctx.dir, 'zstd.qcow2'), convertArgs: ['-c', '-o', 'compression_type=zstd'] },
    ];
    for (const source of sources) {
      ctx.log(`convert-raw: making the ${source.label} qcow2 image with qemu-img convert`);
      await ctx.exec('qemu-img', ['convert', ...source.convertArgs, '-O', 'qcow2', raw, source.path]);
    }
    await rm(raw);
    const out = join(ctx.dir, 'out.raw');
    const tools = [
      { tool: 'qemu-img convert -O raw', reference: true, args: (src: string) => ['qemu-img', ['convert', '-O', 'raw', src, out]] as const },
      { tool: 'qcow2fuse convert -O raw', reference: false, args: (src: string) => [process.execPath, [CLI, 'convert', '-O', 'raw', src, out]] as const },
    ];
    const rows: BenchRow[] = [];
    for (let rep = 1; rep <= ctx.reps; rep++) {
      for (const source of sources) {
        for (const t of tools) {
          await rm(out, { force: true });
          ctx.log(`convert-raw rep ${rep}: ${source.label}: ${t.tool}`);
          const row: BenchRow = {
            workload: `convert -O raw, ${sizeBytes / GiB} GiB ext4, ${source.label} qcow2`, tool: t.tool, reference: t.reference, rep, seconds: 0, bytes: sizeBytes,
          };
          try {
            const [command, args] = t.args(source.path);
            const timed = await ctx.timed(() => ctx.exec(command, args));
            row.seconds = timed.seconds;
            row.metrics = { 'Δ Cached MiB': timed.cachedGrowthBytes / MiB };
            if (rep === 1 && (await sha256File(out)) !== expected) throw new Error(`${t.tool} output differs from the file system image`);
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
