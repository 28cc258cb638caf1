import { readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { type BenchRow, isBenchmark, median, parseBytes, renderFacts, renderTable } from '../../bench/harness.js';
import { run } from '../../helpers/exec.js';
import { tempDir } from '../../helpers/tmp.js';
import { requireTools } from '../../helpers/tools.js';

describe('bench harness', () => {
  it('parses byte counts with binary suffixes', () => {
    expect(parseBytes('1G')).toBe(2 ** 30);
    expect(parseBytes('64M')).toBe(64 * 2 ** 20);
    expect(parseBytes('4k')).toBe(4096);
    expect(parseBytes('1.5MiB')).toBe(1.5 * 2 ** 20);
    expect(parseBytes('1048576')).toBe(1048576);
    expect(() => parseBytes('lots')).toThrow(/not a byte count/);
  });

  it('takes medians of odd and even counts', () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([])).toBeUndefined();
  });

  it('recognizes benchmark modules', () => {
    expect(isBenchmark({ name: 'x', description: 'd', run: () => Promise.resolve([]) })).toBe(true);
    expect(isBenchmark({ name: 'x' })).toBe(false);
    expect(isBenchmark(undefined)).toBe(false);
  });

  it('renders medians, MB/s, ratios to the reference and failures', () => {
    const row = (tool: string, rep: number, seconds: number, extra: Partial<BenchRow> = {}): BenchRow =>
      ({ workload: 'w', tool, rep, seconds, bytes: 1e9, metrics: { 'cache MiB': seconds * 10 }, ...extra });
    const table = renderTable('t', 'desc', [
      row('qemu', 1, 2, { reference: true }), row('ours', 1, 1), row('qemu', 2, 4, { reference: true }), row('ours', 2, 3),
      row('qemu', 3, 3, { reference: true }), row('ours', 3, 9, { error: 'EIO' }),
    ]);
    const lines = table.split('\n');
    expect(lines).toContain('| w | qemu | 3 | 3.00 | 333 | reference | 30.0 |');
    expect(lines).toContain('| w | ours | 2/3 | 2.00 | 500 | 0.67× | 20.0 |');
    expect(table).toMatch(/Failed runs:\n- w \/ ours rep 3: EIO/);
    expect(renderFacts({ a: 'x|y' })).toBe('| fact | value |\n|---|---|\n| a | x\\|y |');
  });
});

const root = resolve(import.meta.dirname, '../../..');
// Built by `npm test` (npm run build) before vitest runs; requireTools treats paths as must-exist.
const ready = requireTools(join(root, 'dist/test/bench/run.js'), join(root, 'native/build/Release/qcow2fuse_native.node'), 'dd', 'fincore', 'findmnt');

describe.skipIf(!ready)('npm run bench (compiled harness, tiny sizes)', () => {
  it('lists odirect and runs it side by side with dd, writing the report', async () => {
    const listed = await run(process.execPath, [join(root, 'dist/test/bench/run.js'), '--list']);
    expect(listed.stdout).toMatch(/^odirect\s/m);
    const dir = await tempDir('bench');
    const out = join(dir, 'report.md');
    const env = { ...process.env, REPS: '2', BENCH_ODIRECT_BYTES: '4M', BENCH_DIR: dir, BENCH_OUT: out, BENCH_DROP_CACHES: '0' };
    const result = await run(process.execPath, [join(root, 'dist/test/bench/run.js'), 'odirect'], { env });
    expect(result.code, result.stderr).toBe(0);
    const report = await readFile(out, 'utf8');
    expect(report).toBe(result.stdout);
    expect(report).toMatch(/\| O_DIRECT, 4 MiB \| dd oflag=direct conv=fdatasync \| 2 \| [\d.]+ \| \d+ \| reference \| 0\.0 \|/);
    expect(report).toMatch(/\| O_DIRECT, 4 MiB \| qcow2fuse HostFile direct \+ alignedBuffer \| 2 \| [\d.]+ \| \d+ \| [\d.]+× \| 0\.0 \|/);
    expect(report).toMatch(/\| buffered, 4 MiB \| node fs \+ fdatasync \| 2 \| [\d.]+ \| \d+ \| [\d.]+× \| 4\.0 \|/);
    expect(report).toMatch(/\| page cache \| NOT dropped/);
    const unknown = await run(process.execPath, [join(root, 'dist/test/bench/run.js'), 'nope'], { env });
    expect(unknown.code).toBe(2);
  });
});
