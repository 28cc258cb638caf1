/**
 * The repair primitives (check/repair.ts) and the staging file of the dirty-image repair
 * (check/dirty-repair.ts) on their own: the in-memory refcount array, the snapshot table rewrite
 * (judged by qemu-img), the pre-write overlap check, and StagingFile's all-or-nothing commit.
 */
import { describe, expect, it } from 'vitest';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuImg, qemuImgCheckClean, qemuImgInfo, qemuIoOk } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTool } from '../../../helpers/tools.js';
import { patternBuffer } from '../../../helpers/patterns.js';
import { openImage } from '../../../../src/node.js';
import { openNodeHostFile } from '../../../../src/io/node-host-file.js';
import { imageState } from '../../../../src/qcow2/engine/image.js';
import { overlapsMetadata, RefcountArray, writeSnapshotTable } from '../../../../src/qcow2/check/repair.js';
import { StagingFile } from '../../../../src/qcow2/check/dirty-repair.js';

const hasQemu = requireTool('qemu-img');
const MiB = 1024 * 1024;

describe('RefcountArray', () => {
  it('holds refcounts up to the width of the image, reads 0 past its size and keeps them when it grows', () => {
    for (const [order, max] of [[0, 1], [3, 255], [4, 65535], [6, 2 ** 53 - 1]] as const) {
      const refs = new RefcountArray(order, max, 4);
      expect(refs.max).toBe(Math.min(max, 0xffffffff));
      refs.set(3, refs.max);
      refs.set(1, 1);
      expect([refs.get(0), refs.get(1), refs.get(3), refs.get(100)]).toEqual([0, 1, refs.max, 0]);
      refs.resize(3_000_000);
      expect(refs.size).toBe(3_000_000);
      expect([refs.get(1), refs.get(3), refs.get(2_999_999)]).toEqual([1, refs.max, 0]);
      refs.resize(10);
      expect(refs.size).toBe(3_000_000);
      refs.clear();
      expect(refs.get(3)).toBe(0);
    }
  });
});

describe.skipIf(!hasQemu)('repair primitives', () => {
  const tmp = useTempDir('repair');

  it('writeSnapshotTable moves the snapshot table, frees the old one and leaves qemu-img a clean image', async () => {
    const path = join(tmp.path, 'snaps.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', path, String(4 * MiB)]);
    await qemuIoOk(path, ['write -P 0x21 0 64k']);
    await qemuImg(['snapshot', '-c', 'first', path]);
    await qemuIoOk(path, ['write -P 0x22 0 32k']);
    await qemuImg(['snapshot', '-c', 'second', path]);
    const image = await openImage(path, { readOnly: false });
    const s = imageState(image);
    const logged: string[] = [];
    const oldOffset = s.header.snapshotsOffset;
    try {
      expect(s.snapshots.map((e) => e.name)).toEqual(['first', 'second']);
      await s.lock.run(async () => {
        await writeSnapshotTable(s, [...s.snapshots], oldOffset, s.snapshotTableBytes, (line) => logged.push(line));
        s.registerMetadata();
      });
      const cs = s.geometry.clusterSize;
      expect(s.header.snapshotsOffset).not.toBe(oldOffset);
      expect(s.header.nbSnapshots).toBe(2);
      expect(s.metadata.kindAt(s.header.snapshotsOffset / cs)).toBe('snapshot-table');
      expect(s.metadata.kindAt(oldOffset / cs)).toBeUndefined();
      expect(s.snapshots.map((e) => e.name)).toEqual(['first', 'second']);
      expect(logged).toEqual([]);
    } finally {
      await image.close();
    }
    await qemuImgCheckClean(path);
    expect(((await qemuImgInfo(path)).snapshots ?? []).map((e) => e.name)).toEqual(['first', 'second']);
    await qemuImg(['snapshot', '-a', 'first', path]);
    await qemuIoOk(path, ['read -P 0x21 0 64k']);
  });

  it('the overlap check lets a write onto free space pass and refuses one onto the L1 table, marking the image corrupt', async () => {
    const path = join(tmp.path, 'overlap.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', path, String(4 * MiB)]);
    const image = await openImage(path, { readOnly: false });
    const s = imageState(image);
    try {
      const freeOffset = await s.lock.run(() => s.refcounts.allocatedEnd());
      expect(overlapsMetadata(s, freeOffset + 8 * 4096, 4096, undefined, 'test')).toBe(false);
      expect(s.readOnly).toBe(false);
      expect(overlapsMetadata(s, s.activeMap.l1.offset, 8, 'l2', 'test')).toBe(true);
      expect(s.readOnly).toBe(true);
    } finally {
      await image.close();
    }
    expect((await qemuImgInfo(path))['format-specific']?.data.corrupt).toBe(true);
  });

  it('StagingFile keeps every write in memory until commit, which writes the header last', async () => {
    const path = join(tmp.path, 'staged.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', path, String(4 * MiB)]);
    const original = await readFile(path);
    const file = await openNodeHostFile(path, { readOnly: false, lock: false });
    try {
      const staging = new StagingFile(file, original.length, 4096);
      const body = patternBuffer(10_000, 3, 70_000);
      const headerBytes = Buffer.from('QFI\xfbstaged', 'latin1');
      await staging.pwrite(body, 70_000);
      await staging.pwrite(headerBytes.subarray(4), 200);
      expect(await staging.size()).toBe(80_000);
      const back = Buffer.alloc(10_000);
      expect(await staging.pread(back, 70_000)).toBe(10_000);
      expect(back.equals(body)).toBe(true);
      expect((await readFile(path)).equals(original)).toBe(true);
      await staging.commit();
      const after = await readFile(path);
      expect(after.length).toBe(80_000);
      expect(after.subarray(70_000, 80_000).equals(body)).toBe(true);
      expect(after.subarray(200, 206).toString('latin1')).toBe('staged');
      expect(after.subarray(0, 200).equals(original.subarray(0, 200))).toBe(true);
    } finally {
      await file.close();
    }
  });
});
