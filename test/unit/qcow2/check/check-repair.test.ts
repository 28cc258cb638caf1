/**
 * The dirty-bit repair: an image with lazy refcounts whose writer was killed has stale refcounts and
 * the dirty bit set. Opening it writable with ours repairs it the way a writable QEMU open does
 * (byte for byte), clears the dirty bit, and qemu-img check calls it clean; a read-only open leaves
 * it alone; an image the repair cannot fix is refused as QEMU refuses it, without a write.
 */
import { copyFile, readFile, stat, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { CodedError } from '../../../../src/io/errors.js';
import { MemoryHostFile } from '../../../../src/io/memory-host-file.js';
import { StagingFile } from '../../../../src/qcow2/check/dirty-repair.js';
import { peek, poke, setRefcount16 } from '../../../corruption/poke.js';
import { sha256 } from '../../../helpers/files.js';
import { qemuImgCheck, qemuImgCreate, qemuIo, qemuIoOk } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTools } from '../../../helpers/tools.js';
import { openImage } from '../../../../src/node.js';

const hasQemu = requireTools('qemu-img', 'qemu-io');
const SIGKILL = 9;

async function incompatibleBits(path: string): Promise<number> {
  return (await readFile(path))[79] & 0x03;
}

/** qemu-io with lazy refcounts, killed right after its writes (qemu-iotests 039). */
async function crashedLazyImage(path: string): Promise<void> {
  await qemuImgCreate(path, '64M', { lazy_refcounts: true });
  const result = await qemuIo(path, ['write -P 0x5a 0 512', 'write -P 0x5b 4M 128k', `sigraise ${SIGKILL}`], { cache: 'writethrough' });
  expect(result.code).not.toBe(0);
  expect(await incompatibleBits(path)).toBe(0x01);
}

describe.skipIf(!hasQemu)('dirty image repair on open', () => {
  const tmp = useTempDir('check-repair');

  it('repairs a crashed lazy-refcounts image like a writable QEMU open', async () => {
    const ours = tmp.file('ours.qcow2');
    const theirs = tmp.file('qemu.qcow2');
    await crashedLazyImage(ours);
    await copyFile(ours, theirs);
    const before = await qemuImgCheck(ours);
    expect(before.code).toBe(2);
    expect(before.report?.corruptions).toBeGreaterThan(0);

    const image = await openImage(ours, { readOnly: false });
    expect((await image.read(0, 512)).equals(Buffer.alloc(512, 0x5a))).toBe(true);
    expect((await image.read(4 << 20, 128 * 1024)).equals(Buffer.alloc(128 * 1024, 0x5b))).toBe(true);
    await image.close();

    expect(await incompatibleBits(ours)).toBe(0);
    const after = await qemuImgCheck(ours);
    expect(after.code).toBe(0);
    expect(after.report?.corruptions ?? 0).toBe(0);
    expect(after.report?.leaks ?? 0).toBe(0);
    await qemuIoOk(theirs, ['read -P 0x5a 0 512']);
    expect(sha256(await readFile(ours))).toBe(sha256(await readFile(theirs)));
  });

  it('writes to a repaired image keep it clean', async () => {
    const path = tmp.file('a.qcow2');
    await crashedLazyImage(path);
    const image = await openImage(path, { readOnly: false });
    await image.write(8 << 20, Buffer.alloc(256 * 1024, 0x77));
    await image.close();
    expect((await qemuImgCheck(path)).code).toBe(0);
    await qemuIoOk(path, ['read -P 0x77 8M 256k', 'read -P 0x5b 4M 128k'], { readOnly: true });
  });

  it('drops a crash\'s refcount for a cluster past the end of the file, which no check sees until the file grows', async () => {
    // What a power cut left in a lazy-refcounts image (powercut test, seed 2294096977): the refcount
    // block says cluster 6 is in use, the write that would have extended the file over it never landed.
    const path = tmp.file('beyond.qcow2');
    await qemuImgCreate(path, '2M', { lazy_refcounts: true, cluster_size: 8192 });
    const size = (await stat(path)).size;
    expect(size).toBeLessThan(6 * 8192);
    await setRefcount16(path, 6, 1);
    await poke(path, 79, Buffer.of((await peek(path, 79, 1))[0] | 0x01));
    expect((await qemuImgCheck(path)).code).toBe(0); // qemu-img check compares clusters inside the file only

    const image = await openImage(path, { readOnly: false });
    await image.write(0, Buffer.alloc(8 * 8192, 0x3c));
    await image.close();
    const after = await qemuImgCheck(path);
    expect(after.report).toMatchObject({ 'check-errors': 0 });
    expect(after.report?.leaks ?? 0).toBe(0);
    expect(after.code).toBe(0);
    await qemuIoOk(path, ['read -P 0x3c 0 64k'], { readOnly: true });
  });

  it('leaves a dirty image alone when opened read-only', async () => {
    const path = tmp.file('ro.qcow2');
    await crashedLazyImage(path);
    const hash = sha256(await readFile(path));
    const image = await openImage(path, { readOnly: true });
    expect((await image.read(0, 512)).equals(Buffer.alloc(512, 0x5a))).toBe(true);
    await image.close();
    expect(sha256(await readFile(path))).toBe(hash);
  });

  it('refuses a dirty image its repair cannot fix, as QEMU does, and leaves it untouched', async () => {
    const ours = tmp.file('bad.qcow2');
    const theirs = tmp.file('bad-qemu.qcow2');
    await qemuImgCreate(ours, '64M', { lazy_refcounts: true });
    await qemuIoOk(ours, ['write -P 0x5a 0 512']);
    const bytes = await readFile(ours);
    const reftable = Number(bytes.readBigUInt64BE(48));
    bytes.writeBigUInt64BE(0x20200n, reftable); // first refcount block unaligned: every refcount lookup fails
    bytes[79] = bytes[79] | 0x01;
    await writeFile(ours, bytes);
    await copyFile(ours, theirs);

    const qemu = await qemuIo(theirs, ['read 0 512']);
    expect(qemu.stderr).toContain('Could not repair dirty image');
    const hash = sha256(await readFile(ours));
    await expect(openImage(ours, { readOnly: false })).rejects.toSatisfy((err) => err instanceof CodedError && err.code === 'EIO');
    // QEMU leaves it marked corrupt (and may leave it half repaired); ours stages the repair and writes nothing.
    expect(await incompatibleBits(theirs)).toBe(0x03);
    expect(sha256(await readFile(ours))).toBe(hash);
  });
});

describe('StagingFile (the staged dirty repair)', () => {
  function real(bytes: number): MemoryHostFile {
    const data = Buffer.alloc(bytes);
    for (let i = 0; i < bytes; i++) data[i] = i % 251;
    return MemoryHostFile.from(data);
  }

  async function contents(file: { size(): Promise<number>; pread(buf: Uint8Array, offset: number): Promise<number> }): Promise<Buffer> {
    const buf = Buffer.alloc(await file.size());
    await file.pread(buf, 0);
    return buf;
  }

  it('shows staged writes to reads and leaves the real file alone until commit', async () => {
    const inner = real(40_000);
    const before = await contents(inner);
    const staged = new StagingFile(inner, 40_000, 8192);
    await staged.pwrite(Buffer.alloc(5000, 0xee), 3000);
    await staged.pwrite(Buffer.alloc(10, 0xdd), 45_000); // past the end: the file grows, the gap reads as zeros
    expect(await staged.size()).toBe(45_010);
    const view = await contents(staged);
    expect(view.subarray(3000, 8000).equals(Buffer.alloc(5000, 0xee))).toBe(true);
    expect(view.subarray(0, 3000).equals(before.subarray(0, 3000))).toBe(true);
    expect(view.subarray(40_000, 45_000).equals(Buffer.alloc(5000))).toBe(true);
    expect((await contents(inner)).equals(before)).toBe(true);

    await staged.commit();
    expect((await contents(inner)).equals(view)).toBe(true);
  });

  it('stages truncation and punched holes, and commits the header cluster last', async () => {
    const inner = real(64 * 1024);
    const staged = new StagingFile(inner, 64 * 1024, 8192);
    expect(await staged.punchHole(20_000, 6000)).toBe(true);
    await staged.truncate(30_000);
    await staged.pwrite(Buffer.alloc(16, 0x11), 0);
    const view = await contents(staged);
    expect(view.length).toBe(30_000);
    expect(view.subarray(20_000, 26_000).equals(Buffer.alloc(6000))).toBe(true);

    const order: number[] = [];
    const pwrite = inner.pwrite.bind(inner);
    inner.pwrite = async (buf, offset, point) => {
      order.push(offset);
      await pwrite(buf, offset, point);
    };
    await staged.commit();
    expect(order[order.length - 1]).toBe(0);
    expect(order.slice(0, -1).every((offset) => offset >= 8192)).toBe(true);
    expect((await contents(inner)).equals(view)).toBe(true);
  });
});
