/**
 * Discard, zeroing, SEEK_DATA/SEEK_HOLE and exact file sizes on a real mount (the default transport),
 * with qemu-img/qemu-io as the oracle:
 * - `fstrim` on an ext4 loop-mounted from disk.raw gives the space of deleted files back (plain,
 *   compressed mount, over a backing file whose data must not reappear);
 * - `fallocate -p` / `-z` at unaligned offsets zero exactly there; collapse/insert EOPNOTSUPP; EROFS
 *   on a read-only mount; errnos on inspection files and past the end, the daemon serving on;
 * - SEEK_DATA/SEEK_HOLE agree with `qemu-img map` at every extent boundary; `cp --sparse=always`
 *   copies the same extents;
 * - truncate/write/mmap sequences give the same st_size and bytes as on the host filesystem.
 * System calls Node lacks go through file-ops.py. Every writing test ends with `qemu-img check`.
 */
import { mkdir, open, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { run } from '../helpers/exec.js';
import { sha256File, writePatternFile } from '../helpers/files.js';
import { findMount, forceUnmount, registerMount, unregisterMount } from '../helpers/mount.js';
import {
  qemuImgCheckClean, qemuImgConvertToRaw, qemuImgCreate, qemuImgInfo, qemuImgMap, qemuIoOk, type QemuMapEntry,
} from '../helpers/qemu.js';
import { tempDir } from '../helpers/tmp.js';
import { findTool, requireFuse, requireTools } from '../helpers/tools.js';
import { checkBuild, cli, testEnv } from './mount-harness.js';

const MiB = 1024 * 1024;
const CLUSTER = 65536;
const FILE_OPS = fileURLToPath(new URL('./file-ops.py', import.meta.url));
const ready = requireFuse() && requireTools('qemu-img', 'qemu-io', 'mke2fs', 'mount', 'umount', 'fstrim', 'filefrag', 'fallocate', 'cp', 'cmp', 'diff', 'python3', 'sync');

interface Fixture {
  dir: string;
  mnt: string;
  loop: string;
  env: NodeJS.ProcessEnv;
}

async function fixture(name: string): Promise<Fixture> {
  const dir = await tempDir(name);
  const f = { dir, mnt: join(dir, 'mnt'), loop: join(dir, 'loop'), env: testEnv(join(dir, 'run')) };
  await mkdir(f.mnt);
  await mkdir(f.loop);
  return f;
}

async function mount(f: Fixture, image: string, options: string[] = []): Promise<void> {
  registerMount(f.mnt);
  const result = await cli(['mount', ...options.flatMap((o) => ['-o', o]), image, f.mnt], f.env);
  expect(result.stderr).toBe('');
  expect(result.code).toBe(0);
}

async function unmount(f: Fixture): Promise<void> {
  const result = await cli(['unmount', f.mnt], f.env);
  expect(result.stderr).toBe('');
  expect(result.code).toBe(0);
  expect(await findMount(f.mnt)).toBeUndefined();
  unregisterMount(f.mnt);
}

async function cleanup(f: Fixture): Promise<void> {
  await forceUnmount(f.loop);
  unregisterMount(f.loop);
  await forceUnmount(f.mnt);
  unregisterMount(f.mnt);
}

/** Run a tool that must succeed; its stdout. */
async function ok(command: string, args: string[]): Promise<string> {
  const result = await run(findTool(command) ?? command, args, { timeoutMs: 300_000 });
  expect(`${command} ${args.join(' ')}: ${result.stderr}`).toBe(`${command} ${args.join(' ')}: `);
  expect(result.code).toBe(0);
  return result.stdout;
}

async function fileOps(args: (string | number)[]): Promise<string> {
  return (await ok('python3', [FILE_OPS, ...args.map(String)])).trim();
}

async function loopMount(f: Fixture, options = 'loop'): Promise<void> {
  registerMount(f.loop);
  await ok('mount', ['-o', options, join(f.mnt, 'disk.raw'), f.loop]);
}

async function loopUnmount(f: Fixture): Promise<void> {
  await ok('umount', [f.loop]);
  unregisterMount(f.loop);
}

/** Guest byte ranges [start, end) a file occupies in its ext4 (filefrag -e, 4 KiB blocks). */
async function fileExtents(path: string): Promise<[number, number][]> {
  const out = await ok('filefrag', ['-e', '-b4096', path]);
  const ranges: [number, number][] = [];
  for (const m of out.matchAll(/^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):/gm)) {
    ranges.push([Number(m[1]) * 4096, (Number(m[2]) + 1) * 4096]);
  }
  expect(ranges.length).toBeGreaterThan(0);
  return ranges;
}

/** Bytes of [start, end) that `qemu-img map` marks as data. */
function dataBytesIn(map: QemuMapEntry[], start: number, end: number): number {
  return map.filter((e) => e.data).reduce((n, e) => n + Math.max(0, Math.min(end, e.start + e.length) - Math.max(start, e.start)), 0);
}

async function allocatedClusters(image: string): Promise<number> {
  return (await qemuImgCheckClean(image))['allocated-clusters'] ?? 0;
}

interface TrimCase {
  name: string;
  mountOptions: string[];
  /** Base image holding the ext4 (and files deleted later) under the image; else the ext4 is made in place. */
  backing: boolean;
}

/**
 * Make an ext4 on disk.raw (or in a backing file), write files to keep and 200 MiB (+ base files) to
 * delete, then delete those and fstrim: the space comes back, the ranges read zeros, the kept files
 * are intact, the image is clean.
 */
async function trimScenario(c: TrimCase): Promise<void> {
  const f = await fixture(`trim-${c.name}`);
  try {
    const image = join(f.dir, 'top.qcow2');
    const baseDeleted: string[] = [];
    if (c.backing) {
      const base = join(f.dir, 'base.qcow2');
      await qemuImgCreate(base, 512 * MiB);
      await mount(f, base);
      await ok('mke2fs', ['-q', '-t', 'ext4', '-b', '4096', '-E', 'nodiscard', join(f.mnt, 'disk.raw')]);
      await loopMount(f);
      await mkdir(join(f.loop, 'base-del'));
      for (let i = 0; i < 4; i++) await writePatternFile(join(f.loop, 'base-del', `b${i}`), 8 * MiB, 100 + i);
      await writePatternFile(join(f.loop, 'base-keep'), 4 * MiB, 99);
      await loopUnmount(f);
      await unmount(f);
      await qemuImgCreate(image, 512 * MiB, {}, { backing: base });
    } else {
      await qemuImgCreate(image, 512 * MiB);
    }
    await mount(f, image, c.mountOptions);
    if (!c.backing) await ok('mke2fs', ['-q', '-t', 'ext4', '-b', '4096', '-E', 'nodiscard', join(f.mnt, 'disk.raw')]);
    await loopMount(f);
    await mkdir(join(f.loop, 'keep'));
    await mkdir(join(f.loop, 'del'));
    for (let i = 0; i < 3; i++) await writePatternFile(join(f.loop, 'keep', `k${i}`), 8 * MiB, i);
    for (let i = 0; i < 25; i++) await writePatternFile(join(f.loop, 'del', `d${i}`), 8 * MiB, 10 + i);
    if (c.mountOptions.includes('compress')) {
      for (let i = 0; i < 3; i++) await writePatternFile(join(f.loop, 'del', `c${i}`), 8 * MiB, 50 + i, 'compressible');
    }
    const keptSums = await Promise.all([0, 1, 2].map((i) => sha256File(join(f.loop, 'keep', `k${i}`))));
    await loopUnmount(f);
    await unmount(f);
    const before = await allocatedClusters(image);
    const actualBefore = (await qemuImgInfo(image))['actual-size'] ?? 0;

    await mount(f, image, c.mountOptions);
    await loopMount(f);
    const deleted: [number, number][] = [];
    for (const name of (await readdir(join(f.loop, 'del'))).sort()) deleted.push(...await fileExtents(join(f.loop, 'del', name)));
    if (c.backing) for (let i = 0; i < 4; i++) baseDeleted.push(join(f.loop, 'base-del', `b${i}`));
    for (const path of baseDeleted) deleted.push(...await fileExtents(path));
    await ok('rm', ['-rf', join(f.loop, 'del'), ...(c.backing ? [join(f.loop, 'base-del')] : [])]);
    await ok('sync', []);
    expect(await ok('fstrim', ['-v', f.loop])).toMatch(/trimmed/);
    await loopUnmount(f);
    await unmount(f);

    const after = await allocatedClusters(image);
    expect((before - after) * CLUSTER).toBeGreaterThanOrEqual(180 * MiB);
    expect(actualBefore - ((await qemuImgInfo(image))['actual-size'] ?? 0)).toBeGreaterThanOrEqual(180 * MiB);
    const map = await qemuImgMap(image);
    for (const [start, end] of deleted) {
      expect([start, end, dataBytesIn(map, start, end)]).toEqual([start, end, 0]);
    }
    // Deleted ranges read as zeros (the backing file's data does not show through again).
    await qemuIoOk(image, deleted.slice(0, 64).map(([start, end]) => `read -P 0 ${start} ${end - start}`));

    await mount(f, image, ['ro']);
    await loopMount(f, 'loop,ro');
    expect(await Promise.all([0, 1, 2].map((i) => sha256File(join(f.loop, 'keep', `k${i}`))))).toEqual(keptSums);
    if (c.backing) {
      const expected = join(f.dir, 'base-keep');
      await writePatternFile(expected, 4 * MiB, 99);
      await ok('cmp', [expected, join(f.loop, 'base-keep')]);
    }
    await loopUnmount(f);
    await unmount(f);
    await qemuImgCheckClean(image);
  } finally {
    await cleanup(f);
  }
}

describe.skipIf(!ready)('discard through the mount: fstrim on an ext4 inside disk.raw', () => {
  beforeAll(checkBuild);

  it('gives the space of deleted files back, the kept files intact', { timeout: 600_000 }, async () => {
    await trimScenario({ name: 'plain', mountOptions: [], backing: false });
  });

  it('through a compressed mount', { timeout: 600_000 }, async () => {
    await trimScenario({ name: 'compress', mountOptions: ['compress'], backing: false });
  });

  it('over a backing file: deleted ranges read zeros, the backing data does not reappear', { timeout: 600_000 }, async () => {
    await trimScenario({ name: 'backing', mountOptions: [], backing: true });
  });
});

describe.skipIf(!ready)('fallocate on disk.raw', () => {
  beforeAll(checkBuild);

  it('-p and -z zero exactly at unaligned offsets; -c/-i EOPNOTSUPP; errnos on inspection files and past the end; EROFS read-only', async () => {
    const f = await fixture('fallocate');
    try {
      const image = join(f.dir, 'a.qcow2');
      await qemuImgCreate(image, 4 * MiB);
      await qemuIoOk(image, ['write -P 0xaa 0 4M']);
      await mount(f, image);
      const disk = join(f.mnt, 'disk.raw');
      await ok('fallocate', ['-p', '-o', '100001', '-l', '300000', disk]);
      await ok('fallocate', ['-z', '-o', '1500001', '-l', '70000', disk]);
      for (const flag of ['-c', '-i']) {
        const result = await run('fallocate', [flag, '-o', String(CLUSTER), '-l', String(CLUSTER), disk]);
        expect([flag, result.code, result.stderr]).toEqual([flag, 1, expect.stringContaining('Operation not supported')]);
      }
      expect(await fileOps(['fallocate', disk, '0x40', 0, 4096])).toBe('EOPNOTSUPP'); // UNSHARE_RANGE
      expect(await fileOps(['fallocate', join(f.mnt, 'info.json'), 'r3', 0, 4096])).toBe('EBADF');
      expect(await fileOps(['fallocate', join(f.mnt, 'map.json'), '3', 0, 4096])).toBe('open EACCES');
      expect(JSON.parse(await fileOps(['seek', disk, 4 * MiB, 4 * MiB + 1, 2 ** 40]))).toEqual({
        [4 * MiB]: ['ENXIO', 'ENXIO'], [4 * MiB + 1]: ['ENXIO', 'ENXIO'], [2 ** 40]: ['ENXIO', 'ENXIO'],
      });
      // The daemon serves on.
      expect((await readFile(disk)).subarray(0, 100_001).every((b) => b === 0xaa)).toBe(true);
      expect(JSON.parse(await readFile(join(f.mnt, 'info.json'), 'utf8'))).toMatchObject({ 'virtual-size': 4 * MiB });
      await unmount(f);
      await qemuIoOk(image, [
        'read -P 0xaa 0 100001', 'read -P 0 100001 300000', 'read -P 0xaa 400001 1099999',
        'read -P 0 1500001 70000', `read -P 0xaa 1570001 ${4 * MiB - 1570001}`,
      ]);
      await qemuImgCheckClean(image);

      await mount(f, image, ['ro']);
      const result = await run('fallocate', ['-p', '-o', '0', '-l', '4096', disk]);
      expect(result.code).toBe(1);
      expect(result.stderr).toContain('Read-only file system');
      await unmount(f);
      await qemuIoOk(image, ['read -P 0xaa 0 4096']);
      await qemuImgCheckClean(image);
    } finally {
      await cleanup(f);
    }
  });
});

describe.skipIf(!ready)('inspection files on the mount', () => {
  beforeAll(checkBuild);

  // With the writeback cache the kernel keeps a regular file's first-seen size: the session gives a
  // generated file an inode per size and opens it direct_io (session-cache.ts).
  it.each([[[] as string[]], [['writeback_cache']]])('show their real size to stat before anyone opens them, and read exactly that much (-o %j)', async (options) => {
    const f = await fixture('inspect');
    try {
      const image = join(f.dir, 'a.qcow2');
      await qemuImgCreate(image, 4 * MiB);
      await qemuIoOk(image, ['write -P 0x31 0 64k']);
      await mount(f, image, options);
      const names = ['info.json', 'map.json', 'layout.txt', 'check.json'];
      const sizes = await Promise.all(names.map(async (name) => (await stat(join(f.mnt, name))).size));
      for (const [i, name] of names.entries()) {
        expect([name, sizes[i] > 0]).toEqual([name, true]);
        expect([name, (await readFile(join(f.mnt, name))).length]).toEqual([name, sizes[i]]);
      }
      const disk = await open(join(f.mnt, 'disk.raw'), 'r+');
      await disk.write(Buffer.alloc(4096, 0x33), 0, 4096, 2 * MiB);
      await disk.close();
      const mapSize = (await stat(join(f.mnt, 'map.json'))).size;
      expect(mapSize).toBeGreaterThan(sizes[1]);
      const map = await readFile(join(f.mnt, 'map.json'), 'utf8');
      expect(map.length).toBe(mapSize);
      expect((JSON.parse(map) as QemuMapEntry[]).filter((e) => e.data).map((e) => e.start)).toEqual([0, 2 * MiB]);
      const disk2 = await open(join(f.mnt, 'disk.raw'), 'r+');
      await disk2.write(Buffer.alloc(4096, 0x34), 0, 4096, 3 * MiB);
      await disk2.close();
      const map3 = await readFile(join(f.mnt, 'map.json'), 'utf8');
      expect(map3.length).toBe((await stat(join(f.mnt, 'map.json'))).size);
      expect((JSON.parse(map3) as QemuMapEntry[]).filter((e) => e.data).map((e) => e.start)).toEqual([0, 2 * MiB, 3 * MiB]);
      await unmount(f);
      await qemuImgCheckClean(image);
    } finally {
      await cleanup(f);
    }
  });
});

/** SEEK_DATA / SEEK_HOLE expected from `qemu-img map` at `pos` (ENXIO past the end or when no data follows). */
function expectedSeek(map: QemuMapEntry[], size: number, pos: number): [number | string, number | string] {
  if (pos >= size) return ['ENXIO', 'ENXIO'];
  const find = (data: boolean) => map.find((e) => e.start + e.length > pos && e.data === data);
  const data = find(true);
  const hole = find(false);
  return [data === undefined ? 'ENXIO' : Math.max(pos, data.start), hole === undefined ? size : Math.max(pos, hole.start)];
}

/** The data extents of a map, neighbours merged. */
function dataExtents(map: QemuMapEntry[]): [number, number][] {
  const out: [number, number][] = [];
  for (const e of map.filter((x) => x.data)) {
    const last = out[out.length - 1];
    if (last !== undefined && last[1] === e.start) last[1] = e.start + e.length;
    else out.push([e.start, e.start + e.length]);
  }
  return out;
}

describe.skipIf(!ready)('SEEK_DATA / SEEK_HOLE on disk.raw', () => {
  beforeAll(checkBuild);

  it('agree with qemu-img map at every extent boundary over a backing file; cp --sparse=always keeps the extents and bytes', async () => {
    const f = await fixture('seek');
    try {
      const base = join(f.dir, 'base.qcow2');
      const top = join(f.dir, 'top.qcow2');
      const size = 16 * MiB;
      await qemuImgCreate(base, size);
      await qemuIoOk(base, ['write -P 0x11 0 256k', 'write -P 0x12 3M 64k', 'write -z 3200k 64k', 'write -P 0x13 7M 1M', 'write -P 0x14 15M 1M']);
      await qemuImgCreate(top, size, {}, { backing: base });
      await qemuIoOk(top, ['write -P 0x21 128k 256k', 'write -z 1M 512k', 'write -P 0x22 2M 64k', 'write -P 0x23 2304k 64k',
        'write -z 7M 128k', 'write -P 0x24 12M 192k', 'write -z 15872k 512k']);
      const map = await qemuImgMap(top);
      expect(map.length).toBeGreaterThan(8);
      await mount(f, top, ['ro']);
      const disk = join(f.mnt, 'disk.raw');
      const positions = [...new Set(map.flatMap((e) => [e.start, e.start + 1, e.start + e.length - 1, e.start + e.length]))].sort((a, b) => a - b);
      const seen = JSON.parse(await fileOps(['seek', disk, ...positions])) as Record<string, [number | string, number | string]>;
      for (const pos of positions) expect([pos, ...seen[String(pos)] ?? []]).toEqual([pos, ...expectedSeek(map, size, pos)]);

      const out = join(f.dir, 'out.raw');
      await ok('cp', ['--sparse=always', disk, out]);
      await unmount(f);
      expect(JSON.parse(await fileOps(['extents', out]))).toEqual(dataExtents(map));
      const reference = join(f.dir, 'reference.raw');
      await qemuImgConvertToRaw(top, reference);
      await ok('cmp', [out, reference]);
      await qemuImgCheckClean(top);
    } finally {
      await cleanup(f);
    }
  });
});

describe.skipIf(!ready)('SEEK_DATA / SEEK_HOLE with -o writeback_cache', () => {
  beforeAll(checkBuild);

  it('see data still dirty in the kernel\'s cache (the kernel writes it back first), and agree with qemu-img map after unmount', async () => {
    const f = await fixture('seek-wb');
    try {
      const image = join(f.dir, 'a.qcow2');
      const size = 16 * MiB;
      await qemuImgCreate(image, size);
      await mount(f, image, ['writeback_cache']);
      const writes = [`${MiB + 4096}:8192:0x41`, `${5 * MiB}:${2 * CLUSTER}:0x42`, `${9 * MiB + 100}:10:0x43`];
      const written: QemuMapEntry[] = [[0, MiB, false], [MiB, CLUSTER, true], [MiB + CLUSTER, 4 * MiB - CLUSTER, false], [5 * MiB, 2 * CLUSTER, true],
        [5 * MiB + 2 * CLUSTER, 4 * MiB - 2 * CLUSTER, false], [9 * MiB, CLUSTER, true], [9 * MiB + CLUSTER, 7 * MiB - CLUSTER, false]]
        .map(([start, length, data]) => ({ start, length, data, zero: !data } as QemuMapEntry));
      const positions = [...new Set(written.flatMap((e) => [e.start, e.start + 1, e.start + e.length - 1, e.start + e.length]))].sort((a, b) => a - b);
      const seen = JSON.parse(await fileOps(['write-seek', join(f.mnt, 'disk.raw'), ...writes, '--', ...positions])) as Record<string, [number | string, number | string]>;
      for (const pos of positions) expect([pos, ...seen[String(pos)] ?? []]).toEqual([pos, ...expectedSeek(written, size, pos)]);
      await unmount(f);
      expect(dataExtents(await qemuImgMap(image))).toEqual(dataExtents(written));
      await qemuImgCheckClean(image);
    } finally {
      await cleanup(f);
    }
  });
});

describe.skipIf(!ready)('POSIX sizes of disk.raw', () => {
  beforeAll(checkBuild);

  const cases = [
    { name: 'an empty image', backing: false, options: [] as string[] },
    { name: 'an image over a longer backing file', backing: true, options: [] as string[] },
    // compress implies direct_io, and libfuse 3.14 cannot negotiate FUSE_DIRECT_IO_ALLOW_MMAP: the
    // kernel answers ENODEV to a shared mmap there, so that sequence leaves mmap out.
    { name: 'a compressed mount over a backing file (no mmap)', backing: true, options: ['compress'] },
    // The kernel keeps dirty pages the map cannot see: the kernel writes them back before each lseek.
    { name: 'the kernel writeback cache', backing: false, options: ['writeback_cache'] },
    { name: 'a compressed mount with the kernel writeback cache (mmap: it is not direct_io)', backing: true, options: ['compress', 'writeback_cache'] },
  ];
  for (const c of cases) {
    it(`truncate, unaligned writes, fallocate and mmap of the last page match a host file step by step: ${c.name}`, async () => {
      const f = await fixture('sizes');
      try {
        const image = join(f.dir, 'a.qcow2');
        const model = join(f.dir, 'model');
        if (c.backing) {
          const base = join(f.dir, 'base.qcow2');
          await qemuImgCreate(base, 256 * 1024);
          await qemuIoOk(base, ['write -P 0x05 0 256k']);
          await qemuImgCreate(image, 128 * 1024, {}, { backing: base });
          await writeFile(model, Buffer.alloc(128 * 1024, 0x05));
        } else {
          await qemuImgCreate(image, 0);
          await writeFile(model, '');
        }
        await mount(f, image, c.options);
        const mmap = c.options.includes('compress') && !c.options.includes('writeback_cache') ? 'nommap' : 'mmap';
        const result = JSON.parse(await fileOps(['sizes', 20261206, 400, model, join(f.mnt, 'disk.raw'), mmap])) as { steps: number; size: number };
        expect(result.steps).toBe(400);
        await unmount(f);
        const virtualSize = (await qemuImgInfo(image))['virtual-size'];
        expect(virtualSize).toBe(Math.ceil(result.size / 512) * 512);
        const converted = join(f.dir, 'converted.raw');
        await qemuImgConvertToRaw(image, converted);
        const expected = Buffer.alloc(virtualSize);
        (await readFile(model)).copy(expected);
        expect((await readFile(converted)).equals(expected)).toBe(true);
        await qemuImgCheckClean(image);
      } finally {
        await cleanup(f);
      }
    });
  }
});
