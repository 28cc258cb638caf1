/**
 * Bench `odirect`: sequential 1 MiB writes of BENCH_ODIRECT_BYTES (default 1 GiB) into a new file,
 * made durable (fdatasync; dd conv=fdatasync), two ways each with its system counterpart:
 *   O_DIRECT:  our HostFile (openNodeHostFile direct, native aligned buffer)  vs  dd oflag=direct
 *   buffered:  Node fs writes, and Node fs + fadvise(DONTNEED) after the sync  vs  dd conv=fdatasync
 * Metrics: the written file's page-cache residency right after the run (fincore) and the growth of
 * `Cached:` over the run. The data is zeros everywhere (dd reads /dev/zero).
 */
import { open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { openNodeHostFile } from '../../src/io/node-host-file.js';
import { alignedBuffer, FADVISE, fadvise } from '../../src/io/native.js';
import type { Benchmark, BenchContext, BenchRow } from './harness.js';

const CHUNK_BYTES = 1 << 20;
const MiB = 2 ** 20;

async function hostFileDirect(path: string, count: number): Promise<void> {
  await (await open(path, 'w')).close();
  const file = await openNodeHostFile(path, { readOnly: false, direct: true, lock: false });
  try {
    const buf = alignedBuffer(CHUNK_BYTES, Math.max(file.dioAlignment, 4096));
    for (let i = 0; i < count; i++) await file.pwrite(buf, i * CHUNK_BYTES);
    await file.fdatasync();
  } finally {
    await file.close();
  }
}

async function nodeBuffered(path: string, count: number, dropAfterSync: boolean): Promise<void> {
  const handle = await open(path, 'w');
  try {
    const buf = Buffer.alloc(CHUNK_BYTES);
    for (let i = 0; i < count; i++) await handle.write(buf, 0, CHUNK_BYTES, i * CHUNK_BYTES);
    await handle.datasync();
    if (dropAfterSync) await fadvise(handle.fd, 0, 0, FADVISE.DONTNEED);
  } finally {
    await handle.close();
  }
}

interface Case {
  workload: string;
  tool: string;
  reference?: boolean;
  write(path: string, count: number, ctx: BenchContext): Promise<unknown>;
}

const CASES: readonly Case[] = [
  { workload: 'O_DIRECT', tool: 'dd oflag=direct conv=fdatasync', reference: true,
    write: (path, count, ctx) => ctx.exec('dd', ['if=/dev/zero', `of=${path}`, `bs=${CHUNK_BYTES}`, `count=${count}`, 'oflag=direct', 'conv=fdatasync', 'status=none']) },
  { workload: 'O_DIRECT', tool: 'qcow2fuse HostFile direct + alignedBuffer', write: (path, count) => hostFileDirect(path, count) },
  { workload: 'buffered', tool: 'dd conv=fdatasync', reference: true,
    write: (path, count, ctx) => ctx.exec('dd', ['if=/dev/zero', `of=${path}`, `bs=${CHUNK_BYTES}`, `count=${count}`, 'conv=fdatasync', 'status=none']) },
  { workload: 'buffered', tool: 'node fs + fdatasync', write: (path, count) => nodeBuffered(path, count, false) },
  { workload: 'buffered', tool: 'node fs + fdatasync + fadvise(DONTNEED)', write: (path, count) => nodeBuffered(path, count, true) },
];

export const benchmark: Benchmark = {
  name: 'odirect',
  description: 'Sequential 1 MiB writes (BENCH_ODIRECT_BYTES, default 1 GiB) + fdatasync into a new file: ' +
    'native aligned O_DIRECT (HostFile) vs `dd oflag=direct`, buffered Node fs vs `dd conv=fdatasync`; page-cache residency by fincore.',
  async run(ctx) {
    const bytes = ctx.envBytes('BENCH_ODIRECT_BYTES', 2 ** 30);
    if (bytes % CHUNK_BYTES !== 0 || bytes === 0) throw new Error(`BENCH_ODIRECT_BYTES must be a positive multiple of 1 MiB, got ${bytes}`);
    const count = bytes / CHUNK_BYTES;
    const path = join(ctx.dir, 'odirect.bin');
    const rows: BenchRow[] = [];
    const workloads = [...new Set(CASES.map((c) => c.workload))];
    for (let rep = 1; rep <= ctx.reps; rep++) {
      // Rotate the order inside each workload every repetition: the first writer after a quiet spell
      // pays for the VM re-faulting freed memory, which must not always hit the same tool.
      const ordered = workloads.flatMap((w) => {
        const group = CASES.filter((c) => c.workload === w);
        const shift = (rep - 1) % group.length;
        return [...group.slice(shift), ...group.slice(0, shift)];
      });
      for (const c of ordered) {
        await rm(path, { force: true });
        ctx.log(`odirect rep ${rep}: ${c.tool}`);
        const row: BenchRow = { workload: `${c.workload}, ${bytes / MiB} MiB`, tool: c.tool, reference: c.reference, rep, seconds: 0, bytes };
        try {
          const timed = await ctx.timed(() => c.write(path, count, ctx));
          row.seconds = timed.seconds;
          row.metrics = { 'file cache MiB': (await ctx.residentBytes(path)) / MiB, 'Δ Cached MiB': timed.cachedGrowthBytes / MiB };
        } catch (error) {
          row.error = error instanceof Error ? error.message : String(error);
        }
        rows.push(row);
      }
    }
    await rm(path, { force: true });
    return rows;
  },
};
