/**
 * Issue 13: reads of compressed clusters decompress runs of chunks in batches on every core; parts
 * of clusters go through the decompressed-cluster cache, where a load that started before its
 * chunk was freed (and the host offset possibly reused) never enters the cache, so writes racing
 * reads never make a later reader see stale data.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { DecompressedCache } from '../../../../src/qcow2/engine/compression.js';
import { createImage, openImage } from '../../../../src/node.js';
import { patternBuffer, Prng } from '../../../helpers/patterns.js';
import { qemuImg, qemuImgCheckClean } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTool } from '../../../helpers/tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const hasQemu = requireTool('qemu-img');

/** A promise with its resolve and reject. */
function deferred<T>(): { promise: Promise<T>; resolve(value: T): void; reject(err: unknown): void } {
  let resolve!: (value: T) => void;
  let reject!: (err: unknown) => void;
  const promise = new Promise<T>((res, rej) => { resolve = res; reject = rej; });
  return { promise, resolve, reject };
}

describe('DecompressedCache: loads and invalidation', () => {
  it('a reader joins a load in flight, and the result is cached', async () => {
    const cache = new DecompressedCache(MiB);
    const load = deferred<Buffer>();
    let loads = 0;
    const first = cache.get(4096, () => { loads++; return load.promise; });
    const second = cache.get(4096, () => { loads++; return Promise.resolve(Buffer.from('other')); });
    expect(cache.has(4096)).toBe(true);
    load.resolve(Buffer.from('cluster'));
    expect((await first).toString()).toBe('cluster');
    expect((await second).toString()).toBe('cluster');
    expect(loads).toBe(1);
    expect(cache.has(4096)).toBe(true);
  });

  it('a load that started before an invalidation of its chunk is not cached, and later readers load anew', async () => {
    const cache = new DecompressedCache(MiB);
    const stale = deferred<Buffer>();
    const pending = cache.get(65536, () => stale.promise);
    cache.invalidate(65536, 65536);
    expect(cache.has(65536)).toBe(false);
    stale.resolve(Buffer.from('old'));
    await pending;
    expect(cache.has(65536)).toBe(false);
    expect((await cache.get(65536, async () => Buffer.from('new'))).toString()).toBe('new');
  });
});

describe.skipIf(!hasQemu)('compressed reads through the image', () => {
  const tmp = useTempDir('decompress-ahead');

  for (const type of ['zlib', 'zstd'] as const) {
    it(`whole and partial cluster reads of a qemu-img -c image (${type}) read right`, async () => {
      const raw = join(tmp.path, 'disk.raw');
      const img = join(tmp.path, 'disk.qcow2');
      const model = Buffer.concat([0, 1, 2, 3, 4, 5, 6, 7].map((i) => patternBuffer(MiB, i, i * MiB, i % 3 === 2 ? 'random' : 'compressible')));
      model.fill(0, 3 * MiB, 3 * MiB + 256 * KiB);
      await writeFile(raw, model);
      expect((await qemuImg(['convert', '-f', 'raw', '-c', '-o', `compression_type=${type}`, '-O', 'qcow2', raw, img])).code).toBe(0);
      const image = await openImage(img, { readOnly: true });
      expect((await image.read(0, model.length)).equals(model)).toBe(true);
      // Unaligned pieces: parts of clusters through the cache, whole ones decoded in batches.
      for (let off = 5 * KiB; off < model.length; off += 200 * KiB) {
        const bytes = Math.min(300 * KiB, model.length - off);
        expect((await image.read(off, bytes)).equals(model.subarray(off, off + bytes)), `at ${off}`).toBe(true);
      }
      await image.close();
    });
  }

  it('writes racing readers of a compressed image: every read sees each cluster before or after a write, and after it once done', async () => {
    const img = join(tmp.path, 'race.qcow2');
    const size = 8 * MiB;
    await createImage(img, { virtualSize: size, compressionType: 'zstd' });
    const model = Buffer.alloc(size);
    // Small cache and writer: rewritten clusters free host clusters that later chunks reuse.
    const image = await openImage(img, { readOnly: false, compress: true, decompressedCacheBytes: 2 * MiB, compressedWriter: { maxPendingBytes: MiB } });
    const put = async (off: number, data: Buffer): Promise<void> => {
      data.copy(model, off);
      await image.write(off, data);
    };
    for (let off = 0; off < size; off += MiB) await put(off, patternBuffer(MiB, 1, off, 'compressible'));
    await image.flush();
    const rng = new Prng(7);
    let round = 0;
    const writer = async (): Promise<void> => {
      for (let i = 0; i < 120; i++) {
        const off = rng.int(size / 65536) * 65536;
        await put(off, patternBuffer(65536, 100 + i, off, 'compressible'));
        if (i % 10 === 9) await image.flush();
      }
    };
    const reader = async (): Promise<void> => {
      // Unaligned 96 KiB reads: parts of clusters come through the cache, which writes invalidate.
      for (; round < 6; round++) {
        for (let off = round * 4 * KiB; off + 96 * KiB <= size; off += 96 * KiB) {
          // What the model holds once the read starts is written; a write in flight may or may not show.
          const before = Buffer.from(model.subarray(off, off + 96 * KiB));
          const got = await image.read(off, 96 * KiB);
          const after = model.subarray(off, off + 96 * KiB);
          for (let c = off; c < off + 96 * KiB; c = (Math.floor(c / 65536) + 1) * 65536) {
            const end = Math.min(off + 96 * KiB, (Math.floor(c / 65536) + 1) * 65536);
            const [a, b] = [c - off, end - off];
            expect(got.subarray(a, b).equals(before.subarray(a, b)) || got.subarray(a, b).equals(after.subarray(a, b)), `round ${round} at ${c}`).toBe(true);
          }
        }
      }
    };
    await Promise.all([writer(), reader()]);
    expect((await image.read(0, size)).equals(model)).toBe(true);
    for (let off = 0; off < size; off += 128 * KiB) expect((await image.read(off, 128 * KiB)).equals(model.subarray(off, off + 128 * KiB))).toBe(true);
    await image.close();
    const report = await qemuImgCheckClean(img);
    expect(report['compressed-clusters'] ?? 0).toBeGreaterThan(0);
  });
});
