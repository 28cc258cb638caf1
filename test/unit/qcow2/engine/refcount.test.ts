/**
 * Refcounts (engine/refcount.ts) on their own: the allocator, refcount updates and frees of an image
 * qemu-img created, read back through getRefcount and judged by `qemu-img check` (an allocation
 * nothing references is a leak there; freeing it makes the image clean again), and the refcount
 * table growing when clusters far past it get a refcount.
 */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { qemuImg, qemuImgCheck, qemuImgCheckClean, qemuIoOk } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTool } from '../../../helpers/tools.js';
import { openImage } from '../../../../src/node.js';
import { imageState } from '../../../../src/qcow2/engine/image.js';

const hasQemu = requireTool('qemu-img');
const MiB = 1024 * 1024;

describe.skipIf(!hasQemu)('Refcounts', () => {
  const tmp = useTempDir('refcount');

  for (const refcountBits of [1, 16, 64]) {
    it(`allocates free clusters with refcount 1, updates and frees them (refcount_bits ${refcountBits})`, async () => {
      const path = join(tmp.path, `alloc-${refcountBits}.qcow2`);
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=4k,refcount_bits=${refcountBits}`, path, String(4 * MiB)]);
      await qemuIoOk(path, ['write -P 0x5a 0 64k']);
      const image = await openImage(path, { readOnly: false });
      const s = imageState(image);
      const cs = s.geometry.clusterSize;
      let hostOffset = 0;
      try {
        const usedBefore = await image.allocatedBytes();
        hostOffset = await s.lock.run(() => s.refcounts.allocClusters(3));
        expect(hostOffset % cs).toBe(0);
        expect(hostOffset).toBeGreaterThanOrEqual(s.refcounts.reftableOffset + s.refcounts.reftableClusters * cs);
        const counts = await s.lock.run(async () => Promise.all([0, 1, 2].map((i) => s.refcounts.getRefcount(hostOffset / cs + i))));
        expect(counts).toEqual([1, 1, 1]);
        expect(await image.allocatedBytes()).toBe(usedBefore + 3 * cs);
        // Written but never linked (qemu-img check only sees clusters inside the file).
        await s.file.pwrite(Buffer.alloc(3 * cs, 0x77), hostOffset, 'data');
        if (refcountBits > 1) {
          await s.lock.run(() => s.refcounts.updateRefcount(hostOffset, cs, 2));
          expect(await s.lock.run(() => s.refcounts.getRefcount(hostOffset / cs))).toBe(3);
          await s.lock.run(() => s.refcounts.updateRefcount(hostOffset, cs, -2));
          expect(await s.lock.run(() => s.refcounts.getRefcount(hostOffset / cs))).toBe(1);
        }
        await image.flush();
      } finally {
        await image.close();
      }
      // Allocated, never referenced: three leaked clusters for qemu-img.
      const leaked = await qemuImgCheck(path);
      expect(leaked.report?.leaks).toBe(3);
      expect(leaked.report?.corruptions ?? 0).toBe(0);

      const again = await openImage(path, { readOnly: false });
      const t = imageState(again);
      try {
        await t.lock.run(() => t.refcounts.freeClusters(hostOffset, 3 * cs));
        expect(await t.lock.run(() => t.refcounts.getRefcount(hostOffset / cs))).toBe(0);
        // The lowest free cluster is handed out again.
        expect(await t.lock.run(() => t.refcounts.allocClusters(1))).toBe(hostOffset);
        await t.lock.run(() => t.refcounts.freeClusters(hostOffset, cs));
      } finally {
        await again.close();
      }
      await qemuImgCheckClean(path);
      await qemuIoOk(path, ['read -P 0x5a 0 64k']);
    });
  }

  it('grows the refcount table when a cluster past what it describes gets a refcount', async () => {
    const path = join(tmp.path, 'grow.qcow2');
    // 512-byte clusters, 64-bit refcounts: one refcount block describes 64 clusters (32 KiB) and the
    // one-cluster table 64 blocks (2 MiB of file).
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=64', path, String(8 * MiB)]);
    const image = await openImage(path, { readOnly: false });
    const s = imageState(image);
    const tableBefore = s.refcounts.reftableClusters;
    try {
      const data = Buffer.alloc(4 * MiB, 0x3c);
      await image.write(0, data);
      expect(s.refcounts.reftableClusters).toBeGreaterThan(tableBefore);
      expect(s.header.refcountTableOffset).toBe(s.refcounts.reftableOffset);
      expect(s.header.refcountTableClusters).toBe(s.refcounts.reftableClusters);
    } finally {
      await image.close();
    }
    await qemuImgCheckClean(path);
    await qemuIoOk(path, ['read -P 0x3c 0 4M']);
  });
});
