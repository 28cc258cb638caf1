/**
 * `npm run bench [-- NAME… | --list]`: run the benchmarks in this directory (every module exporting
 * `benchmark`, see harness.ts), print a markdown report (machine facts + one table per benchmark)
 * and write it to bench-results/latest.md.
 *
 * Environment: BENCH=name,name (selection, like argv), REPS (default 3), BENCH_DIR (scratch base,
 * default /var/tmp: a disk filesystem, O_DIRECT-capable), BENCH_OUT (report path), BENCH_DROP_CACHES=0
 * (never drop the page cache, e.g. in smoke tests). Benchmark-specific
 * sizes are documented in each module (e.g. BENCH_ODIRECT_BYTES). SIGINT/SIGTERM remove the current
 * benchmark's scratch directory before exiting (a benchmark that mounts must unmount in its own code).
 */
import { execFile } from 'node:child_process';
import { rmSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import {
  type BenchContext, type Benchmark, type BenchRow, cachedBytes, dropPageCache, fincoreBytes, isBenchmark, machineFacts, parseBytes,
  renderFacts, renderTable,
} from './harness.js';

const execFileAsync = promisify(execFile);
const here = dirname(fileURLToPath(import.meta.url));
/** The package root: dist/test/bench → ../../.. */
const packageRoot = resolve(here, '../../..');

async function discover(): Promise<Benchmark[]> {
  const found: Benchmark[] = [];
  for (const file of (await readdir(here)).sort()) {
    if (!file.endsWith('.js') || file === 'run.js' || file === 'harness.js') continue;
    const module = (await import(pathToFileURL(join(here, file)).href)) as { benchmark?: unknown };
    if (isBenchmark(module.benchmark)) found.push(module.benchmark);
  }
  return found;
}

function log(message: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${message}\n`);
}

function makeContext(dir: string, reps: number, canDropCaches: boolean): BenchContext {
  return {
    dir,
    reps,
    canDropCaches,
    log,
    envBytes(name, fallback) {
      const text = process.env[name];
      return text === undefined || text === '' ? fallback : parseBytes(text);
    },
    dropCaches: dropPageCache,
    async timed(fn, options = {}) {
      if (options.cold !== false && canDropCaches) await dropPageCache();
      const cachedBefore = await cachedBytes();
      const start = process.hrtime.bigint();
      const value = await fn();
      const seconds = Number(process.hrtime.bigint() - start) / 1e9;
      return { seconds, value, cachedGrowthBytes: (await cachedBytes()) - cachedBefore };
    },
    residentBytes: fincoreBytes,
    async exec(command, args) {
      return execFileAsync(command, args, { maxBuffer: 64 << 20 });
    },
  };
}

async function main(argv: string[]): Promise<number> {
  const all = await discover();
  if (argv.includes('--list') || argv.includes('--help')) {
    for (const b of all) process.stdout.write(`${b.name.padEnd(14)} ${b.description}\n`);
    return 0;
  }
  const wanted = [...argv, ...(process.env.BENCH ?? '').split(',')].map((s) => s.trim()).filter((s) => s !== '');
  const unknown = wanted.filter((name) => !all.some((b) => b.name === name));
  if (unknown.length > 0) {
    process.stderr.write(`unknown benchmark(s): ${unknown.join(', ')}; available: ${all.map((b) => b.name).join(', ')}\n`);
    return 2;
  }
  const selected = wanted.length === 0 ? all : all.filter((b) => wanted.includes(b.name));
  const reps = Number(process.env.REPS ?? '3');
  if (!Number.isInteger(reps) || reps < 1) throw new Error(`REPS must be a positive integer, got '${process.env.REPS}'`);

  const baseDir = resolve(process.env.BENCH_DIR ?? '/var/tmp');
  await mkdir(baseDir, { recursive: true });
  const canDropCaches = process.env.BENCH_DROP_CACHES !== '0' && await dropPageCache();
  if (!canDropCaches) log('page cache is not dropped (BENCH_DROP_CACHES=0 or not root): timings are warm-cache');
  const facts = await machineFacts(baseDir, canDropCaches);
  const sections: string[] = [];
  let failed = false;
  let current: string | undefined;
  for (const [signal, code] of [['SIGINT', 130], ['SIGTERM', 143]] as const) {
    process.once(signal, () => {
      if (current !== undefined) rmSync(current, { recursive: true, force: true });
      process.exit(code);
    });
  }
  for (const benchmark of selected) {
    const dir = await mkdtemp(join(baseDir, `qcow2fuse-bench-${benchmark.name}-`));
    current = dir;
    log(`${benchmark.name}: ${benchmark.description} (${reps} reps, in ${dir})`);
    let rows: BenchRow[] | undefined;
    try {
      rows = await benchmark.run(makeContext(dir, reps, canDropCaches));
    } catch (error) {
      const message = error instanceof Error ? error.stack ?? error.message : String(error);
      log(`${benchmark.name} FAILED: ${message}`);
      sections.push(`### ${benchmark.name}\n\nFAILED: ${message.split('\n')[0] ?? ''}`);
    } finally {
      await rm(dir, { recursive: true, force: true });
      current = undefined;
    }
    if (rows === undefined) {
      failed = true;
      continue;
    }
    if (rows.some((r) => r.error !== undefined)) failed = true;
    sections.push(renderTable(benchmark.name, benchmark.description, rows));
  }
  const report = ['## Benchmarks', '', renderFacts(facts), '', ...sections.flatMap((s) => [s, '']), `REPS=${reps}; medians over repetitions; ` +
    'MB/s = logical bytes / median s / 10^6; "time vs reference" = median s / the reference row\'s median s (< 1 is faster).', ''].join('\n');
  process.stdout.write(report);
  const out = resolve(process.env.BENCH_OUT ?? join(packageRoot, 'bench-results', 'latest.md'));
  await mkdir(dirname(out), { recursive: true });
  await writeFile(out, report);
  log(`report written to ${out}`);
  return failed ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (error: unknown) => {
    process.stderr.write(`bench: ${error instanceof Error ? error.stack ?? error.message : String(error)}\n`);
    process.exitCode = 1;
  },
);
