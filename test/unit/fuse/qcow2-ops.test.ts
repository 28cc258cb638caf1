/**
 * The ops handlers over real qcow2 images (Qcow2Device), without a mount: fallocate (punch hole, zero
 * range, allocate, refused modes), SEEK_DATA/SEEK_HOLE against `qemu-img map`, exact POSIX sizes, on
 * images made by qemu-img/qemu-io — with backing files, v2 and v3, compressed mounts and snapshot
 * views — and checked afterwards with qemu-io `read -P` and `qemu-img check`.
 */
import { constants } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { createHandlers, type FsHandlers, type OpsOptions } from '../../../src/fuse/ops.js';
import { Qcow2Device } from '../../../src/fuse/qcow2-device.js';
import {
  FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_UNSHARE_RANGE,
  FALLOC_FL_ZERO_RANGE, SEEK_DATA, SEEK_HOLE,
} from '../../../src/fuse/raw-file.js';
import { qemuImg, qemuImgCheckClean, qemuImgConvertToRaw, qemuImgCreate, qemuImgInfo, qemuImgMap, qemuIoOk, type QemuMapEntry } from '../../helpers/qemu.js';
import { useTempDir } from '../../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
const RAW = '/disk.raw';

const errCode = async (p: Promise<unknown>) => p.then(() => 'resolved', (err: { code?: string }) => err.code);

interface Mounted {
  device: Qcow2Device;
  handlers: FsHandlers;
  fh: number;
  /** dispose the handlers and close the image (as an unmount does). */
  close(): Promise<void>;
}

async function openHandlers(path: string, overrides: Partial<OpsOptions> & { compress?: boolean } = {}): Promise<Mounted> {
  const { compress, ...ops } = overrides;
  const readOnly = ops.readOnly ?? false;
  const device = await Qcow2Device.open(path, { readOnly, ...(compress === true ? { compress } : {}) });
  const handlers = createHandlers(device, {
    readOnly, nogrow: false, rawName: 'disk.raw', statfsPath: '/', uid: 0, gid: 0,
    statVfs: async () => { throw new Error('unused'); }, ...ops,
  });
  const fh = await handlers.open(RAW, readOnly ? constants.O_RDONLY : constants.O_RDWR);
  return {
    device, handlers, fh,
    close: async () => {
      await handlers.release(RAW, fh);
      await handlers.dispose();
      await device.close();
    },
  };
}

/** qemu-io `read -P` of each [offset, length, byte] (fails the test on any mismatch). */
async function expectBytes(image: string, ranges: [number, number, number][]): Promise<void> {
  await qemuIoOk(image, ranges.map(([offset, length, byte]) => `read -P ${byte} ${offset} ${length}`));
}

/** Bytes of `qemu-img map` marked as data in [start, end). */
function dataBytesIn(map: QemuMapEntry[], start: number, end: number): number {
  return map.filter((e) => e.data).reduce((n, e) => n + Math.max(0, Math.min(end, e.start + e.length) - Math.max(start, e.start)), 0);
}

describe('fallocate PUNCH_HOLE|KEEP_SIZE', () => {
  const tmp = useTempDir('ops-punch');

  it('zeroes exactly the unaligned range, frees the whole clusters inside, leaves the rest', async () => {
    const image = tmp.file('a.qcow2');
    await qemuImgCreate(image, 4 * MiB);
    await qemuIoOk(image, ['write -P 0xaa 0 4M']);
    const m = await openHandlers(image);
    await m.handlers.fallocate(RAW, m.fh, PUNCH, 100_001, 300_000);
    expect((await m.handlers.getattr(RAW)).size).toBe(4 * MiB);
    await m.close();
    await expectBytes(image, [[0, 100_001, 0xaa], [100_001, 300_000, 0], [400_001, 4 * MiB - 400_001, 0xaa]]);
    const map = await qemuImgMap(image);
    expect(dataBytesIn(map, 131_072, 393_216)).toBe(0);
    expect(dataBytesIn(map, 0, 4 * MiB)).toBe(4 * MiB - 4 * 65536);
    const check = await qemuImgCheckClean(image);
    expect(check['allocated-clusters']).toBe(64 - 4);
  });

  it('allocates nothing for a partial-cluster punch inside a hole; zeroes partial data clusters in place', async () => {
    const image = tmp.file('b.qcow2');
    await qemuImgCreate(image, 1 * MiB);
    await qemuIoOk(image, ['write -P 0x11 65536 4096', 'write -P 0x22 131072 65536']);
    const m = await openHandlers(image);
    await m.handlers.fallocate(RAW, m.fh, PUNCH, 65536, 8192);   // the data and zeros of the same (allocated) cluster
    await m.handlers.fallocate(RAW, m.fh, PUNCH, 300_000, 4096); // inside an unallocated cluster
    await m.handlers.fallocate(RAW, m.fh, PUNCH, 131_072 + 4096, 4096); // inside data: zeros written there
    await m.close();
    await expectBytes(image, [[65536, 65536, 0], [131_072, 4096, 0x22], [135_168, 4096, 0], [139_264, 57_344, 0x22], [196_608, 851_968, 0]]);
    const map = await qemuImgMap(image);
    expect(dataBytesIn(map, 0, MiB)).toBe(2 * 65536);
    expect((await qemuImgCheckClean(image))['allocated-clusters']).toBe(2);
  });

  it('with extended L2: a partial-cluster punch whose rest is unallocated frees the whole cluster', async () => {
    const image = tmp.file('x.qcow2');
    await qemuImgCreate(image, MiB, { extended_l2: true, cluster_size: 65536 });
    await qemuIoOk(image, ['write -P 0x11 0 4k', 'write -P 0x12 65536 64k']);
    const m = await openHandlers(image);
    await m.handlers.fallocate(RAW, m.fh, PUNCH, 0, 4096);
    await m.handlers.fallocate(RAW, m.fh, PUNCH, 65536 + 2048, 2048);
    await m.close();
    await expectBytes(image, [[0, 65536, 0], [65536, 2048, 0x12], [67584, 2048, 0], [69632, 61440, 0x12]]);
    const map = await qemuImgMap(image);
    expect(dataBytesIn(map, 0, 65536)).toBe(0);
    expect((await qemuImgCheckClean(image))['allocated-clusters']).toBe(1);
  });

  for (const compat of ['1.1', '0.10']) {
    it(`over a backing file (compat=${compat}): the backing data never shows through again`, async () => {
      const base = tmp.file('base.qcow2');
      const top = tmp.file('top.qcow2');
      await qemuImgCreate(base, 2 * MiB, { compat });
      await qemuIoOk(base, ['write -P 0x11 0 2M']);
      await qemuImgCreate(top, 2 * MiB, { compat }, { backing: base });
      await qemuIoOk(top, ['write -P 0x22 0 512K']);
      const m = await openHandlers(top);
      await m.handlers.fallocate(RAW, m.fh, PUNCH, 1000, MiB);
      await m.close();
      await expectBytes(top, [[0, 1000, 0x22], [1000, MiB, 0], [MiB + 1000, MiB - 1000, 0x11]]);
      await qemuImgCheckClean(top);
    });
  }

  it('through a compressed mount: compressed clusters are released, the rest stays', async () => {
    const image = tmp.file('c.qcow2');
    await qemuImgCreate(image, 4 * MiB);
    const m = await openHandlers(image, { compress: true });
    const data = Buffer.alloc(4 * MiB, 0x5a);
    for (let i = 0; i < data.length; i += 17) data[i] = i & 0xff;
    expect(await m.handlers.write(RAW, m.fh, data, 0)).toBe(4 * MiB);
    await m.handlers.fallocate(RAW, m.fh, PUNCH, MiB + 123, 2 * MiB);
    await m.close();
    await qemuImgConvertToRaw(image, tmp.file('out.raw'));
    const expected = Buffer.from(data);
    expected.fill(0, MiB + 123, 3 * MiB + 123);
    expect(Buffer.compare(await readFile(tmp.file('out.raw')), expected)).toBe(0);
    const map = await qemuImgMap(image);
    expect(dataBytesIn(map, MiB + 65536, 3 * MiB)).toBe(0);
    await qemuImgCheckClean(image);
  });

  it('only inside the file: a range past the end changes nothing', async () => {
    const image = tmp.file('d.qcow2');
    await qemuImgCreate(image, MiB);
    await qemuIoOk(image, ['write -P 0x33 0 1M']);
    const m = await openHandlers(image);
    await m.handlers.fallocate(RAW, m.fh, PUNCH, MiB - 10, 100);
    await m.handlers.fallocate(RAW, m.fh, PUNCH, 2 * MiB, 100);
    expect((await m.handlers.getattr(RAW)).size).toBe(MiB);
    await m.close();
    await expectBytes(image, [[0, MiB - 10, 0x33], [MiB - 10, 10, 0]]);
    expect((await qemuImgInfo(image))['virtual-size']).toBe(MiB);
    await qemuImgCheckClean(image);
  });
});

describe('fallocate ZERO_RANGE and allocate', () => {
  const tmp = useTempDir('ops-zero');

  it('ZERO_RANGE|KEEP_SIZE zeroes exactly the range; without KEEP_SIZE it also grows the file to the range end', async () => {
    const image = tmp.file('a.qcow2');
    await qemuImgCreate(image, MiB);
    await qemuIoOk(image, ['write -P 0x44 0 1M']);
    const m = await openHandlers(image);
    await m.handlers.fallocate(RAW, m.fh, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 777, 200_000);
    await m.handlers.fallocate(RAW, m.fh, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, MiB - 100, 1000);
    expect((await m.handlers.getattr(RAW)).size).toBe(MiB);
    await m.handlers.fallocate(RAW, m.fh, FALLOC_FL_ZERO_RANGE, MiB - 50, 100_001);
    expect((await m.handlers.getattr(RAW)).size).toBe(MiB + 99_951);
    expect((await m.handlers.read(RAW, m.fh, 200_000, MiB)).equals(Buffer.alloc(99_951))).toBe(true);
    await m.close();
    expect((await qemuImgInfo(image))['virtual-size']).toBe(Math.ceil((MiB + 99_951) / 512) * 512);
    await expectBytes(image, [[0, 777, 0x44], [777, 200_000, 0], [200_777, MiB - 100 - 200_777, 0x44], [MiB - 100, 100_000, 0]]);
    await qemuImgCheckClean(image);
  });

  it('mode 0 grows the file to the range end, and is a no-op inside it; KEEP_SIZE alone is a no-op', async () => {
    const image = tmp.file('b.qcow2');
    await qemuImgCreate(image, MiB);
    await qemuIoOk(image, ['write -P 0x55 0 1M']);
    const m = await openHandlers(image);
    await m.handlers.fallocate(RAW, m.fh, 0, 1000, 5000);
    await m.handlers.fallocate(RAW, m.fh, FALLOC_FL_KEEP_SIZE, MiB, 5 * MiB);
    expect((await m.handlers.getattr(RAW)).size).toBe(MiB);
    await m.handlers.fallocate(RAW, m.fh, 0, MiB - 1, 1002);
    expect((await m.handlers.getattr(RAW)).size).toBe(MiB + 1001);
    await m.close();
    expect((await qemuImgInfo(image))['virtual-size']).toBe(MiB + 1024);
    await expectBytes(image, [[0, MiB, 0x55], [MiB, 1024, 0]]);
    await qemuImgCheckClean(image);
  });

  it('refuses the other modes (EOPNOTSUPP), bad ranges (EINVAL), and answers EROFS / EBADF where nothing may change', async () => {
    const image = tmp.file('c.qcow2');
    await qemuImgCreate(image, MiB);
    await qemuIoOk(image, ['write -P 0x66 0 64k']);
    await qemuImg(['snapshot', '-c', 'snap', image]);
    const m = await openHandlers(image);
    for (const mode of [FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE, FALLOC_FL_UNSHARE_RANGE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]) {
      expect(await errCode(m.handlers.fallocate(RAW, m.fh, mode, 0, 4096))).toBe('EOPNOTSUPP');
    }
    expect(await errCode(m.handlers.fallocate(RAW, m.fh, PUNCH, 0, 0))).toBe('EINVAL');
    expect(await errCode(m.handlers.fallocate(RAW, m.fh, PUNCH, -1, 10))).toBe('EINVAL');
    const info = await m.handlers.open('/info.json', constants.O_RDONLY);
    expect(await errCode(m.handlers.fallocate('/info.json', info, PUNCH, 0, 10))).toBe('EBADF');
    const view = await m.handlers.open('/snapshots/snap.raw', constants.O_RDONLY);
    expect(await errCode(m.handlers.fallocate('/snapshots/snap.raw', view, PUNCH, 0, 10))).toBe('EROFS');
    const reader = await m.handlers.open(RAW, constants.O_RDONLY);
    expect(await errCode(m.handlers.fallocate(RAW, reader, PUNCH, 0, 10))).toBe('EBADF');
    for (const fh of [info, view, reader]) await m.handlers.release(RAW, fh);
    await m.close();
    const ro = await openHandlers(image, { readOnly: true });
    expect(await errCode(ro.handlers.fallocate(RAW, ro.fh, PUNCH, 0, 10))).toBe('EROFS');
    await ro.close();
    await expectBytes(image, [[0, 65536, 0x66]]);
    await qemuImgCheckClean(image);
  });
});

/** SEEK_DATA / SEEK_HOLE expected from `qemu-img map` at `pos` (undefined: ENXIO). */
function expectedSeek(map: QemuMapEntry[], size: number, pos: number, whence: number): number | undefined {
  if (pos >= size) return undefined;
  const wantData = whence === SEEK_DATA;
  const hit = map.find((e) => e.start + e.length > pos && e.data === wantData);
  if (hit === undefined) return wantData ? undefined : size;
  return Math.max(pos, hit.start);
}

async function seekOrErrno(handlers: FsHandlers, path: string, fh: number, pos: number, whence: number): Promise<number | string> {
  return handlers.lseek(path, fh, pos, whence).catch((err: { code: string }) => err.code);
}

describe('lseek SEEK_DATA / SEEK_HOLE', () => {
  const tmp = useTempDir('ops-seek');

  it('agrees with qemu-img map at every extent boundary of a fragmented image over a backing file', async () => {
    const base = tmp.file('base.qcow2');
    const top = tmp.file('top.qcow2');
    await qemuImgCreate(base, 8 * MiB, { cluster_size: 65536 });
    await qemuIoOk(base, ['write -P 0x11 0 256k', 'write -P 0x12 3M 64k', 'write -z 3200k 64k', 'write -P 0x13 7M 1M']);
    await qemuImgCreate(top, 8 * MiB, { cluster_size: 65536 }, { backing: base });
    await qemuIoOk(top, ['write -P 0x21 128k 256k', 'write -z 1M 512k', 'write -P 0x22 2M 64k', 'write -P 0x23 2304k 64k', 'write -z 7M 128k', 'discard 6M 64k']);
    const map = await qemuImgMap(top);
    expect(map.length).toBeGreaterThan(6);
    const m = await openHandlers(top, { readOnly: true });
    const size = 8 * MiB;
    const positions = new Set<number>();
    for (const e of map) for (const p of [e.start, e.start + 1, e.start + e.length - 1, e.start + e.length]) positions.add(p);
    for (const pos of [...positions].sort((a, b) => a - b)) {
      for (const whence of [SEEK_DATA, SEEK_HOLE]) {
        expect([pos, whence, await seekOrErrno(m.handlers, RAW, m.fh, pos, whence)]).toEqual([pos, whence, expectedSeek(map, size, pos, whence) ?? 'ENXIO']);
      }
    }
    expect(await seekOrErrno(m.handlers, RAW, m.fh, size + 4096, SEEK_HOLE)).toBe('ENXIO');
    expect(await seekOrErrno(m.handlers, RAW, m.fh, -1, SEEK_DATA)).toBe('ENXIO');
    expect(await seekOrErrno(m.handlers, RAW, m.fh, 0, 0)).toBe('EINVAL');
    await m.close();
  });

  it('finds the holes of a raw backing file, as qemu-img map does', async () => {
    const base = tmp.file('base.raw');
    const top = tmp.file('top.qcow2');
    await qemuImgCreate(base, 4 * MiB, {}, { format: 'raw' });
    await qemuIoOk(base, ['write -P 0x51 1M 128k', 'write -P 0x52 3M 4k'], { format: 'raw' });
    await qemuImgCreate(top, 4 * MiB, {}, { backing: base, backingFormat: 'raw' });
    await qemuIoOk(top, ['write -P 0x53 2M 64k']);
    const map = await qemuImgMap(top);
    const m = await openHandlers(top, { readOnly: true });
    for (const e of map) {
      for (const pos of [e.start, e.start + e.length - 1]) {
        for (const whence of [SEEK_DATA, SEEK_HOLE]) {
          expect([pos, whence, await seekOrErrno(m.handlers, RAW, m.fh, pos, whence)]).toEqual([pos, whence, expectedSeek(map, 4 * MiB, pos, whence) ?? 'ENXIO']);
        }
      }
    }
    expect(await m.handlers.lseek(RAW, m.fh, 65536, SEEK_DATA)).toBe(MiB); // qemu-img create allocates the raw file's first block only
    await m.close();
  });

  it('stops at the file size: SEEK_HOLE past the last data is the size, SEEK_DATA there ENXIO; inspection files are all data', async () => {
    const image = tmp.file('a.qcow2');
    await qemuImgCreate(image, 0);
    const m = await openHandlers(image);
    await m.handlers.write(RAW, m.fh, Buffer.alloc(70_001, 0x77), 0);
    expect(await m.handlers.lseek(RAW, m.fh, 0, SEEK_DATA)).toBe(0);
    expect(await m.handlers.lseek(RAW, m.fh, 0, SEEK_HOLE)).toBe(70_001);
    expect(await m.handlers.lseek(RAW, m.fh, 70_000, SEEK_HOLE)).toBe(70_001);
    expect(await seekOrErrno(m.handlers, RAW, m.fh, 70_001, SEEK_DATA)).toBe('ENXIO');
    await m.handlers.ftruncate(RAW, m.fh, 4 * MiB);
    expect(await seekOrErrno(m.handlers, RAW, m.fh, 131_072, SEEK_DATA)).toBe('ENXIO');
    expect(await m.handlers.lseek(RAW, m.fh, 131_072, SEEK_HOLE)).toBe(131_072);
    const info = await m.handlers.open('/info.json', constants.O_RDONLY);
    const infoSize = (await m.handlers.getattr('/info.json')).size;
    expect(await m.handlers.lseek('/info.json', info, 10, SEEK_DATA)).toBe(10);
    expect(await m.handlers.lseek('/info.json', info, 10, SEEK_HOLE)).toBe(infoSize);
    expect(await seekOrErrno(m.handlers, '/info.json', info, infoSize, SEEK_DATA)).toBe('ENXIO');
    await m.handlers.release('/info.json', info);
    await m.close();
    await qemuImgCheckClean(image);
  });

  it('sees data still pending in the compressed writer', async () => {
    const image = tmp.file('c.qcow2');
    await qemuImgCreate(image, 4 * MiB);
    const m = await openHandlers(image, { compress: true });
    await m.handlers.write(RAW, m.fh, Buffer.alloc(65536, 0x31), 2 * MiB);
    expect(await m.handlers.lseek(RAW, m.fh, 0, SEEK_DATA)).toBe(2 * MiB);
    expect(await m.handlers.lseek(RAW, m.fh, 2 * MiB, SEEK_HOLE)).toBe(2 * MiB + 65536);
    await m.close();
    await qemuImgCheckClean(image);
  });

  it("answers a snapshot view from the snapshot's own tables", async () => {
    const image = tmp.file('s.qcow2');
    await qemuImgCreate(image, 4 * MiB);
    await qemuIoOk(image, ['write -P 0x41 1M 64k']);
    await qemuImg(['snapshot', '-c', 'old', image]);
    await qemuIoOk(image, ['write -P 0x42 0 64k', 'discard 1M 64k']);
    const m = await openHandlers(image, { readOnly: true });
    const view = await m.handlers.open('/snapshots/old.raw', constants.O_RDONLY);
    expect(await m.handlers.lseek('/snapshots/old.raw', view, 0, SEEK_DATA)).toBe(MiB);
    expect(await m.handlers.lseek('/snapshots/old.raw', view, MiB, SEEK_HOLE)).toBe(MiB + 65536);
    expect(await seekOrErrno(m.handlers, '/snapshots/old.raw', view, MiB + 65536, SEEK_DATA)).toBe('ENXIO');
    expect(await m.handlers.lseek(RAW, m.fh, 0, SEEK_DATA)).toBe(0);
    expect(await m.handlers.lseek(RAW, m.fh, 0, SEEK_HOLE)).toBe(65536);
    await m.handlers.release('/snapshots/old.raw', view);
    await m.close();
  });
});

describe('disk.raw POSIX sizes on a real image', () => {
  const tmp = useTempDir('ops-size');

  for (const compat of ['1.1', '0.10']) {
    it(`over a longer backing file (compat=${compat}): bytes past a shrink read as zeros when the file grows again`, async () => {
      const base = tmp.file('base.qcow2');
      const top = tmp.file('top.qcow2');
      await qemuImgCreate(base, MiB, { compat });
      await qemuIoOk(base, ['write -P 0x05 0 1M']);
      await qemuImgCreate(top, MiB, { compat }, { backing: base });
      const m = await openHandlers(top);
      await m.handlers.truncate(RAW, 27_789);
      await m.handlers.write(RAW, m.fh, Buffer.alloc(4066, 0x06), 119_663);
      await m.handlers.ftruncate(RAW, m.fh, 200_000);
      const expected = Buffer.alloc(200_000);
      expected.fill(0x05, 0, 27_789);
      expected.fill(0x06, 119_663, 123_729);
      expect((await m.handlers.read(RAW, m.fh, 300_000, 0)).equals(expected)).toBe(true);
      await m.close();
      await expectBytes(top, [[0, 27_789, 0x05], [27_789, 119_663 - 27_789, 0], [119_663, 4066, 0x06], [123_729, 200_192 - 123_729, 0]]);
      await qemuImgCheckClean(top);
    });
  }

  it('a write past the end of an overlay smaller than its backing file grows it with zeros, not the backing data', async () => {
    const base = tmp.file('base.qcow2');
    const top = tmp.file('top.qcow2');
    await qemuImgCreate(base, 2 * MiB);
    await qemuIoOk(base, ['write -P 0x07 0 2M']);
    await qemuImgCreate(top, MiB, {}, { backing: base });
    const m = await openHandlers(top);
    await m.handlers.write(RAW, m.fh, Buffer.alloc(1000, 0x08), MiB + 500_000);
    expect((await m.handlers.getattr(RAW)).size).toBe(MiB + 501_000);
    await m.close();
    const end = Math.ceil((MiB + 501_000) / 512) * 512;
    await expectBytes(top, [[0, MiB, 0x07], [MiB, 500_000, 0], [MiB + 500_000, 1000, 0x08], [MiB + 501_000, end - MiB - 501_000, 0]]);
    await qemuImgCheckClean(top);
  });

  it('truncate and writes give exact sizes; the image is that size rounded up to 512; bytes past a shrink read as zeros', async () => {
    const image = tmp.file('a.qcow2');
    await qemuImgCreate(image, 256 * KiB);
    await qemuIoOk(image, ['write -P 0x61 0 256k']);
    const m = await openHandlers(image);
    await m.handlers.truncate(RAW, 100_000);
    expect((await m.handlers.getattr(RAW)).size).toBe(100_000);
    expect((await m.handlers.read(RAW, m.fh, 65536, 90_000)).length).toBe(10_000);
    await m.handlers.truncate(RAW, 99_000);
    await m.handlers.write(RAW, m.fh, Buffer.alloc(1, 0x62), 100_000);
    expect((await m.handlers.getattr(RAW)).size).toBe(100_001);
    expect((await m.handlers.read(RAW, m.fh, 2000, 99_000)).equals(Buffer.concat([Buffer.alloc(1000), Buffer.alloc(1, 0x62)]))).toBe(true);
    await m.handlers.fsync(RAW, false, m.fh);
    expect((await qemuImgInfo(image))['virtual-size']).toBe(100_352);
    await m.handlers.truncate(RAW, 99_999);
    await m.handlers.truncate(RAW, 300_000);
    expect((await m.handlers.read(RAW, m.fh, 300_000, 0)).subarray(99_000).equals(Buffer.alloc(201_000))).toBe(true);
    await m.close();
    expect((await qemuImgInfo(image))['virtual-size']).toBe(300_032);
    await expectBytes(image, [[0, 99_000, 0x61], [99_000, 201_032, 0]]);
    await qemuImgCheckClean(image);
  });
});
