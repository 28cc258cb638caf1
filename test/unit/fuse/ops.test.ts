/**
 * The ops factory without a mount: the tree, sizes, reads/writes, growth and truncation, nogrow,
 * read-only, inspection files and snapshot views, by calling the handlers directly.
 */
import { constants } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { createHandlers, toFsStat, snapshotFiles, type HostStatVfs, type OpsOptions } from '../../../src/fuse/ops.js';
import { MemoryDevice } from './memory-device.js';

const MiB = 1024 * 1024;
const HOST: HostStatVfs = {
  f_bsize: 4096, f_frsize: 4096, f_blocks: 1000, f_bfree: 600, f_bavail: 500, f_files: 100, f_ffree: 50, f_favail: 50, f_namemax: 255,
};

function setup(device = new MemoryDevice(MiB), overrides: Partial<OpsOptions> = {}) {
  const handlers = createHandlers(device, {
    readOnly: false, nogrow: false, rawName: 'disk.raw', statfsPath: '/', uid: 1234, gid: 5678,
    statVfs: async () => HOST, ...overrides,
  });
  return { device, handlers };
}

const pattern = (length: number, seed: number) => Buffer.from(Array.from({ length }, (_, i) => (i * 31 + seed) & 0xff));
const errCode = async (p: Promise<unknown>) => p.then(() => 'resolved', (err: { code?: string }) => err.code);

describe('tree', () => {
  it('lists the root and the snapshots directory', async () => {
    const { handlers } = setup(new MemoryDevice(MiB, { snapshots: [{ id: '1', name: 'before', data: Buffer.alloc(4096) }] }));
    expect(await handlers.readdir('/')).toEqual(['.', '..', 'disk.raw', 'info.json', 'map.json', 'layout.txt', 'check.json', 'snapshots']);
    expect(await handlers.readdir('/snapshots')).toEqual(['.', '..', 'before.raw']);
    expect(await errCode(handlers.readdir('/disk.raw'))).toBe('ENOTDIR');
    expect(await errCode(handlers.readdir('/nope'))).toBe('ENOENT');
  });

  it('uses -o name= for the raw file', async () => {
    const { handlers } = setup(undefined, { rawName: 'sda.img' });
    expect(await handlers.readdir('/')).toContain('sda.img');
    expect((await handlers.getattr('/sda.img')).size).toBe(MiB);
    expect(await errCode(handlers.getattr('/disk.raw'))).toBe('ENOENT');
  });

  it('reports types, modes and owners', async () => {
    const { handlers } = setup();
    const root = await handlers.getattr('/');
    expect(root.mode & constants.S_IFMT).toBe(constants.S_IFDIR);
    expect((await handlers.getattr('/snapshots')).mode & constants.S_IFMT).toBe(constants.S_IFDIR);
    const raw = await handlers.getattr('/disk.raw');
    expect(raw.mode).toBe(constants.S_IFREG | 0o644);
    expect([raw.uid, raw.gid]).toEqual([1234, 5678]);
    expect((await handlers.getattr('/info.json')).mode).toBe(constants.S_IFREG | 0o444);
    expect(await errCode(handlers.getattr('/missing'))).toBe('ENOENT');
    expect(await errCode(handlers.getattr('/disk.raw/x'))).toBe('ENOENT');
  });
});

describe('disk.raw sizes', () => {
  it('st_size is the virtual size and st_blocks the allocated bytes / 512', async () => {
    const { device, handlers } = setup(new MemoryDevice(4 * MiB));
    await device.write(0, Buffer.alloc(10, 1));
    const st = await handlers.getattr('/disk.raw');
    expect(st.size).toBe(4 * MiB);
    expect(st.blocks).toBe((await device.allocatedBytes()) / 512);
  });
});

describe('read and write', () => {
  it('reads what was written, at unaligned offsets', async () => {
    const { device, handlers } = setup();
    const fh = await handlers.open('/disk.raw', constants.O_RDWR);
    const data = pattern(5000, 7);
    expect(await handlers.write('/disk.raw', fh, data, 12345)).toBe(5000);
    expect(Buffer.compare(await handlers.read('/disk.raw', fh, 5000, 12345), data)).toBe(0);
    expect(Buffer.compare(device.data.subarray(12345, 17345), data)).toBe(0);
  });

  it('reads are short at the end and empty past it', async () => {
    const { handlers } = setup(new MemoryDevice(4096));
    const fh = await handlers.open('/disk.raw', constants.O_RDONLY);
    expect((await handlers.read('/disk.raw', fh, 8192, 0)).length).toBe(4096);
    expect((await handlers.read('/disk.raw', fh, 100, 4000)).length).toBe(96);
    expect((await handlers.read('/disk.raw', fh, 100, 4096)).length).toBe(0);
    expect((await handlers.read('/disk.raw', fh, 100, 99999)).length).toBe(0);
  });

  it('refuses writes on a handle opened read-only, and unknown handles', async () => {
    const { handlers } = setup();
    const fh = await handlers.open('/disk.raw', constants.O_RDONLY);
    expect(await errCode(handlers.write('/disk.raw', fh, Buffer.alloc(1), 0))).toBe('EBADF');
    expect(await errCode(handlers.read('/disk.raw', 999, 1, 0))).toBe('EBADF');
  });

  it('fsync flushes the device; flush (close) does not', async () => {
    const { device, handlers } = setup();
    const fh = await handlers.open('/disk.raw', constants.O_WRONLY);
    await handlers.flush('/disk.raw', fh);
    expect(device.calls.flush).toBe(0);
    await handlers.fsync('/disk.raw', false, fh);
    expect(device.calls.flush).toBe(1);
  });

  it('passes device errors through with their code', async () => {
    const { device, handlers } = setup();
    const fh = await handlers.open('/disk.raw', constants.O_RDWR);
    device.failNext('write', 'ENOSPC');
    expect(await errCode(handlers.write('/disk.raw', fh, Buffer.alloc(512), 0))).toBe('ENOSPC');
    device.failNext('read', 'ECORRUPT');
    expect(await errCode(handlers.read('/disk.raw', fh, 512, 0))).toBe('ECORRUPT');
  });
});

describe('growth and truncation', () => {
  it('a write past the end grows the file to exactly the write end; fsync trims the image to it rounded up to 512', async () => {
    const { device, handlers } = setup(new MemoryDevice(0));
    const fh = await handlers.open('/disk.raw', constants.O_WRONLY);
    expect(await handlers.write('/disk.raw', fh, pattern(1000, 1), 0)).toBe(1000);
    expect((await handlers.getattr('/disk.raw')).size).toBe(1000);
    expect(await handlers.write('/disk.raw', fh, pattern(501, 2), 10 * MiB)).toBe(501);
    expect((await handlers.getattr('/disk.raw')).size).toBe(10 * MiB + 501);
    expect((await handlers.read('/disk.raw', fh, MiB, 10 * MiB)).length).toBe(501);
    await handlers.fsync('/disk.raw', false, fh);
    expect(device.virtualSize).toBe(10 * MiB + 512);
    expect(device.data.subarray(1000, 10 * MiB).every((b) => b === 0)).toBe(true);
    expect(Buffer.compare(device.data.subarray(10 * MiB, 10 * MiB + 501), pattern(501, 2))).toBe(0);
    expect(device.data.subarray(10 * MiB + 501).every((b) => b === 0)).toBe(true);
  });

  it('grows the image ahead, geometrically: a sequential copy resizes it a few times, not per write', async () => {
    const { device, handlers } = setup(new MemoryDevice(0));
    const fh = await handlers.open('/disk.raw', constants.O_WRONLY);
    for (let i = 0; i < 1200; i++) await handlers.write('/disk.raw', fh, pattern(128 * 1024, i), i * 128 * 1024);
    expect((await handlers.getattr('/disk.raw')).size).toBe(1200 * 128 * 1024);
    expect(device.resizes).toEqual([64 * MiB, 128 * MiB, 256 * MiB]);
    await handlers.dispose();
    expect(device.virtualSize).toBe(1200 * 128 * 1024);
  });

  it('grows exactly when the image has internal snapshots (it could not be trimmed back)', async () => {
    const { device, handlers } = setup(new MemoryDevice(0, { snapshots: [{ id: '1', name: 's', data: Buffer.alloc(0) }] }));
    const fh = await handlers.open('/disk.raw', constants.O_WRONLY);
    await handlers.write('/disk.raw', fh, pattern(4096, 1), 0);
    await handlers.write('/disk.raw', fh, pattern(4096, 1), 4096);
    expect(device.resizes).toEqual([4096, 8192]);
  });

  it('trims the image before generating an inspection file, and keeps zeros beyond the file size', async () => {
    const { device, handlers } = setup(new MemoryDevice(0));
    const fh = await handlers.open('/disk.raw', constants.O_RDWR);
    await handlers.write('/disk.raw', fh, pattern(8192, 1), 0);
    expect(device.virtualSize).toBe(64 * MiB);
    const info = await handlers.open('/info.json', constants.O_RDONLY);
    expect(device.virtualSize).toBe(8192);
    expect(JSON.parse((await handlers.read('/info.json', info, 4096, 0)).toString())).toMatchObject({ 'virtual-size': 8192 });
    await handlers.write('/disk.raw', fh, pattern(4096, 2), 8192);
    await handlers.truncate('/disk.raw', 4096);
    await handlers.truncate('/disk.raw', 12288);
    expect(Buffer.compare(await handlers.read('/disk.raw', fh, 12288, 0), Buffer.concat([pattern(4096, 1), Buffer.alloc(8192)]))).toBe(0);
  });

  it('concurrent writes past the end all land, with one growth', async () => {
    const { device, handlers } = setup(new MemoryDevice(0));
    const fh = await handlers.open('/disk.raw', constants.O_WRONLY);
    const chunks = Array.from({ length: 16 }, (_, i) => pattern(4096, i));
    await Promise.all(chunks.map((c, i) => handlers.write('/disk.raw', fh, c, i * 4096)));
    expect((await handlers.getattr('/disk.raw')).size).toBe(16 * 4096);
    chunks.forEach((c, i) => expect(Buffer.compare(device.data.subarray(i * 4096, (i + 1) * 4096), c)).toBe(0));
    expect(device.resizes).toEqual([64 * MiB]);
  });

  it('truncate sets the exact size (shrink frees and zeroes the rest of the last sector, grow reads zeros); the image is that size rounded up to 512', async () => {
    const { device, handlers } = setup(new MemoryDevice(pattern(8192, 3)));
    await handlers.truncate('/disk.raw', 1000);
    expect(device.virtualSize).toBe(1024);
    expect((await handlers.getattr('/disk.raw')).size).toBe(1000);
    expect(device.data.subarray(1000, 1024).every((b) => b === 0)).toBe(true);
    await handlers.truncate('/disk.raw', 4096);
    expect((await handlers.getattr('/disk.raw')).size).toBe(4096);
    expect(Buffer.compare(device.data.subarray(0, 1000), pattern(8192, 3).subarray(0, 1000))).toBe(0);
    expect(device.data.subarray(1000).every((b) => b === 0)).toBe(true);
    const fh = await handlers.open('/disk.raw', constants.O_RDWR);
    await handlers.ftruncate('/disk.raw', fh, 0);
    expect(device.virtualSize).toBe(0);
    expect(await errCode(handlers.truncate('/disk.raw', -1))).toBe('EINVAL');
  });

  it('O_TRUNC empties the image, then writes grow it (cp onto disk.raw)', async () => {
    const { device, handlers } = setup(new MemoryDevice(pattern(MiB, 9)));
    const fh = await handlers.open('/disk.raw', constants.O_WRONLY | constants.O_TRUNC);
    expect(device.virtualSize).toBe(0);
    // cp of a sparse source: data, a hole skipped by seeking, data, then ftruncate to the full size.
    await handlers.write('/disk.raw', fh, pattern(4096, 1), 0);
    await handlers.write('/disk.raw', fh, pattern(4096, 2), 65536);
    await handlers.ftruncate('/disk.raw', fh, 200 * 1024);
    expect((await handlers.getattr('/disk.raw')).size).toBe(200 * 1024);
    await handlers.fsync('/disk.raw', true, fh);
    expect(device.virtualSize).toBe(200 * 1024);
    expect(Buffer.compare(device.data.subarray(0, 4096), pattern(4096, 1))).toBe(0);
    expect(device.data.subarray(4096, 65536).every((b) => b === 0)).toBe(true);
    expect(Buffer.compare(device.data.subarray(65536, 69632), pattern(4096, 2))).toBe(0);
    expect(device.data.subarray(69632).every((b) => b === 0)).toBe(true);
  });

  it('a shrink waits for in-flight reads of the old range', async () => {
    const { device, handlers } = setup(new MemoryDevice(pattern(8192, 4)));
    const fh = await handlers.open('/disk.raw', constants.O_RDONLY);
    const release = device.hold('read');
    const read = handlers.read('/disk.raw', fh, 4096, 4096);
    const shrink = handlers.truncate('/disk.raw', 0);
    await new Promise((r) => setTimeout(r, 10));
    expect(device.calls.resize).toBe(0);
    release();
    expect(Buffer.compare(await read, pattern(8192, 4).subarray(4096))).toBe(0);
    await shrink;
    expect(device.virtualSize).toBe(0);
  });
});

describe('nogrow', () => {
  it('writes wholly past the end fail EFBIG, straddling ones are short, truncate is EPERM', async () => {
    const { device, handlers } = setup(new MemoryDevice(4096), { nogrow: true });
    const fh = await handlers.open('/disk.raw', constants.O_RDWR);
    expect(await errCode(handlers.write('/disk.raw', fh, Buffer.alloc(512, 1), 4096))).toBe('EFBIG');
    expect(await handlers.write('/disk.raw', fh, Buffer.alloc(1000, 2), 3596)).toBe(500);
    expect(device.data.subarray(3596).every((b) => b === 2)).toBe(true);
    expect(await errCode(handlers.truncate('/disk.raw', 8192))).toBe('EPERM');
    expect(await errCode(handlers.truncate('/disk.raw', 0))).toBe('EPERM');
    expect(await errCode(handlers.open('/disk.raw', constants.O_WRONLY | constants.O_TRUNC))).toBe('EPERM');
    await handlers.truncate('/disk.raw', 4096);
    expect(device.virtualSize).toBe(4096);
    expect(device.calls.resize).toBe(0);
  });
});

describe('fallocate and lseek rules', () => {
  const KEEP = 1;
  const PUNCH = 2;
  const ZERO = 0x10;

  it('nogrow: growing modes past the end fail EFBIG, in-file ranges work; keep-size modes never grow', async () => {
    const { device, handlers } = setup(new MemoryDevice(pattern(8192, 5)), { nogrow: true });
    const fh = await handlers.open('/disk.raw', constants.O_RDWR);
    expect(await errCode(handlers.fallocate('/disk.raw', fh, 0, 8000, 1000))).toBe('EFBIG');
    expect(await errCode(handlers.fallocate('/disk.raw', fh, ZERO, 8000, 1000))).toBe('EFBIG');
    await handlers.fallocate('/disk.raw', fh, ZERO | KEEP, 8000, 1000);
    await handlers.fallocate('/disk.raw', fh, PUNCH | KEEP, 10, 20);
    await handlers.fallocate('/disk.raw', fh, 0, 0, 8192);
    expect(device.virtualSize).toBe(8192);
    expect(device.calls.resize).toBe(0);
    const expected = pattern(8192, 5);
    expected.fill(0, 8000, 8192);
    expected.fill(0, 10, 30);
    expect(Buffer.compare(device.data, expected)).toBe(0);
  });

  it('zeroing calls the device only for the part inside the file; an inactive range changes nothing', async () => {
    const { device, handlers } = setup(new MemoryDevice(pattern(4096, 6)));
    const fh = await handlers.open('/disk.raw', constants.O_RDWR);
    await handlers.fallocate('/disk.raw', fh, PUNCH | KEEP, 5000, 100);
    expect(device.calls.zeroRange).toBe(0);
    await handlers.fallocate('/disk.raw', fh, PUNCH | KEEP, 4000, 1000);
    expect(device.calls.zeroRange).toBe(1);
    expect(device.data.subarray(4000).every((b) => b === 0)).toBe(true);
    expect((await handlers.getattr('/disk.raw')).size).toBe(4096);
  });

  it('lseek: EBADF on an unknown handle, EINVAL for other whence values, ENXIO at and past the end', async () => {
    const { device, handlers } = setup(new MemoryDevice(4 * 65536));
    await device.write(2 * 65536, Buffer.alloc(10, 1));
    const fh = await handlers.open('/disk.raw', constants.O_RDONLY);
    expect(await handlers.lseek('/disk.raw', fh, 0, 3)).toBe(2 * 65536);
    expect(await handlers.lseek('/disk.raw', fh, 2 * 65536 + 5, 4)).toBe(3 * 65536);
    expect(await errCode(handlers.lseek('/disk.raw', fh, 3 * 65536, 3))).toBe('ENXIO');
    expect(await handlers.lseek('/disk.raw', fh, 3 * 65536, 4)).toBe(3 * 65536);
    expect(await errCode(handlers.lseek('/disk.raw', fh, 4 * 65536, 4))).toBe('ENXIO');
    expect(await errCode(handlers.lseek('/disk.raw', fh, 0, 1))).toBe('EINVAL');
    expect(await errCode(handlers.lseek('/disk.raw', 999, 0, 3))).toBe('EBADF');
    expect(await errCode(handlers.fallocate('/disk.raw', 999, 0, 0, 1))).toBe('EBADF');
  });
});

describe('read-only', () => {
  it('refuses every modification with EROFS and shows mode 0444', async () => {
    const { device, handlers } = setup(new MemoryDevice(4096, { readOnly: true }), { readOnly: true });
    expect((await handlers.getattr('/disk.raw')).mode & 0o777).toBe(0o444);
    expect(await errCode(handlers.open('/disk.raw', constants.O_RDWR))).toBe('EROFS');
    expect(await errCode(handlers.truncate('/disk.raw', 0))).toBe('EROFS');
    expect(await errCode(handlers.utimens('/disk.raw', new Date(), new Date()))).toBe('EROFS');
    expect(await errCode(handlers.refuse('create', '/new'))).toBe('EROFS');
    const fh = await handlers.open('/disk.raw', constants.O_RDONLY);
    expect((await handlers.read('/disk.raw', fh, 10, 0)).length).toBe(10);
    expect(device.calls.write + device.calls.resize).toBe(0);
  });
});

describe('inspection files', () => {
  it('reports the real size before any open, serves that content at open, keeps it per handle', async () => {
    const { device, handlers } = setup(new MemoryDevice(4 * MiB));
    const sizeBefore = (await handlers.getattr('/info.json')).size;
    expect(sizeBefore).toBeGreaterThan(0);
    const fh1 = await handlers.open('/info.json', constants.O_RDONLY);
    expect(device.calls.infoJson).toBe(1);
    const size1 = (await handlers.getattr('/info.json')).size;
    expect(size1).toBe(sizeBefore);
    const text1 = (await handlers.read('/info.json', fh1, 1 << 20, 0)).toString();
    expect(text1.length).toBe(size1);
    expect(JSON.parse(text1)).toMatchObject({ 'virtual-size': 4 * MiB, format: 'qcow2' });

    await handlers.truncate('/disk.raw', 64 * MiB);
    const fh2 = await handlers.open('/info.json', constants.O_RDONLY);
    const text2 = (await handlers.read('/info.json', fh2, 1 << 20, 0)).toString();
    expect((JSON.parse(text2) as Record<string, unknown>)['virtual-size']).toBe(64 * MiB);
    expect((await handlers.getattr('/info.json')).size).toBe(Buffer.byteLength(text2));
    // The first handle still sees its own snapshot.
    expect((await handlers.read('/info.json', fh1, 1 << 20, 0)).toString()).toBe(text1);
    await handlers.release('/info.json', fh1);
    await handlers.release('/info.json', fh2);
    expect(handlers.openHandles()).toBe(0);
  });

  it('regenerates for getattr only after the image changed; each open keeps its snapshot; old snapshots close', async () => {
    const { handlers } = setup(new MemoryDevice(4 * MiB), { capture: { memoryLimitBytes: 10 } });
    const first = (await handlers.getattr('/map.json')).size;
    await handlers.getattr('/map.json');
    const fh1 = await handlers.open('/map.json', constants.O_RDONLY);
    const text1 = (await handlers.read('/map.json', fh1, 1 << 20, 0)).toString();
    expect(text1.length).toBe(first);
    const raw = await handlers.open('/disk.raw', constants.O_RDWR);
    await handlers.write('/disk.raw', raw, Buffer.alloc(10, 1), 65536);
    const second = (await handlers.getattr('/map.json')).size;
    expect(second).toBeGreaterThan(first);
    const fh2 = await handlers.open('/map.json', constants.O_RDONLY);
    expect((await handlers.read('/map.json', fh2, 1 << 20, 0)).length).toBe(second);
    expect((await handlers.read('/map.json', fh1, 1 << 20, 0)).toString()).toBe(text1);
    for (const fh of [fh1, fh2, raw]) await handlers.release('/map.json', fh);
    await handlers.dispose();
    expect(handlers.openHandles()).toBe(0);
  });

  it('serves map.json, layout.txt and check.json, reading in pieces', async () => {
    const { device, handlers } = setup(new MemoryDevice(4 * MiB));
    await device.write(65536, Buffer.alloc(100, 1));
    for (const name of ['map.json', 'layout.txt', 'check.json']) {
      const fh = await handlers.open(`/${name}`, constants.O_RDONLY);
      const size = (await handlers.getattr(`/${name}`)).size;
      const parts: Buffer[] = [];
      for (let pos = 0; pos < size; pos += 7) parts.push(await handlers.read(`/${name}`, fh, 7, pos));
      expect((await handlers.read(`/${name}`, fh, 7, size)).length).toBe(0);
      const text = Buffer.concat(parts).toString();
      expect(text.length).toBe(size);
      if (name.endsWith('.json')) expect(() => JSON.parse(text) as unknown).not.toThrow();
      else expect(text).toContain('\tdata\t65536');
      await handlers.release(`/${name}`, fh);
    }
    expect(device.calls.check).toBe(1);
  });

  it('refuses writing (EACCES) and truncation', async () => {
    const { handlers } = setup();
    expect(await errCode(handlers.open('/map.json', constants.O_WRONLY))).toBe('EACCES');
    expect(await errCode(handlers.truncate('/check.json', 0))).toBe('EACCES');
    expect(await errCode(handlers.utimens('/info.json', new Date(), new Date()))).toBe('EACCES');
  });

  it('a failing generator fails the open with the error code', async () => {
    const { device, handlers } = setup();
    device.failNext('check', 'ECORRUPT');
    expect(await errCode(handlers.open('/check.json', constants.O_RDONLY))).toBe('ECORRUPT');
    expect(handlers.openHandles()).toBe(0);
  });
});

describe('snapshot views', () => {
  const snaps = [
    { id: '1', name: 'base', data: pattern(8192, 5) },
    { id: '2', name: 'dup', data: pattern(4096, 6) },
    { id: '3', name: 'dup', data: pattern(4096, 7) },
    { id: '4', name: 'a/b', data: pattern(512, 8) },
  ];

  it('names files uniquely and escapes slashes', () => {
    expect([...snapshotFiles(new MemoryDevice(0, { snapshots: snaps }).listSnapshots()).entries()].map(([f, e]) => [f, e.ref]))
      .toEqual([['base.raw', '1'], ['dup@2.raw', '2'], ['dup@3.raw', '3'], ['a%2Fb.raw', '4']]);
  });

  it('reads a snapshot read-only, shares one view per snapshot and closes it with the last handle', async () => {
    const { device, handlers } = setup(new MemoryDevice(MiB, { snapshots: snaps }));
    expect((await handlers.getattr('/snapshots/base.raw')).size).toBe(8192);
    const a = await handlers.open('/snapshots/base.raw', constants.O_RDONLY);
    const b = await handlers.open('/snapshots/base.raw', constants.O_RDONLY);
    expect(device.openViews).toBe(1);
    expect(Buffer.compare(await handlers.read('/snapshots/base.raw', a, 9000, 0), snaps[0].data)).toBe(0);
    expect(Buffer.compare(await handlers.read('/snapshots/dup@3.raw', await handlers.open('/snapshots/dup@3.raw', 0), 4096, 0), snaps[2].data)).toBe(0);
    expect(await errCode(handlers.open('/snapshots/base.raw', constants.O_RDWR))).toBe('EACCES');
    await handlers.release('/snapshots/base.raw', a);
    expect(device.openViews).toBe(2);
    await handlers.release('/snapshots/base.raw', b);
    expect(device.openViews).toBe(1);
    await handlers.dispose();
    expect(device.openViews).toBe(0);
    expect(handlers.openHandles()).toBe(0);
  });
});

describe('statfs, utimens, refusals', () => {
  it('reports the host filesystem, flagged read-only on a read-only mount', async () => {
    expect(await setup().handlers.statfs('/')).toMatchObject({ bsize: 4096, frsize: 4096, blocks: 1000, bfree: 600, bavail: 500, flag: 0 });
    expect((await setup(new MemoryDevice(0, { readOnly: true }), { readOnly: true }).handlers.statfs('/')).flag).toBe(1);
  });

  it('scales filesystems with more than 2^32 blocks into 32-bit fields', () => {
    const st = toFsStat({ ...HOST, f_blocks: 2 ** 34, f_bfree: 2 ** 33, f_bavail: 2 ** 33 }, false);
    expect(st.frsize * st.blocks).toBe(4096 * 2 ** 34);
    expect(st.blocks).toBeLessThanOrEqual(0xffffffff);
    expect(st.bavail * st.frsize).toBe(4096 * 2 ** 33);
  });

  it('reads the real host filesystem through fs-ext', async () => {
    const { handlers } = setup(undefined, { statVfs: undefined, statfsPath: '/' });
    const st = await handlers.statfs('/');
    expect(st.blocks).toBeGreaterThan(0);
    expect(st.namemax).toBeGreaterThan(0);
  });

  it('utimens sets the raw file times', async () => {
    const { handlers } = setup();
    const when = new Date('2020-01-02T03:04:05Z');
    await handlers.utimens('/disk.raw', when, when);
    const st = await handlers.getattr('/disk.raw');
    expect([st.atime.getTime(), st.mtime.getTime()]).toEqual([when.getTime(), when.getTime()]);
  });

  it('refuses creating, removing and renaming entries with EPERM', async () => {
    const { handlers } = setup();
    expect(await errCode(handlers.refuse('unlink', '/disk.raw'))).toBe('EPERM');
    expect(await errCode(handlers.open('/', constants.O_RDONLY))).toBe('EISDIR');
  });
});

describe('st_blocks', () => {
  it('concurrent getattrs share one allocatedBytes() call', async () => {
    const { device, handlers } = setup();
    const release = device.hold('allocatedBytes');
    const stats = Promise.all([handlers.getattr('/disk.raw'), handlers.getattr('/disk.raw'), handlers.getattr('/disk.raw')]);
    await new Promise((r) => setTimeout(r, 5));
    release();
    expect(new Set((await stats).map((s) => s.blocks)).size).toBe(1);
    expect(device.calls.allocatedBytes).toBe(1);
    await handlers.getattr('/disk.raw');
    expect(device.calls.allocatedBytes).toBe(2);
  });
});
