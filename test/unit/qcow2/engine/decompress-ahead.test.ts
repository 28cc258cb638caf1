/**
 * Issue 13: reads of compressed clusters decompress on every core, and small sequential reads (a
 * mount's) have the clusters after them decompressed ahead into the cache. A load that started
 * before its chunk was freed (and the host offset possibly reused) never enters the cache, so
 * writes racing decompress-ahead never make a reader see stale data.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { DecompressedCache } from '../../../../src/qcow2/engine/compression.js';
import { imageState } from '../../../../src/qcow2/engine/image.js';
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

  it('decompress-ahead of several chunks: joined by readers; an invalidation in flight keeps all of it out', async () => {
    const cache = new DecompressedCache(MiB);
    const batch = deferred<Buffer[]>();
    const prefetched = cache.prefetch([0, 512, 1024], () => batch.promise);
    const reader = cache.get(512, async () => Buffer.from('reloaded'));
    cache.invalidate(1024, 512);
    batch.resolve([Buffer.from('a'), Buffer.from('b'), Buffer.from('c')]);
    await prefetched;
    expect((await reader).toString()).toBe('b');
    // Any invalidation during the load (here of chunk 1024) keeps the whole batch out of the cache.
    expect([0, 512, 1024].map((h) => cache.has(h))).toEqual([false, false, false]);
  });

  it('a failed decompress-ahead fails only the readers that joined it, and is not cached', async () => {
    const cache = new DecompressedCache(MiB);
    const batch = deferred<Buffer[]>();
    const prefetched = cache.prefetch([0], () => batch.promise);
    const reader = cache.get(0, async () => Buffer.from('unused'));
    batch.reject(new Error('EIO'));
    await prefetched;
    await expect(reader).rejects.toThrow('EIO');
    expect(cache.has(0)).toBe(false);
    expect((await cache.get(0, async () => Buffer.from('retry'))).toString()).toBe('retry');
  });
});

describe.skipIf(!hasQemu)('decompress-ahead through the image', () => {
  const tmp = useTempDir('decompress-ahead');

  for (const type of ['zlib', 'zstd'] as const) {
    it(`sequential 128 KiB reads of a qemu-img -c image (${type}) read right and decompress ahead`, async () => {
      const raw = join(tmp.path, 'disk.raw');
      const img = join(tmp.path, 'disk.qcow2');
      const model = Buffer.concat([0, 1, 2, 3, 4, 5, 6, 7].map((i) => patternBuffer(MiB, i, i * MiB, i % 3 === 2 ? 'random' : 'compressible')));
      model.fill(0, 3 * MiB, 3 * MiB + 256 * KiB);
      await writeFile(raw, model);
      expect((await qemuImg(['convert', '-f', 'raw', '-c', '-o', `compression_type=${type}`, '-O', 'qcow2', raw, img])).code).toBe(0);
      const image = await openImage(img, { readOnly: true });
      const s = imageState(image);
      const chunkAt = async (guestOffset: number): Promise<number> => {
        const segments: Parameters<typeof s.activeMap.mapForRead>[2] = [];
        await s.activeMap.mapForRead(guestOffset, 65536, segments);
        const seg = segments[0];
        if (seg.kind !== 'compressed') throw new Error(`cluster at ${guestOffset} is not compressed`);
        return seg.descriptor.hostOffset;
      };
      await image.read(0, 128 * KiB);
      await image.read(128 * KiB, 128 * KiB);
      // The second read continued the first: the next 2 MiB are being decompressed ahead.
      expect(s.decompressed.has(await chunkAt(MiB))).toBe(true);
      for (let off = 256 * KiB; off < model.length; off += 128 * KiB) {
        expect((await image.read(off, 128 * KiB)).equals(model.subarray(off, off + 128 * KiB)), `at ${off}`).toBe(true);
      }
      await image.close();
    });
  }

  it('writes racing sequential readers of a compressed image: every read after a write sees it', async () => {
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
      for (; round < 6; round++) {
        for (let off = 0; off < size; off += 128 * KiB) {
          // What the model holds once the read starts is written; a write in flight may or may not show.
          const before = Buffer.from(model.subarray(off, off + 128 * KiB));
          const got = await image.read(off, 128 * KiB);
          const after = model.subarray(off, off + 128 * KiB);
          for (let c = 0; c < 128 * KiB; c += 65536) {
            const cluster = got.subarray(c, c + 65536);
            expect(cluster.equals(before.subarray(c, c + 65536)) || cluster.equals(after.subarray(c, c + 65536)), `round ${round} at ${off + c}`).toBe(true);
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
