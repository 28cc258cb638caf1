/**
 * Rewrites of clusters still being compressed, then fsync (issue 7: "a newer version waits for it").
 * A guest cluster written again while its previous version is in flight (compressing, or packed
 * into a host cluster not yet written) gets a pending newer version that may start only when the
 * old one is linked. A flush in that state must wait for it — it used to go round without yielding,
 * starving the event loop: fsync never returned and the daemon spun at 100% CPU, serving nothing.
 *
 * In process over a memory file the interleaving is certain (its I/O completes at once, compression
 * does not); through a real mount the same pattern — every cluster of a small range rewritten
 * several times, an fsync after each round, the contents checked — meets the timing often.
 */
import { open, readFile, writeFile } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { MemoryHostFile } from '../../src/io/memory-host-file.js';
import { createEmptyImage, IngestMount, MiB } from '../helpers/compress-ingest.js';
import { patternBuffer } from '../helpers/patterns.js';
import { qemuImgCheckClean, qemuImgCompare, qemuImgCreate } from '../helpers/qemu.js';
import { tempDir } from '../helpers/tmp.js';
import { requireFuse, requireTool } from '../helpers/tools.js';
import { checkBuild } from './mount-harness.js';
import { openImage } from '../../src/node.js';

const hasQemu = requireTool('qemu-img');
const CLUSTER = 65536;

describe.skipIf(!hasQemu)('flush while rewritten clusters are in flight', () => {
  it('in process: overlapping writes then flush and close return, and the last version wins', async () => {
    const dir = await tempDir('compress-rewrite');
    const path = join(dir, 'image.qcow2');
    await qemuImgCreate(path, 4 * MiB);
    const file = MemoryHostFile.from(await readFile(path));
    const image = await openImage(path, {
      readOnly: false, file, lock: false, compress: true, openHostFile: async () => file,
      compressedWriter: { maxPendingBytes: 8 * CLUSTER, maxPartialClusters: 4, areaClusters: 2 },
    });
    const model = Buffer.alloc(4 * MiB);
    for (let round = 0; round < 3; round++) {
      // 150 000-byte writes 100 000 bytes apart: each overlaps clusters the previous one submitted.
      for (let i = 0; i < 10; i++) {
        const data = patternBuffer(150_000, round * 10 + i, i * 100_000, 'compressible');
        await image.write(i * 100_000, data);
        data.copy(model, i * 100_000);
      }
      await image.flush();
      expect((await image.read(0, model.length)).equals(model)).toBe(true);
    }
    await image.close();
    await writeFile(path, file.snapshot());
    const check = await qemuImgCheckClean(path);
    expect(check['compressed-clusters'] ?? 0).toBeGreaterThan(0);
  });

  it.skipIf(!requireFuse())('through a mount: clusters rewritten while in flight, fsync after each round; clean and identical', async () => {
    await checkBuild();
    const dir = await tempDir('compress-rewrite-mount');
    const image = join(dir, 'image.qcow2');
    await createEmptyImage(image, 16 * MiB, 'zlib');
    const m = new IngestMount(image, join(dir, 'mnt'), join(dir, 'run'));
    const model = Buffer.alloc(16 * MiB);
    try {
      await m.mount(['compress']);
      const disk = await open(m.disk, 'r+');
      try {
        const buf = Buffer.alloc(4 * CLUSTER);
        for (let round = 0; round < 60; round++) {
          for (let i = 0; i < 4; i++) {
            // Half incompressible (stored as is), half compressible: both paths get rewritten.
            patternBuffer(buf.length, round * 4 + i, 0, i % 2 === 0 ? 'random' : 'compressible').copy(buf);
            const at = (round % 3) * CLUSTER;
            await disk.write(buf, 0, buf.length, at);
            buf.copy(model, at);
          }
          // A hung fsync would hang this test's worker for good: after 30 s, kill -9 the daemon
          // (the fsync then fails ENOTCONN) and fail.
          const timer = new AbortController();
          const hung = await Promise.race([disk.sync().then(() => false), sleep(30_000, true, { signal: timer.signal })]);
          timer.abort();
          if (hung) {
            await m.kill();
            throw new Error(`fsync of round ${round} did not return within 30 s: daemon killed`);
          }
        }
        const back = Buffer.alloc(model.length);
        await disk.read(back, 0, back.length, 0);
        expect(back.equals(model)).toBe(true);
      } finally {
        await disk.close();
      }
      await m.unmount();
    } finally {
      await m.cleanup();
    }
    await qemuImgCheckClean(image);
    const expected = join(dir, 'expected.raw');
    await writeFile(expected, model);
    expect(await qemuImgCompare(image, expected, { formatA: 'qcow2', formatB: 'raw' })).toBe(true);
  });
});
