/**
 * Bench `prealloc` (seed 002): 4 KiB sequential writes into an empty 4 GiB qcow2 image, 64 in flight,
 * O_DIRECT — `qemu-img bench -w -s 4k -c COUNT -d 64 -n -t none` (the reference) against
 * `qcow2fuse bench` with the same workload, with preallocation (fallocate ZERO_RANGE ahead of the
 * end of file) and without (`--no-prealloc`). COUNT = BENCH_PREALLOC_COUNT (default 262144 = 1 GiB).
 * Every image is checked with `qemu-img check` afterwards.
 */
import { rm } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Benchmark, BenchRow } from './harness.js';

/** dist/test/bench → dist/src/cli/main.js */
const CLI = resolve(dirname(fileURLToPath(import.meta.url)), '../../src/cli/main.js');

export const benchmark: Benchmark = {
  name: 'prealloc',
  description: '4 KiB writes into an empty 4 GiB image (depth 64, O_DIRECT): qemu-img bench vs qcow2fuse bench with and without preallocation.',
  async run(ctx) {
    const count = ctx.envBytes('BENCH_PREALLOC_COUNT', 262144);
    const image = join(ctx.dir, 'bench.qcow2');
    const workload = ['-w', '-s', '4k', '-c', String(count), '-d', '64'];
    const tools = [
      { tool: 'qemu-img bench -t none', reference: true, cmd: ['qemu-img', ['bench', ...workload, '-n', '-t', 'none', image]] as const },
      { tool: 'qcow2fuse bench -t none (prealloc)', reference: false, cmd: [process.execPath, [CLI, 'bench', ...workload, '-t', 'none', image]] as const },
      { tool: 'qcow2fuse bench -t none --no-prealloc', reference: false, cmd: [process.execPath, [CLI, 'bench', ...workload, '-t', 'none', '--no-prealloc', image]] as const },
    ];
    const rows: BenchRow[] = [];
    for (let rep = 1; rep <= ctx.reps; rep++) {
      for (const t of tools) {
        await rm(image, { force: true });
        await ctx.exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, '4G']);
        const row: BenchRow = { workload: `4 KiB writes x ${count}, empty 4 GiB image`, tool: t.tool, reference: t.reference, rep, seconds: 0, bytes: count * 4096 };
        try {
          const [command, args] = t.cmd;
          const timed = await ctx.timed(async () => {
            const { stdout } = await ctx.exec(command, [...args]);
            // Both tools report the run time without process start-up: use it.
            const m = /Run completed in ([\d.]+) seconds/.exec(stdout);
            if (!m) throw new Error(`no run time in output: ${stdout}`);
            return Number(m[1]);
          });
          row.seconds = timed.value;
          const check = await ctx.exec('qemu-img', ['check', image]);
          if (!check.stdout.includes('No errors were found')) throw new Error(`qemu-img check: ${check.stdout}`);
        } catch (error) {
          row.error = error instanceof Error ? error.message : String(error);
        }
        rows.push(row);
      }
    }
    await rm(image, { force: true });
    return rows;
  },
};
