/**
 * Issue 13: `convert` from raw files, block devices and pipes into qcow2, against qemu-img convert
 * with the same options: identical contents (`qemu-img compare`), clean (`qemu-img check`), allocated
 * size within 1.02× of qemu-img's, and the source's holes and zeros left unallocated (`qemu-img map`).
 * Also -B (only what differs from the backing file is written), -S and -n.
 */
import { spawn } from 'node:child_process';
import { stat, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { convertCli, expectNoDataIn, writeSourceDisk } from './convert-harness.js';
import { patternBuffer } from '../helpers/patterns.js';
import { qemuImg, qemuImgCheckClean, qemuImgCompare, qemuImgMap, run } from '../helpers/qemu.js';
import { useTempDir } from '../helpers/tmp.js';
import { requireRoot, requireTools } from '../helpers/tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const ready = requireTools('qemu-img', 'losetup', 'cat');

interface Case {
  label: string;
  args: string[];
  clusterBytes: number;
}

const CASES: Case[] = [
  { label: 'plain', args: [], clusterBytes: 64 * KiB },
  { label: '-c zlib', args: ['-c'], clusterBytes: 64 * KiB },
  { label: '-c zstd', args: ['-c', '-o', 'compression_type=zstd'], clusterBytes: 64 * KiB },
  { label: '4 KiB clusters', args: ['-o', 'cluster_size=4k'], clusterBytes: 4 * KiB },
  { label: '-c 4 KiB clusters', args: ['-c', '-o', 'cluster_size=4k'], clusterBytes: 4 * KiB },
  { label: '2 MiB clusters', args: ['-o', 'cluster_size=2M'], clusterBytes: 2 * MiB },
  { label: '-c zstd 2 MiB clusters', args: ['-c', '-o', 'cluster_size=2M,compression_type=zstd'], clusterBytes: 2 * MiB },
  { label: 'compat 0.10', args: ['-o', 'compat=0.10'], clusterBytes: 64 * KiB },
  { label: '-c compat 0.10', args: ['-c', '-o', 'compat=0.10'], clusterBytes: 64 * KiB },
  { label: 'extended L2', args: ['-o', 'extended_l2=on'], clusterBytes: 64 * KiB },
  { label: '-c extended L2 128 KiB', args: ['-c', '-o', 'extended_l2=on,cluster_size=128k'], clusterBytes: 128 * KiB },
];

async function allocated(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}

/** Our output against the source and against qemu-img's output with the same options. */
async function expectLikeQemu(source: string, ours: string, args: string[], label: string): Promise<void> {
  const report = await qemuImgCheckClean(ours);
  if (args.includes('-c')) expect(report['compressed-clusters'], label).toBeGreaterThan(0);
  const theirs = `${ours}.qemu.qcow2`;
  const q = await qemuImg(['convert', '-f', 'raw', ...args, '-O', 'qcow2', source, theirs]);
  expect(q.code, q.stderr).toBe(0);
  expect(await qemuImgCompare(source, ours, { formatA: 'raw', formatB: 'qcow2' }), label).toBe(true);
  expect((await allocated(ours)) / (await allocated(theirs)), `${label}: allocated vs qemu-img`).toBeLessThanOrEqual(1.02);
}

describe.skipIf(!ready)('convert: raw sources into qcow2', () => {
  const tmp = useTempDir('convert-raw');

  it('raw file → qcow2 for every option set: identical, clean, as small as qemu-img\'s, holes kept', async () => {
    const disk = await writeSourceDisk(tmp.file('disk.raw'));
    for (const c of CASES) {
      const out = tmp.file(`out-${CASES.indexOf(c)}.qcow2`);
      const result = await convertCli([...c.args, '-O', 'qcow2', disk.path, out]);
      expect(result.virtualSize).toBe(disk.sizeBytes);
      await expectLikeQemu(disk.path, out, c.args, c.label);
      await expectNoDataIn(out, disk.zeroRanges, c.clusterBytes);
    }
  });

  it('from a loop device: size from the device, same image as from the file', async () => {
    if (!requireRoot()) return;
    const disk = await writeSourceDisk(tmp.file('disk.raw'));
    // A loop device's size is a multiple of 512: the disk's unaligned end is already one.
    const loop = (await run('losetup', ['-f', '--show', disk.path])).stdout.trim();
    expect(loop).toMatch(/^\/dev\/loop\d+$/);
    try {
      for (const args of [['-c'], []]) {
        const out = tmp.file(`loop${args.length}.qcow2`);
        const result = await convertCli([...args, '-O', 'qcow2', loop, out]);
        expect(result.virtualSize).toBe(disk.sizeBytes);
        await expectLikeQemu(disk.path, out, args, `loop ${args.join(' ')}`);
      }
    } finally {
      await run('losetup', ['-d', loop]);
    }
  });

  it('from a pipe: the destination grows as data arrives, its size is the bytes read rounded up to 512', async () => {
    const disk = await writeSourceDisk(tmp.file('disk.raw'));
    for (const args of [['-c'], ['-c', '-o', 'compression_type=zstd'], []]) {
      const out = tmp.file(`pipe${args.length}.qcow2`);
      const cat = spawn('cat', [disk.path], { stdio: ['ignore', 'pipe', 'inherit'] });
      const result = await convertCli([...args, '-O', 'qcow2', '-', out], { stdin: cat.stdout });
      expect(result.virtualSize).toBe(disk.sizeBytes);
      await expectLikeQemu(disk.path, out, args, `pipe ${args.join(' ')}`);
      await expectNoDataIn(out, disk.zeroRanges, 64 * KiB);
    }
    // An odd length: padded with zeros to a multiple of 512.
    const odd = tmp.file('odd.bin');
    await writeFile(odd, patternBuffer(1000, 9, 0));
    const cat = spawn('cat', [odd], { stdio: ['ignore', 'pipe', 'inherit'] });
    const result = await convertCli(['-O', 'qcow2', '-', tmp.file('odd.qcow2')], { stdin: cat.stdout });
    expect(result).toEqual({ virtualSize: 1024, sourceBytes: 1000 });
    await writeFile(odd, Buffer.concat([patternBuffer(1000, 9, 0), Buffer.alloc(24)]));
    expect(await qemuImgCompare(odd, tmp.file('odd.qcow2'), { formatA: 'raw' })).toBe(true);
    await qemuImgCheckClean(tmp.file('odd.qcow2'));
  });

  it('-B: the output reads as the source through its backing file and holds only the differing clusters', async () => {
    const base = tmp.file('base.raw');
    await writeFile(base, patternBuffer(8 * MiB, 11, 0, 'compressible'));
    const changed = patternBuffer(8 * MiB, 11, 0, 'compressible');
    patternBuffer(64 * KiB, 12, MiB).copy(changed, MiB); // cluster 16 rewritten
    changed.fill(0, 3 * MiB + 100, 3 * MiB + 200); // a few bytes of cluster 48 zeroed
    changed.fill(0, 5 * MiB, 5 * MiB + 128 * KiB); // clusters 80, 81 zeroed
    await writeFile(tmp.file('new.raw'), changed);
    for (const args of [[], ['-c']]) {
      const out = tmp.file(`over${args.length}.qcow2`);
      await convertCli([...args, '-B', 'base.raw', '-F', 'raw', '-O', 'qcow2', tmp.file('new.raw'), out]);
      expect(await qemuImgCompare(tmp.file('new.raw'), out, { formatA: 'raw' })).toBe(true);
      await qemuImgCheckClean(out);
      const top = (await qemuImgMap(out)).filter((e) => e.depth === 0 && (e.data || e.zero));
      const clusters = top.flatMap((e) => Array.from({ length: e.length / (64 * KiB) }, (_, i) => e.start / (64 * KiB) + i));
      expect(clusters, args.join(' ')).toEqual([16, 48, 80, 81]);
    }
  });

  it('-S 0 allocates everything; -n writes into an existing image, zeros included', async () => {
    const disk = await writeSourceDisk(tmp.file('disk.raw'));
    await convertCli(['-S', '0', '-O', 'qcow2', disk.path, tmp.file('full.qcow2')]);
    await qemuImgCheckClean(tmp.file('full.qcow2'));
    expect(await qemuImgCompare(disk.path, tmp.file('full.qcow2'), { formatA: 'raw' })).toBe(true);
    const map = await qemuImgMap(tmp.file('full.qcow2'));
    expect(map.every((e) => e.data)).toBe(true);
    // -n over an image full of other data: the zeros of the source must be written too.
    const target = tmp.file('target.qcow2');
    expect((await qemuImg(['create', '-q', '-f', 'qcow2', target, String(disk.sizeBytes)])).code).toBe(0);
    expect((await run('qemu-io', ['-c', `write -P 0x5a 0 ${20 * MiB}`, target])).code).toBe(0);
    await convertCli(['-n', '-O', 'qcow2', disk.path, target]);
    expect(await qemuImgCompare(disk.path, target, { formatA: 'raw' })).toBe(true);
    await qemuImgCheckClean(target);
  });
});
