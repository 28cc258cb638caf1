import { describe, expect, it } from 'vitest';

import { allocAligned } from '../../../src/io/aligned-buffer.js';
import { HostIoError } from '../../../src/io/errors.js';
import { MemoryHostFile } from '../../../src/io/memory-host-file.js';

function pattern(bytes: number, seed: number): Buffer {
  const out = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i++) {
    out[i] = (i * 31 + seed) % 256;
  }
  return out;
}

describe('MemoryHostFile', () => {
  it('reads back what was written, across chunk boundaries, and grows', async () => {
    const file = new MemoryHostFile({ chunkBytes: 4096 });
    const data = pattern(10000, 1);
    await file.pwrite(data, 3000);
    expect(await file.size()).toBe(13000);
    const back = Buffer.alloc(10000);
    expect(await file.pread(back, 3000)).toBe(10000);
    expect(back.equals(data)).toBe(true);
    const head = Buffer.alloc(3000, 0xff);
    expect(await file.pread(head, 0)).toBe(3000);
    expect(head.every((b) => b === 0)).toBe(true);
  });

  it('returns short reads at the end of file and leaves the rest of the buffer untouched', async () => {
    const file = MemoryHostFile.from(Buffer.from('hello'));
    const out = Buffer.alloc(10, 0x2e);
    expect(await file.pread(out, 2)).toBe(3);
    expect(out.toString()).toBe('llo.......');
    expect(await file.pread(out, 100)).toBe(0);
  });

  it('is sparse: untouched ranges cost nothing, punched chunks are dropped', async () => {
    const file = new MemoryHostFile({ chunkBytes: 65536 });
    await file.pwrite(Buffer.alloc(10, 1), 2 ** 40);
    expect(await file.size()).toBe(2 ** 40 + 10);
    expect(file.allocatedBytes()).toBe(65536);

    await file.pwrite(pattern(4 * 65536, 2), 0);
    expect(file.allocatedBytes()).toBe(5 * 65536);
    expect(await file.punchHole(65536 - 100, 2 * 65536 + 200)).toBe(true);
    expect(file.allocatedBytes()).toBe(3 * 65536);
    const back = Buffer.alloc(4 * 65536);
    await file.pread(back, 0);
    const expected = pattern(4 * 65536, 2);
    expected.fill(0, 65536 - 100, 3 * 65536 + 100);
    expect(back.equals(expected)).toBe(true);
    expect(await file.size()).toBe(2 ** 40 + 10);
  });

  it('zeroRange zeros, extends unless keepSize; allocate only moves the size', async () => {
    const file = MemoryHostFile.from(pattern(8192, 3));
    expect(await file.zeroRange(100, 200)).toBe(true);
    const back = Buffer.alloc(8192);
    await file.pread(back, 0);
    expect(back.subarray(100, 300).every((b) => b === 0)).toBe(true);
    expect(back[99]).toBe(pattern(8192, 3)[99]);
    expect(await file.zeroRange(8000, 1000, true)).toBe(true);
    expect(await file.size()).toBe(8192);
    expect(await file.zeroRange(8000, 1000)).toBe(true);
    expect(await file.size()).toBe(9000);
    expect(await file.allocate(20000, 100, true)).toBe(true);
    expect(await file.size()).toBe(9000);
    expect(await file.allocate(20000, 100)).toBe(true);
    expect(await file.size()).toBe(20100);
  });

  it('truncate shrinks and regrows with zeros', async () => {
    const file = MemoryHostFile.from(pattern(10000, 4));
    await file.truncate(5000);
    expect(await file.size()).toBe(5000);
    await file.truncate(10000);
    const back = Buffer.alloc(10000);
    await file.pread(back, 0);
    expect(back.subarray(0, 5000).equals(pattern(10000, 4).subarray(0, 5000))).toBe(true);
    expect(back.subarray(5000).every((b) => b === 0)).toBe(true);
    expect(file.snapshot().equals(back)).toBe(true);
  });

  it('emulates O_DIRECT alignment constraints', async () => {
    const file = new MemoryHostFile({ directAlignment: 4096 });
    expect(file.direct).toBe(true);
    expect(file.dioAlignment).toBe(4096);
    const aligned = allocAligned(8192, 4096);
    await file.pwrite(aligned, 4096);
    await expect(file.pwrite(aligned, 512)).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(file.pwrite(aligned.subarray(0, 1000), 0)).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(file.pwrite(Buffer.from(aligned.subarray(512, 512 + 4096)), 0)).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(file.pread(aligned.subarray(16, 16 + 4096), 0)).rejects.toMatchObject({ code: 'EINVAL' });

    const relaxed = new MemoryHostFile({ directAlignment: 512, checkMemoryAlignment: false });
    await relaxed.pwrite(Buffer.alloc(512), 1024);
    await expect(relaxed.pwrite(Buffer.alloc(512), 100)).rejects.toBeInstanceOf(HostIoError);
  });

  it('refuses writes when read-only and everything after close', async () => {
    const file = new MemoryHostFile({ readOnly: true, path: 'ro-image' });
    await expect(file.pwrite(Buffer.alloc(1), 0)).rejects.toMatchObject({ code: 'EBADF' });
    await expect(file.truncate(0)).rejects.toMatchObject({ code: 'EBADF' });
    await file.close();
    await file.close();
    const failure = await file.pread(Buffer.alloc(1), 0).catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(HostIoError);
    expect((failure as HostIoError).message).toContain('ro-image');
  });

  it('rejects offsets that are not safe integers', async () => {
    const file = new MemoryHostFile();
    await expect(file.pwrite(Buffer.alloc(1), -1)).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(file.pread(Buffer.alloc(1), 2 ** 53)).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(file.pwrite(Buffer.alloc(1), 1.5)).rejects.toMatchObject({ code: 'EINVAL' });
  });

  it('counts operations', async () => {
    const file = new MemoryHostFile();
    await file.pwrite(Buffer.alloc(100), 0);
    await file.pwrite(Buffer.alloc(50), 0);
    await file.fdatasync();
    await file.pread(Buffer.alloc(10), 0);
    expect(file.stats).toMatchObject({ pwrites: 2, bytesWritten: 150, fdatasyncs: 1, preads: 1 });
  });
});
