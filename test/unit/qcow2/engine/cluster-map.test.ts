/**
 * ClusterMap (engine/cluster-map.ts) and cluster-discard.ts on their own: the guest → host mapping of
 * images qemu-io wrote, compared with `qemu-img map`; what planWrite decides for each kind of
 * cluster; zero/discard entries; L1 growth. Every image that was changed ends clean in qemu-img check.
 */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { qemuImg, qemuImgCheckClean, qemuImgMap, qemuIoOk } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTool } from '../../../helpers/tools.js';
import { patternBuffer } from '../../../helpers/patterns.js';
import { openImage } from '../../../../src/node.js';
import { imageState, type Qcow2Image } from '../../../../src/qcow2/engine/image.js';
import type { ReadSegment } from '../../../../src/qcow2/engine/cluster-map.js';
import { discardEntryFor, replaceEntries, zeroEntryFor } from '../../../../src/qcow2/engine/cluster-discard.js';

const hasQemu = requireTool('qemu-img');
const MiB = 1024 * 1024;
const CLUSTER = 64 * 1024;

/** The segments mapForRead gives for [guestOffset, +bytes) of the active map. */
async function mapRange(image: Qcow2Image, guestOffset: number, bytes: number): Promise<ReadSegment[]> {
  const s = imageState(image);
  const segments: ReadSegment[] = [];
  await s.lock.run(async () => {
    let done = 0;
    while (done < bytes) done += await s.activeMap.mapForRead(guestOffset + done, bytes - done, segments);
  });
  return segments;
}

describe.skipIf(!hasQemu)('ClusterMap', () => {
  const tmp = useTempDir('cluster-map');

  /** data at 0, compressed at 1 MiB, a zero cluster at 2 MiB, nothing at 3 MiB. */
  async function fourKinds(name: string): Promise<string> {
    const path = join(tmp.path, name);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', path, String(4 * MiB)]);
    await qemuIoOk(path, ['write -P 0x11 0 64k', 'write -c -P 0x22 1M 64k', 'write -P 0x33 2M 64k', 'write -z 2M 64k']);
    return path;
  }

  it('maps data, compressed, zero and unallocated clusters as qemu-img map does', async () => {
    const path = await fourKinds('kinds.qcow2');
    const qemuMap = await qemuImgMap(path);
    const image = await openImage(path);
    try {
      const segments = await mapRange(image, 0, 4 * MiB);
      const kindAt = (guestOffset: number): ReadSegment | undefined => segments.find((s) => s.guestOffset <= guestOffset && guestOffset < s.guestOffset + s.bytes);
      const data = kindAt(0);
      expect(data?.kind).toBe('data');
      const qemuData = qemuMap.find((e) => e.start === 0);
      expect(data?.kind === 'data' ? data.hostOffset : -1).toBe(qemuData?.offset);
      expect(kindAt(MiB)?.kind).toBe('compressed');
      expect(kindAt(2 * MiB)?.kind).toBe('zero');
      expect(kindAt(3 * MiB)?.kind).toBe('zero');
      expect(segments.reduce((n, s) => n + s.bytes, 0)).toBe(4 * MiB);
      expect((await image.read(0, CLUSTER)).equals(Buffer.alloc(CLUSTER, 0x11))).toBe(true);
      expect((await image.read(MiB, CLUSTER)).equals(Buffer.alloc(CLUSTER, 0x22))).toBe(true);
    } finally {
      await image.close();
    }
  });

  it('plans a direct write into a COPIED cluster, an allocation elsewhere, and a copy of a cluster a snapshot shares', async () => {
    const path = await fourKinds('plan.qcow2');
    await qemuIoOk(path, ['write -P 0x44 3M 64k']);
    await qemuImg(['snapshot', '-c', 'snap', path]);
    await qemuIoOk(path, ['write -P 0x55 0 64k']); // cluster 0 copied away from the snapshot: COPIED again
    const image = await openImage(path, { readOnly: false });
    const s = imageState(image);
    try {
      const modes = await s.lock.run(async () => {
        const out: string[] = [];
        for (const guestOffset of [0, MiB, 2 * MiB, 3 * MiB, 3 * MiB + 2 * CLUSTER]) {
          const plans = await s.activeMap.planWrite(guestOffset, 4096, () => false, () => s.highWaterBytes);
          expect(plans).toHaveLength(1);
          out.push(plans[0].mode);
          await s.activeMap.abortAlloc(plans[0]);
        }
        return out;
      });
      // 0: rewritten after the snapshot (refcount 1, COPIED); 1M compressed; 2M zero; 3M shared with
      // the snapshot (COPIED clear); past 3M unallocated.
      expect(modes).toEqual(['direct', 'alloc', 'alloc', 'alloc', 'alloc']);
    } finally {
      await image.close();
    }
    await qemuImgCheckClean(path);
  });

  it('zeroes and discards whole clusters through cluster-discard, freeing their storage', async () => {
    const path = await fourKinds('discard.qcow2');
    const image = await openImage(path, { readOnly: false });
    const s = imageState(image);
    const before = await image.allocatedBytes();
    try {
      const map = s.activeMap;
      await s.lock.run(() => replaceEntries(map, 0, 1, (old) => zeroEntryFor(map, old)));
      await s.lock.run(() => replaceEntries(map, MiB / CLUSTER, 1, (old) => discardEntryFor(map, old, true)));
      const segments = await mapRange(image, 0, 2 * MiB);
      expect(segments.every((seg) => seg.kind === 'zero')).toBe(true);
      expect((await image.read(0, 2 * MiB)).equals(Buffer.alloc(2 * MiB))).toBe(true);
      // The data cluster and the compressed chunk's host cluster go back (the zero cluster at 2M was preallocated-free already).
      expect(await image.allocatedBytes()).toBe(before - 2 * CLUSTER);
    } finally {
      await image.close();
    }
    await qemuImgCheckClean(path);
    const qemuMap = await qemuImgMap(path);
    expect(qemuMap.filter((e) => e.start < 2 * MiB && e.data)).toEqual([]);
  });

  it('grows the L1 table when a write lands past it, keeping what was mapped', async () => {
    const path = join(tmp.path, 'grow.qcow2');
    // 512-byte clusters: one L1 entry covers 32 KiB, so a 64 KiB disk has 2 entries.
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', path, String(64 * 1024)]);
    await qemuIoOk(path, ['write -P 0x66 0 512']);
    const image = await openImage(path, { readOnly: false });
    const s = imageState(image);
    try {
      expect(s.activeMap.l1.entries).toBe(2);
      await image.resize(4 * MiB);
      const data = patternBuffer(4096, 7, 4 * MiB - 4096);
      await image.write(4 * MiB - 4096, data);
      expect(s.activeMap.l1.entries).toBeGreaterThanOrEqual(4 * MiB / (32 * 1024));
      expect(s.header.l1Entries).toBe(s.activeMap.l1.entries);
      expect((await image.read(4 * MiB - 4096, 4096)).equals(data)).toBe(true);
      expect((await image.read(0, 512)).equals(Buffer.alloc(512, 0x66))).toBe(true);
    } finally {
      await image.close();
    }
    await qemuImgCheckClean(path);
    await qemuIoOk(path, ['read -P 0x66 0 512']);
  });
});
