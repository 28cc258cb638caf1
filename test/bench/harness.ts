/**
 * Benchmark harness shared by test/bench/*.ts (DESIGN §7: performance lives in benchmarks, measured
 * side by side with the QEMU/system tools in the same run and reported as ratios).
 *
 * A benchmark module exports `benchmark: Benchmark`. Its `run(ctx)` performs `ctx.reps` repetitions
 * of every case (ours and the counterpart interleaved, their order rotated between repetitions, so
 * drift and the VM's first-run penalty hit all alike) and returns one
 * BenchRow per case and repetition. Timed runs go through `ctx.timed`, which drops the page cache
 * first (`sync; echo 3 > /proc/sys/vm/drop_caches`, as bench/anchors.sh does) and records the growth
 * of `Cached:` in /proc/meminfo. The harness reports medians, MB/s and each tool's time relative to
 * its workload's reference row.
 */
import { execFile } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import { cpus, release, totalmem, availableParallelism } from 'node:os';
import { promisify } from 'node:util';

const execFileAsync = promisify(execFile);

export interface BenchRow {
  /** What was done; rows with the same workload are compared with each other. */
  workload: string;
  /** Who did it, e.g. 'qcow2fuse HostFile O_DIRECT' or 'dd oflag=direct'. */
  tool: string;
  /** The counterpart (QEMU or system tool) the workload's other rows are compared against. */
  reference?: boolean;
  /** Repetition number, from 1. */
  rep: number;
  /** Wall time including durability (fdatasync / conv=fsync). */
  seconds: number;
  /** Logical bytes processed, for the MB/s column. */
  bytes: number;
  /** Further measurements reported as medians, e.g. {'file cache MiB': 0}. */
  metrics?: Record<string, number>;
  /** Set when the run failed; failed rows are listed but kept out of medians. */
  error?: string;
}

export interface TimedResult<T> {
  seconds: number;
  value: T;
  /** Growth of `Cached:` in /proc/meminfo over the run, in bytes (page cache the run created). */
  cachedGrowthBytes: number;
}

export interface BenchContext {
  /** Scratch directory on the bench filesystem, emptied and removed after the benchmark. */
  readonly dir: string;
  readonly reps: number;
  /** True when drop_caches is possible (root); otherwise runs are warm and the report says so. */
  readonly canDropCaches: boolean;
  log(message: string): void;
  /** Byte-count setting from the environment (accepts K/M/G suffixes), or the default. */
  envBytes(name: string, fallback: number): number;
  /** Drop the page cache (sync first). Resolves false when not permitted. */
  dropCaches(): Promise<boolean>;
  /** Time `fn`; with cold (default) the page cache is dropped first. */
  timed<T>(fn: () => Promise<T>, options?: { cold?: boolean }): Promise<TimedResult<T>>;
  /** Bytes of `path` resident in the page cache (`fincore --bytes --noheadings --output RES`). */
  residentBytes(path: string): Promise<number>;
  /** Run a command; rejects on a non-zero exit. */
  exec(command: string, args: readonly string[]): Promise<{ stdout: string; stderr: string }>;
}

export interface Benchmark {
  /** Short name used to select it (`npm run bench -- NAME`, BENCH=NAME). */
  name: string;
  /** One line: what it measures and against what. */
  description: string;
  run(ctx: BenchContext): Promise<BenchRow[]>;
}

/** True when `value` looks like a Benchmark (used to discover bench modules). */
export function isBenchmark(value: unknown): value is Benchmark {
  const b = value as Partial<Benchmark> | undefined;
  return typeof b === 'object' && b !== null && typeof b.name === 'string' && typeof b.description === 'string' && typeof b.run === 'function';
}

/** Parse '1G', '512M', '64k', '1048576' into bytes (binary units). */
export function parseBytes(text: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$/i.exec(text);
  if (match === null) throw new Error(`not a byte count: '${text}'`);
  const scale = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[(match[2] ?? '').toLowerCase()] ?? 1;
  const bytes = Math.round(Number(match[1]) * scale);
  if (!Number.isSafeInteger(bytes)) throw new Error(`byte count too large: '${text}'`);
  return bytes;
}

export function median(values: readonly number[]): number | undefined {
  if (values.length === 0) return undefined;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid] : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
}

export async function cachedBytes(): Promise<number> {
  const match = /^Cached:\s+(\d+) kB/m.exec(await readFile('/proc/meminfo', 'utf8'));
  return match === null ? 0 : Number(match[1]) * 1024;
}

export async function dropPageCache(): Promise<boolean> {
  try {
    await execFileAsync('sync');
    await writeFile('/proc/sys/vm/drop_caches', '3\n');
    return true;
  } catch {
    return false;
  }
}

export async function fincoreBytes(path: string): Promise<number> {
  const { stdout } = await execFileAsync('fincore', ['--bytes', '--noheadings', '--output', 'RES', path]);
  return Number(stdout.trim());
}

export interface MachineFacts {
  [fact: string]: string;
}

async function firstLine(command: string, args: string[]): Promise<string> {
  try {
    const { stdout } = await execFileAsync(command, args);
    return stdout.split('\n')[0]?.trim().replace(/\s+/g, ' ') ?? '';
  } catch {
    return 'unavailable';
  }
}

/** The facts a reader needs to compare numbers across machines. */
export async function machineFacts(benchDir: string, canDropCaches: boolean): Promise<MachineFacts> {
  return {
    date: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
    cpu: `${availableParallelism()} cores (nproc), ${cpus()[0]?.model.trim() ?? 'unknown'}`,
    ram: `${(totalmem() / 2 ** 30).toFixed(1)} GiB`,
    kernel: release(),
    node: process.version,
    'qemu-img': await firstLine('qemu-img', ['--version']),
    'bench dir': `${benchDir} (${await firstLine('findmnt', ['-n', '-o', 'FSTYPE,SOURCE', '-T', benchDir])})`,
    'page cache': canDropCaches ? 'dropped before every timed run' : 'NOT dropped (BENCH_DROP_CACHES=0 or not root): warm-cache numbers',
  };
}

const fmt = (value: number | undefined, digits: number) => (value === undefined ? '-' : value.toFixed(digits));

/**
 * The markdown report: one table per benchmark with, per (workload, tool): repetitions, median
 * seconds, MB/s (10^6), the median time relative to the workload's reference row, and the median of
 * every metric; failures listed below.
 */
export function renderTable(title: string, description: string, rows: readonly BenchRow[]): string {
  const metricNames = [...new Set(rows.flatMap((r) => Object.keys(r.metrics ?? {})))];
  const groups = new Map<string, BenchRow[]>();
  for (const row of rows) {
    const key = `${row.workload}\u0000${row.tool}`;
    groups.set(key, [...(groups.get(key) ?? []), row]);
  }
  const referenceSeconds = new Map<string, number>();
  for (const group of groups.values()) {
    const first = group[0];
    const ok = group.filter((r) => r.error === undefined);
    const m = median(ok.map((r) => r.seconds));
    if (first?.reference === true && m !== undefined) referenceSeconds.set(first.workload, m);
  }
  const lines = [
    `### ${title}`,
    '',
    description,
    '',
    `| workload | tool | n | median s | MB/s | time vs reference |${metricNames.map((m) => ` ${m} |`).join('')}`,
    `|---|---|---|---|---|---|${metricNames.map(() => '---|').join('')}`,
  ];
  const failures: string[] = [];
  for (const group of groups.values()) {
    const first = group[0];
    if (first === undefined) continue;
    const ok = group.filter((r) => r.error === undefined);
    for (const r of group) if (r.error !== undefined) failures.push(`- ${r.workload} / ${r.tool} rep ${r.rep}: ${r.error}`);
    const seconds = median(ok.map((r) => r.seconds));
    const bytes = median(ok.map((r) => r.bytes));
    const mbps = seconds !== undefined && bytes !== undefined && seconds > 0 ? bytes / seconds / 1e6 : undefined;
    const ref = referenceSeconds.get(first.workload);
    const ratio = first.reference === true ? 'reference' : seconds !== undefined && ref !== undefined ? `${(seconds / ref).toFixed(2)}×` : '-';
    const metrics = metricNames.map((name) => {
      const values = ok.map((r) => r.metrics?.[name]).filter((v): v is number => v !== undefined);
      return ` ${fmt(median(values), 1)} |`;
    });
    const n = ok.length === group.length ? `${group.length}` : `${ok.length}/${group.length}`;
    lines.push(`| ${first.workload} | ${first.tool} | ${n} | ${fmt(seconds, 2)} | ${fmt(mbps, 0)} | ${ratio} |${metrics.join('')}`);
  }
  if (failures.length > 0) lines.push('', 'Failed runs:', ...failures);
  return lines.join('\n');
}

/** The machine facts as a two-column markdown table. */
export function renderFacts(facts: MachineFacts): string {
  return ['| fact | value |', '|---|---|', ...Object.entries(facts).map(([k, v]) => `| ${k} | ${v.replaceAll('|', '\\|')} |`)].join('\n');
}
