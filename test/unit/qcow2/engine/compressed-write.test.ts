import { describe, expect, it } from 'vitest';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { checkImage } from '../../../../src/qcow2/check/check.js';
import { HostIoError } from '../../../../src/io/errors.js';
import type { HostFile, HostFileOpenOptions } from '../../../../src/io/host-file.js';
import { openNodeHostFile } from '../../../../src/io/node-host-file.js';
import { qemuImg, qemuImgCheck, qemuImgCompare } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTool } from '../../../helpers/tools.js';
import { patternBuffer, Prng } from '../../../helpers/patterns.js';
import { createImage, openImage } from '../../../../src/node.js';

const hasQemu = requireTool('qemu-img');

async function expectClean(img: string, model: Buffer, dir: string): Promise<void> {
  const check = await qemuImgCheck(img);
  expect(check.stderr).toBe('');
  expect(check.report?.corruptions ?? 0).toBe(0);
  expect(check.report?.leaks ?? 0).toBe(0);
  expect(check.code).toBe(0);
  const raw = join(dir, 'model.raw');
  await writeFile(raw, model);
  expect(await qemuImgCompare(img, raw)).toBe(true);
}

describe.skipIf(!hasQemu)('compressed writes', () => {
  const tmp = useTempDir('cwrite');
  for (const [name, opts] of [['zlib 64k', {}], ['zstd 64k', { compressionType: 'zstd' as const }], ['zlib 4k', { clusterSize: 4096 }], ['zlib 2M', { clusterSize: 2 * 1024 * 1024 }], ['refcount_bits=2', { refcountBits: 2 }]] as const) {
    it(`sequential 4 KiB and unaligned writes land compressed and check clean (${name})`, async () => {
      const img = join(tmp.path, 'c.qcow2');
      const size = 24 * 1024 * 1024;
      await createImage(img, { virtualSize: size, ...opts });
      const model = Buffer.alloc(size);
      const image = await openImage(img, { readOnly: false, compress: true, compressedWriter: { maxPendingBytes: 4 * 1024 * 1024 } });
      for (let off = 0; off < 8 * 1024 * 1024; off += 4096) {
        const data = patternBuffer(4096, 7, off, 'compressible');
        data.copy(model, off);
        await image.write(off, data);
      }
      const rng = new Prng(99);
      for (let i = 0; i < 100; i++) {
        const off = rng.int(size - 200_000);
        const len = 1 + rng.int(200_000);
        const data = patternBuffer(len, i, off, i % 3 === 0 ? 'random' : 'compressible');
        data.copy(model, off);
        await image.write(off, data);
        if (i % 10 === 0) {
          const probe = rng.int(size - 100_000);
          expect((await image.read(probe, 100_000)).equals(model.subarray(probe, probe + 100_000))).toBe(true);
        }
        if (i === 50) await image.flush();
      }
      await image.write(16 * 1024 * 1024, Buffer.alloc(1024 * 1024));
      model.fill(0, 16 * 1024 * 1024, 17 * 1024 * 1024);
      expect((await image.read(0, size)).equals(model)).toBe(true);
      await image.close();
      await expectClean(img, model, tmp.path);
      const check = await qemuImgCheck(img);
      expect(check.report?.['compressed-clusters'] ?? 0).toBeGreaterThan(0);
    });
  }

  it('concurrent writers and readers see their data while clusters are pending', async () => {
    const img = join(tmp.path, 'p.qcow2');
    const size = 16 * 1024 * 1024;
    await createImage(img, { virtualSize: size });
    const model = Buffer.alloc(size);
    const image = await openImage(img, { readOnly: false, compress: true });
    const writers = [0, 1, 2, 3].map(async (w) => {
      for (let off = w * 4 * 1024 * 1024; off < (w + 1) * 4 * 1024 * 1024; off += 65536) {
        const data = patternBuffer(65536, w + 10, off, 'compressible');
        data.copy(model, off);
        await image.write(off, data);
        expect((await image.read(off, 65536)).equals(data)).toBe(true);
      }
    });
    await Promise.all(writers);
    await image.close();
    await expectClean(img, model, tmp.path);
  });

  it('rewrites compressed clusters and releases the old chunks', async () => {
    const img = join(tmp.path, 'r.qcow2');
    const size = 8 * 1024 * 1024;
    await createImage(img, { virtualSize: size });
    const model = Buffer.alloc(size);
    for (let round = 0; round < 3; round++) {
      const image = await openImage(img, { readOnly: false, compress: true });
      for (let off = 0; off < size; off += 65536 * 3) {
        const data = patternBuffer(65536 + 1000, round * 100 + off / 65536, off, 'compressible');
        data.copy(model, off);
        await image.write(off, data);
      }
      await image.close();
      await expectClean(img, model, tmp.path);
    }
    await qemuImg(['check', img]);
  });

  it('where the filesystem refuses O_DIRECT: a warning, buffered compressed writes dropped from the page cache, a clean image', async () => {
    const img = join(tmp.path, 'nodirect.qcow2');
    const size = 8 * 1024 * 1024;
    await createImage(img, { virtualSize: size });
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(w.message);
    process.on('warning', onWarning);
    const dropped: [number, number][] = [];
    try {
      const refuseDirect = async (path: string, options: HostFileOpenOptions): Promise<HostFile> => {
        if (options.direct) throw new HostIoError('EINVAL', path, 'open', undefined, 'O_DIRECT not supported (simulated)');
        const file = await openNodeHostFile(path, options);
        const dropCache = file.dropCache.bind(file);
        file.dropCache = async (offset, length) => { dropped.push([offset, length]); await dropCache(offset, length); };
        return file;
      };
      const file = await refuseDirect(img, { readOnly: false, direct: false, lock: true });
      const image = await openImage(img, { readOnly: false, compress: true, file, openHostFile: refuseDirect });
      const model = patternBuffer(size, 77, 0, 'compressible');
      await image.write(0, model);
      await image.close();
      await new Promise((resolve) => setImmediate(resolve));
      expect(warnings.some((m) => m.includes('O_DIRECT refused'))).toBe(true);
      expect(dropped.length).toBeGreaterThan(0);
      const check = await qemuImgCheck(img);
      expect(check.report?.['compressed-clusters'] ?? 0).toBe(size / 65536);
      await expectClean(img, model, tmp.path);
    } finally {
      process.off('warning', onWarning);
    }
  });

  it('close waits for the rewrite of a host cluster the fill has passed (and the writer reference it drops)', async () => {
    // refcount_bits=2: a host cluster takes two chunks (writer reference + 2 = 3). A flush writes the
    // first cluster with its two chunks and links them; the third chunk skips it, which closes it and
    // writes it again, whole, in the background — the write held here until close has begun.
    const img = join(tmp.path, 'closed-write.qcow2');
    const size = 8 * 1024 * 1024;
    await createImage(img, { virtualSize: size, refcountBits: 2 });
    const seen = new Set<number>();
    let release!: () => void;
    const held = new Promise<void>((resolve) => { release = resolve; });
    let armed = false;
    let holding = false;
    const opener = async (path: string, options: HostFileOpenOptions): Promise<HostFile> => {
      const file = await openNodeHostFile(path, options);
      if (!options.direct) return file;
      const pwrite = file.pwrite.bind(file);
      file.pwrite = async (buf, hostOffset, point) => {
        if (point === 'compressed' && armed && seen.has(hostOffset) && !holding) {
          holding = true;
          await held;
        }
        if (!armed) seen.add(hostOffset);
        await pwrite(buf, hostOffset, point);
      };
      return file;
    };
    const image = await openImage(img, { readOnly: false, compress: true, openHostFile: opener, compressedWriter: { areaClusters: 2 } });
    const model = Buffer.alloc(size);
    const cluster = (i: number): Buffer => {
      const data = patternBuffer(65536, 5, i * 65536, 'compressible');
      data.copy(model, i * 65536);
      return data;
    };
    // The L2 table first, so the areas (2 clusters each) follow one another on the host.
    await image.writeZeroes(4 * 1024 * 1024, 65536);
    await image.write(0, cluster(0));
    await image.write(65536, cluster(1));
    await image.flush();
    armed = true;
    await image.write(2 * 65536, cluster(2));
    await image.write(3 * 65536, cluster(3));
    for (let i = 0; i < 2000 && !holding; i++) await new Promise((resolve) => setTimeout(resolve, 10));
    expect(holding).toBe(true);
    let closed = false;
    const closing = image.close().then(() => { closed = true; });
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(closed).toBe(false);
    release();
    await closing;
    await expectClean(img, model, tmp.path);
  });

  it('a check of the live image counts the clusters the writer is still filling (no leaks), after flush and mid-write', async () => {
    const img = join(tmp.path, 'live.qcow2');
    const size = 8 * 1024 * 1024;
    await createImage(img, { virtualSize: size });
    const image = await openImage(img, { readOnly: false, compress: true });
    try {
      const model = Buffer.alloc(size);
      for (let round = 0; round < 3; round++) {
        // A few clusters: their chunks fill part of a host cluster, which stays open for more.
        const data = patternBuffer(3 * 65536 + 5000, round, round * 400_000, 'compressible');
        data.copy(model, round * 400_000);
        await image.write(round * 400_000, data);
        if (round !== 1) await image.flush();
        const report = await checkImage(image);
        expect({ round, corruptions: report.corruptions ?? 0, leaks: report.leaks ?? 0, errors: report['check-errors'] })
          .toEqual({ round, corruptions: 0, leaks: 0, errors: 0 });
        expect(report['compressed-clusters']).toBeGreaterThan(0);
      }
      expect((await image.read(0, size)).equals(model)).toBe(true);
    } finally {
      await image.close();
    }
    expect((await qemuImgCheck(img)).code).toBe(0);
  });
});
