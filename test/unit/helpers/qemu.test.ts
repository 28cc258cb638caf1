import { open, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { sha256File } from '../../helpers/files.js';
import { patternBuffer } from '../../helpers/patterns.js';
import {
  QemuError, qemuImg, qemuImgCheck, qemuImgCheckClean, qemuImgCompare, qemuImgConvertToRaw, qemuImgCreate, qemuImgInfo, qemuImgMap, qemuIo, qemuIoOk,
} from '../../helpers/qemu.js';
import { tempDir } from '../../helpers/tmp.js';
import { requireTools } from '../../helpers/tools.js';

const hasQemu = requireTools('qemu-img', 'qemu-io');

describe.skipIf(!hasQemu)('qemu wrappers (real qemu-img / qemu-io)', () => {
  it('creates an image with -o options and reads them back from info', async () => {
    const img = join(await tempDir(), 'a.qcow2');
    await qemuImgCreate(img, '16M', { cluster_size: 4096, compression_type: 'zstd', lazy_refcounts: true, refcount_bits: 8 });
    const info = await qemuImgInfo(img);
    expect(info['virtual-size']).toBe(16 << 20);
    expect(info.format).toBe('qcow2');
    expect(info['cluster-size']).toBe(4096);
    expect(info['format-specific']?.data).toMatchObject({ compat: '1.1', 'compression-type': 'zstd', 'lazy-refcounts': true, 'refcount-bits': 8 });
  });

  it('makes backing chains and raw images', async () => {
    const dir = await tempDir();
    await qemuImgCreate(join(dir, 'base.raw'), 1 << 20, {}, { format: 'raw' });
    await qemuImgCreate(join(dir, 'top.qcow2'), 1 << 20, {}, { backing: 'base.raw', backingFormat: 'raw' });
    const info = await qemuImgInfo(join(dir, 'top.qcow2'));
    expect(info['backing-filename']).toBe('base.raw');
    expect(info['backing-filename-format']).toBe('raw');
    expect((await qemuImgInfo(join(dir, 'base.raw'), 'raw')).format).toBe('raw');
  });

  it('qemu-io writes and verifies patterns; a wrong pattern is exit code 1', async () => {
    const img = join(await tempDir(), 'io.qcow2');
    await qemuImgCreate(img, '4M');
    await qemuIoOk(img, ['write -P 0xab 64k 64k', 'write -z 1M 64k']);
    expect((await qemuIo(img, ['read -P 0xab 64k 64k'], { readOnly: true })).code).toBe(0);
    const wrong = await qemuIo(img, ['read -P 0xac 64k 64k'], { readOnly: true });
    expect(wrong.code).toBe(1);
    expect(wrong.stdout).toMatch(/Pattern verification failed/);
    await expect(qemuIoOk(img, ['read -P 0x00 64k 4k'])).rejects.toBeInstanceOf(QemuError);
  });

  it('map lists data and zero extents with host offsets', async () => {
    const img = join(await tempDir(), 'map.qcow2');
    await qemuImgCreate(img, '4M', { cluster_size: 65536 });
    await qemuIoOk(img, ['write -P 1 128k 64k']);
    const map = await qemuImgMap(img);
    expect(map.reduce((sum, e) => sum + e.length, 0)).toBe(4 << 20);
    const data = map.filter((e) => e.data);
    expect(data).toHaveLength(1);
    expect(data[0]).toMatchObject({ start: 131072, length: 65536, present: true, zero: false });
    expect(data[0]?.offset).toBeGreaterThan(0);
  });

  it('check: clean is 0, a leaked cluster is 3 (repaired by -r leaks), a dangling L2 entry is 2', async () => {
    const dir = await tempDir();
    const img = join(dir, 'chk.qcow2');
    await qemuImgCreate(img, '4M', { cluster_size: 65536 });
    await qemuIoOk(img, ['write -P 7 0 128k']);
    const clean = await qemuImgCheck(img);
    expect(clean.code).toBe(0);
    expect(clean.report).toMatchObject({ 'check-errors': 0, format: 'qcow2', 'allocated-clusters': 2 });
    expect(await qemuImgCheckClean(img)).toEqual(clean.report);

    // Clear L2 entry 1: its data cluster keeps refcount 1 with no reference, i.e. leaks.
    const l2EntryOffset = async (index: number) => {
      const file = await open(img, 'r');
      try {
        const header = Buffer.alloc(48);
        await file.read(header, 0, 48, 0);
        const l1 = Buffer.alloc(8);
        await file.read(l1, 0, 8, Number(header.readBigUInt64BE(40)));
        return Number(l1.readBigUInt64BE(0) & 0x00fffffffffffe00n) + 8 * index;
      } finally {
        await file.close();
      }
    };
    const patch = async (offset: number, entry: bigint) => {
      const file = await open(img, 'r+');
      const buf = Buffer.alloc(8);
      buf.writeBigUInt64BE(entry);
      await file.write(buf, 0, 8, offset);
      await file.close();
    };
    await patch(await l2EntryOffset(1), 0n);
    const leaked = await qemuImgCheck(img);
    expect(leaked.code).toBe(3);
    expect(leaked.report).toMatchObject({ leaks: 1, 'check-errors': 0 });
    await expect(qemuImgCheckClean(img)).rejects.toThrow(/exited 3 .*"leaks":1/);
    const repaired = await qemuImgCheck(img, 'leaks');
    expect(repaired.code).toBe(0);
    expect(repaired.report).toMatchObject({ 'leaks-fixed': 1 });

    // Point L2 entry 2 at a cluster far past the end, whose refcount is 0: a corruption.
    await patch(await l2EntryOffset(2), (1n << 63n) | (64n << 16n));
    const corrupt = await qemuImgCheck(img);
    expect(corrupt.code).toBe(2);
    expect(corrupt.report?.corruptions).toBeGreaterThan(0);

    const missing = await qemuImgCheck(join(dir, 'nope.qcow2'));
    expect(missing.code).toBe(1);
    expect(missing.report).toBeUndefined();
    expect(missing.stderr).toMatch(/Could not open/);
  });

  it('compare and convert-to-raw agree with the bytes written', async () => {
    const dir = await tempDir();
    const raw = join(dir, 'src.raw');
    const data = Buffer.alloc(1 << 20);
    patternBuffer(300_000, 99, 12_345).copy(data, 12_345);
    await writeFile(raw, data);
    const img = join(dir, 'c.qcow2');
    expect((await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', raw, img])).code).toBe(0);
    expect(await qemuImgCompare(img, raw, { formatA: 'qcow2', formatB: 'raw' })).toBe(true);
    await qemuImgConvertToRaw(img, join(dir, 'back.raw'));
    expect(await sha256File(join(dir, 'back.raw'))).toBe(await sha256File(raw));
    await qemuIoOk(img, ['write -P 0x5a 512k 4k']);
    expect(await qemuImgCompare(img, raw)).toBe(false);
    await expect(qemuImgCompare(img, join(dir, 'missing.raw'))).rejects.toBeInstanceOf(QemuError);
  });

  it('convert-to-raw reads an internal snapshot', async () => {
    const dir = await tempDir();
    const img = join(dir, 's.qcow2');
    await qemuImgCreate(img, '1M');
    await qemuIoOk(img, ['write -P 0x11 0 64k']);
    expect((await qemuImg(['snapshot', '-c', 'before', img])).code).toBe(0);
    await qemuIoOk(img, ['write -P 0x22 0 64k']);
    await qemuImgConvertToRaw(img, join(dir, 'snap.raw'), { snapshot: 'before' });
    await qemuImgConvertToRaw(img, join(dir, 'now.raw'));
    expect(await qemuImgCompare(join(dir, 'snap.raw'), join(dir, 'now.raw'), { formatA: 'raw', formatB: 'raw' })).toBe(false);
    expect((await qemuIo(join(dir, 'snap.raw'), ['read -P 0x11 0 64k'], { format: 'raw' })).code).toBe(0);
    expect((await qemuIo(join(dir, 'now.raw'), ['read -P 0x22 0 64k'], { format: 'raw' })).code).toBe(0);
  });
});
