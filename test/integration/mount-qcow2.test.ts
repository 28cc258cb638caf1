/**
 * Real mounts of real qcow2 images through the CLI (`qcow2fuse mount` / `unmount`), with qemu-img as
 * the oracle: images made by qemu-img read byte-identically, an ext4 made by mke2fs -d loop-mounts
 * and diffs clean, dd/cp/fio write through the mount, and after unmount `qemu-img check` is clean and
 * `qemu-img compare` says identical. Every test unmounts what it mounted (finally).
 */
import { cp, mkdir, readFile, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { run } from '../helpers/exec.js';
import { createSparseFile, e2fsckReadOnly, writePatternFile } from '../helpers/files.js';
import { findMount, forceUnmount, registerMount, unregisterMount, waitForUnmount } from '../helpers/mount.js';
import { qemuImgCheck, qemuImgCompare, qemuImgConvertToRaw, qemuImgCreate, qemuIo, qemuIoOk } from '../helpers/qemu.js';
import { tempDir } from '../helpers/tmp.js';
import { findAnyTool, findTool, requireFuse, requireTools } from '../helpers/tools.js';
import { checkBuild, cli, daemonPid, testEnv, waitForExit } from './mount-harness.js';

const MiB = 1024 * 1024;
const ready = requireFuse() && requireTools('qemu-img', 'qemu-io', 'mke2fs', 'e2fsck', 'mount', 'umount', 'diff', 'dd', 'cmp', 'cp', 'jq', 'du', 'fio');

interface Fixture {
  dir: string;
  mnt: string;
  runtime: string;
  env: NodeJS.ProcessEnv;
}

async function fixture(): Promise<Fixture> {
  const dir = await tempDir('qcow2-mount');
  const mnt = join(dir, 'mnt');
  const runtime = join(dir, 'run');
  await mkdir(mnt);
  return { dir, mnt, runtime, env: testEnv(runtime) };
}

async function mount(f: Fixture, image: string, options: string[] = []): Promise<number> {
  registerMount(f.mnt);
  const result = await cli(['mount', ...options.flatMap((o) => ['-o', o]), image, f.mnt], f.env);
  expect(result.stderr).toBe('');
  expect(result.code).toBe(0);
  return daemonPid(f.mnt, f.runtime);
}

async function unmount(f: Fixture): Promise<void> {
  const result = await cli(['unmount', f.mnt], f.env);
  expect(result.stderr).toBe('');
  expect(result.code).toBe(0);
  expect(await findMount(f.mnt)).toBeUndefined();
  unregisterMount(f.mnt);
}

async function ok(command: string, args: string[]): Promise<string> {
  const result = await run(findTool(command) ?? command, args);
  expect(`${command} ${args.join(' ')}: ${result.stderr}`).toBe(`${command} ${args.join(' ')}: `);
  expect(result.code).toBe(0);
  return result.stdout;
}

async function expectCleanAndEqual(image: string, expectedRaw: string): Promise<void> {
  const check = await qemuImgCheck(image);
  expect(check.code).toBe(0);
  expect(check.report).toMatchObject({ 'check-errors': 0 });
  expect(check.report?.corruptions ?? 0).toBe(0);
  expect(check.report?.leaks ?? 0).toBe(0);
  expect(await qemuImgCompare(image, expectedRaw, { formatA: 'qcow2', formatB: 'raw' })).toBe(true);
}

/** Copy up to `budget` bytes of regular files from `src` into `dst` (sorted, deterministic), symlinks as they are. */
async function copySome(src: string, dst: string, budget: number): Promise<void> {
  let used = 0;
  await cp(src, dst, {
    recursive: true, verbatimSymlinks: true, errorOnExist: false,
    filter: async (from) => {
      const info = await stat(from).catch(() => undefined);
      if (info === undefined || info.isDirectory()) return true;
      if (used + info.size > budget) return false;
      used += info.size;
      return true;
    },
  });
}

/** The kernel's read-ahead (KiB) on the filesystem holding `path`: its bdi is named after st_dev. */
async function readaheadKiB(path: string): Promise<number> {
  const dev = (await stat(path)).dev;
  const major = Math.floor(dev / 256) % 4096;
  const minor = (dev % 256) + Math.floor(dev / 1048576) * 256;
  return Number((await readFile(`/sys/class/bdi/${major}:${minor}/read_ahead_kb`, 'utf8')).trim());
}

/** Tear down loop mounts and the FUSE mount a test left (safety net). */
async function cleanup(f: Fixture, loops: string[] = []): Promise<void> {
  for (const loop of loops) await forceUnmount(loop);
  await forceUnmount(f.mnt);
  unregisterMount(f.mnt);
}

describe.skipIf(!ready)('mounting qcow2 images', () => {
  beforeAll(checkBuild);

  it('an ext4 made by mke2fs -d reads back exactly: loop mount + diff -r, e2fsck -fn, cmp with qemu-img convert', async () => {
    const f = await fixture();
    const tree = join(f.dir, 'tree');
    const loop = join(f.dir, 'loop');
    try {
      await copySome('/usr/share/doc', join(tree, 'doc'), 24 * MiB);
      const raw = join(f.dir, 'fs.raw');
      await createSparseFile(raw, 96 * MiB);
      await ok('mke2fs', ['-q', '-t', 'ext4', '-F', '-d', tree, raw]);
      const image = join(f.dir, 'fs.qcow2');
      await ok('qemu-img', ['convert', '-O', 'qcow2', raw, image]);
      const reference = join(f.dir, 'reference.raw');
      await qemuImgConvertToRaw(image, reference);

      await mount(f, image, ['ro']);
      const disk = join(f.mnt, 'disk.raw');
      expect(await readaheadKiB(disk)).toBe(1024);
      await ok('cmp', [disk, reference]);
      expect((await e2fsckReadOnly(disk)).code).toBe(0);
      await mkdir(loop);
      registerMount(loop);
      await ok('mount', ['-o', 'loop,ro', disk, loop]);
      try {
        await ok('diff', ['-r', '--no-dereference', '-x', 'lost+found', tree, loop]);
      } finally {
        await ok('umount', [loop]);
        unregisterMount(loop);
      }
      await unmount(f);
      await expectCleanAndEqual(image, reference);
    } finally {
      await cleanup(f, [loop]);
    }
  });

  it('dd and cp in and out at unaligned offsets, cp of a sparse file onto a non-empty image, truncate; clean and identical after unmount', async () => {
    const f = await fixture();
    try {
      const image = join(f.dir, 'a.qcow2');
      await qemuImgCreate(image, '32M');
      await qemuIoOk(image, ['write -P 0x5a 0 3M', 'write -P 0xa5 20M 1M']);
      const model = join(f.dir, 'model.raw');
      await qemuImgConvertToRaw(image, model);
      const src = join(f.dir, 'src.bin');
      await writePatternFile(src, 12 * MiB, 7);

      await mount(f, image);
      const disk = join(f.mnt, 'disk.raw');
      for (const [bs, seek, count, skip] of [[512, 1001, 7, 3], [4096, 3, 9, 0], [65536, 77, 3, 1], [MiB, 20, 4, 2], [4 * MiB, 5, 2, 0], [1000, 12345, 3, 5]]) {
        const args = [`if=${src}`, `bs=${bs}`, `seek=${seek}`, `count=${count}`, `skip=${skip}`, 'conv=notrunc', 'status=none'];
        await ok('dd', [...args, `of=${disk}`]);
        await ok('dd', [...args, `of=${model}`]);
      }
      await ok('cmp', [disk, model]);
      const out = join(f.dir, 'out.raw');
      await ok('cp', [disk, out]);
      await ok('cmp', [out, model]);
      await ok('dd', [`if=${disk}`, `of=${join(f.dir, 'dd-out.raw')}`, 'bs=64k', 'skip=5', 'count=100', 'status=none']);
      await ok('dd', [`if=${model}`, `of=${join(f.dir, 'dd-model.raw')}`, 'bs=64k', 'skip=5', 'count=100', 'status=none']);
      await ok('cmp', [join(f.dir, 'dd-out.raw'), join(f.dir, 'dd-model.raw')]);

      const sparse = join(f.dir, 'sparse.raw');
      await createSparseFile(sparse, 48 * MiB);
      await ok('dd', [`if=${src}`, `of=${sparse}`, 'bs=64k', 'count=5', 'seek=100', 'conv=notrunc', 'status=none']);
      await ok('dd', [`if=${src}`, `of=${sparse}`, 'bs=4k', 'count=3', 'seek=9000', 'conv=notrunc', 'status=none']);
      await ok('cp', [sparse, disk]);
      expect((await stat(disk)).size).toBe(48 * MiB);
      await ok('cmp', [disk, sparse]);
      await ok('truncate', ['-s', '40M', disk]);
      await ok('truncate', ['-s', '40M', sparse]);
      await unmount(f);
      await expectCleanAndEqual(image, sparse);
      expect((JSON.parse((await run('qemu-img', ['info', '--output=json', image])).stdout) as Record<string, number>)['virtual-size']).toBe(40 * MiB);
    } finally {
      await cleanup(f);
    }
  });

  it('an ext4 inside is mounted read-write through the mount, written, and survives unmount', async () => {
    const f = await fixture();
    const loop = join(f.dir, 'loop');
    try {
      const raw = join(f.dir, 'fs.raw');
      await createSparseFile(raw, 64 * MiB);
      await ok('mke2fs', ['-q', '-t', 'ext4', '-F', raw]);
      const image = join(f.dir, 'fs.qcow2');
      await ok('qemu-img', ['convert', '-O', 'qcow2', raw, image]);
      const added = join(f.dir, 'added');
      await copySome('/usr/share/man', added, 12 * MiB);

      await mount(f, image);
      await mkdir(loop);
      registerMount(loop);
      await ok('mount', ['-o', 'loop', join(f.mnt, 'disk.raw'), loop]);
      try {
        await ok('cp', ['-a', added, join(loop, 'added')]);
      } finally {
        await ok('umount', [loop]);
        unregisterMount(loop);
      }
      expect((await e2fsckReadOnly(join(f.mnt, 'disk.raw'))).code).toBe(0);
      await unmount(f);
      expect((await qemuImgCheck(image)).code).toBe(0);

      const after = join(f.dir, 'after.raw');
      await qemuImgConvertToRaw(image, after);
      registerMount(loop);
      await ok('mount', ['-o', 'loop,ro', after, loop]);
      try {
        await ok('diff', ['-r', '--no-dereference', added, join(loop, 'added')]);
      } finally {
        await ok('umount', [loop]);
        unregisterMount(loop);
      }
    } finally {
      await cleanup(f, [loop]);
    }
  });

  it.each([
    ['libaio', []], ['psync', []], ['libaio', ['cache=none']], ['libaio', ['cache=none', 'aio=threads']],
  ] as const)('fio --verify=crc32c randrw, 4 jobs, bs 4k-128k, %s, mount -o %j; the image checks clean', async (engine, options) => {
    const f = await fixture();
    try {
      const image = join(f.dir, 'fio.qcow2');
      await qemuImgCreate(image, '64M');
      await mount(f, image, [...options]);
      await ok('fio', ['--name=verify', `--filename=${join(f.mnt, 'disk.raw')}`, '--rw=randrw', '--bsrange=4k-128k', `--ioengine=${engine}`,
        '--iodepth=8', '--direct=1', '--numjobs=4', '--size=16M', '--offset_increment=16M', '--verify=crc32c', '--verify_fatal=1',
        '--do_verify=1', '--verify_state_save=0', '--group_reporting']);
      const copy = join(f.dir, 'content.raw');
      await ok('cp', [join(f.mnt, 'disk.raw'), copy]);
      await unmount(f);
      await expectCleanAndEqual(image, copy);
    } finally {
      await cleanup(f);
    }
  });

  /**
   * fio with --verify=crc32c on disk.raw of a new image of `imageSize` mounted with `options`, two
   * jobs on separate regions; then the image must check clean and equal what fio left in disk.raw.
   */
  async function fioVerifyThroughMount(imageSize: string, options: string[], fioArgs: string[]): Promise<void> {
    const f = await fixture();
    try {
      const image = join(f.dir, 'fio.qcow2');
      await qemuImgCreate(image, imageSize);
      await mount(f, image, options);
      await ok('fio', ['--name=verify', `--filename=${join(f.mnt, 'disk.raw')}`, ...fioArgs, '--numjobs=2', '--verify=crc32c',
        '--verify_fatal=1', '--do_verify=1', '--verify_state_save=0', '--group_reporting']);
      const copy = join(f.dir, 'content.raw');
      await ok('cp', [join(f.mnt, 'disk.raw'), copy]);
      await unmount(f);
      await expectCleanAndEqual(image, copy);
    } finally {
      await cleanup(f);
    }
  }

  // Buffered I/O: with the writeback cache (default on a plain mount) fio's writes sit in the kernel's
  // page cache and reach the daemon coalesced; the image must end up with what fio verified.
  it.each([[[] as string[]], [['no_writeback_cache']], [['compress', 'writeback_cache']]])(
    'fio --verify=crc32c randrw through the page cache, 2 jobs, bs 4k-128k, fsync every 16 writes, mount -o %j; the image checks clean and equal', async (options) => {
    await fioVerifyThroughMount('32M', options, ['--rw=randrw', '--bsrange=4k-128k', '--ioengine=psync', '--direct=0',
      '--size=16M', '--offset_increment=16M', '--fsync=16']);
  });

  it.each(['cache=writeback', 'cache=none'])(
    'fio randrw bs 4k-256k, iodepth 32, O_DIRECT, 2 jobs on separate regions, -o %s: no verify error; the image checks clean', async (option) => {
    await fioVerifyThroughMount('64M', [option], ['--rw=randrw', '--bsrange=4k-256k', '--ioengine=libaio', '--iodepth=32', '--direct=1',
      '--size=32M', '--offset_increment=32M']);
  });

  it('info.json and map.json are what qcow2fuse info/map print; du on disk.raw is the allocated size', async () => {
    const f = await fixture();
    try {
      const image = join(f.dir, 'i.qcow2');
      await qemuImgCreate(image, '16M');
      await qemuIoOk(image, ['write -P 1 0 1M', 'write -z 4M 64k', 'write -P 2 9M 128k']);
      await ok('qemu-img', ['snapshot', '-c', 'first', image]);
      const snapshotRaw = join(f.dir, 'first.raw');
      await qemuImgConvertToRaw(image, snapshotRaw, { snapshot: 'first' });
      await mount(f, image, ['readahead=256K']);
      const file = (name: string) => join(f.mnt, name);
      expect(await readaheadKiB(file('disk.raw'))).toBe(256);
      // -U: the mount holds the image for writing, and a reader without force-share is refused (as QEMU's).
      const info = await cli(['info', '-U', '--output=json', image], f.env);
      expect(await readFile(file('info.json'), 'utf8')).toBe(info.stdout);
      const map = await cli(['map', '-U', '--output=json', image], f.env);
      expect(await readFile(file('map.json'), 'utf8')).toBe(map.stdout);
      expect(JSON.parse(await ok('jq', ['-c', '.', file('map.json')]))).toEqual(JSON.parse(map.stdout));
      expect(JSON.parse(await readFile(file('check.json'), 'utf8'))).toMatchObject({ 'check-errors': 0, format: 'qcow2' });
      const layout = await readFile(file('layout.txt'), 'utf8');
      expect(layout).toMatch(/^0\t65536\theader\t-$/m);
      // du must show the host clusters the image uses: every cluster layout.txt does not call free.
      const used = new Set<number>();
      for (const line of layout.split('\n').filter((l) => l !== '' && !l.startsWith('#'))) {
        const [offset, bytes, kind] = line.split('\t');
        if (kind === 'free') continue;
        for (let c = Math.floor(Number(offset) / 65536); c < Math.ceil((Number(offset) + Number(bytes)) / 65536); c++) used.add(c);
      }
      const du = Number((await ok('du', ['-B1', file('disk.raw')])).split('\t')[0]);
      expect(du).toBe(used.size * 65536);
      expect(await readdir(file('snapshots'))).toEqual(['first.raw']);
      await ok('cmp', [file('snapshots/first.raw'), snapshotRaw]);
      await unmount(f);
    } finally {
      await cleanup(f);
    }
  });

  it('while mounted, a second mount and qemu-io writes are refused; every way to unmount leaves a clean image with the data', async () => {
    const f = await fixture();
    const image = join(f.dir, 'l.qcow2');
    await qemuImgCreate(image, '8M');
    const model = join(f.dir, 'model.raw');
    await createSparseFile(model, 8 * MiB);
    const endings: [string, (pid: number) => Promise<void>][] = [
      ['unmount', async () => unmount(f)],
      ['umount', async () => { await ok('umount', [f.mnt]); }],
      ['fusermount -u', async () => { await ok(findAnyTool('fusermount', 'fusermount3') as string, ['-u', f.mnt]); }],
      ['SIGTERM', async (pid) => { process.kill(pid, 'SIGTERM'); }],
      ['SIGINT', async (pid) => { process.kill(pid, 'SIGINT'); }],
    ];
    try {
      for (const [index, [name, end]] of endings.entries()) {
        const pid = await mount(f, image);
        if (index === 0) {
          const other = join(f.dir, 'other');
          await mkdir(other);
          const second = await cli(['mount', image, other], f.env);
          expect(second.code).toBe(1);
          expect(second.stderr).toMatch(/in use by another process/);
          const qemuWrite = await qemuIo(image, ['write 0 4k']);
          expect(qemuWrite.code).not.toBe(0);
          expect(qemuWrite.stdout + qemuWrite.stderr).toMatch(/lock/i);
        }
        const args = ['if=/dev/urandom', 'bs=4k', 'count=3', `seek=${index * 100}`, 'conv=notrunc', 'status=none'];
        await ok('dd', [...args, `of=${join(f.dir, 'chunk')}`]);
        await ok('dd', [`if=${join(f.dir, 'chunk')}`, `of=${join(f.mnt, 'disk.raw')}`, 'bs=4k', `seek=${index * 100}`, 'conv=notrunc', 'status=none']);
        await ok('dd', [`if=${join(f.dir, 'chunk')}`, `of=${model}`, 'bs=4k', `seek=${index * 100}`, 'conv=notrunc', 'status=none']);
        await end(pid);
        await waitForExit(pid);
        await waitForUnmount(f.mnt);
        unregisterMount(f.mnt);
        expect([name, (await qemuImgCheck(image)).code]).toEqual([name, 0]);
        expect([name, await qemuImgCompare(image, model, { formatA: 'qcow2', formatB: 'raw' })]).toEqual([name, true]);
      }
    } finally {
      await cleanup(f);
    }
  });
});
