/**
 * Real mounts over a memory device (mount-memory-daemon.ts: the mount command's own code, the image
 * being a raw file loaded at open and written back at close). Tests the FUSE layer and the mount
 * lifecycle with the tools users use — dd, cp, cmp, truncate, du, cat, jq, grep, wc, tail, umount,
 * fusermount — independently of the qcow2 driver. Every test unmounts what it mounted (finally).
 */
import { access, copyFile, open, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { run } from '../helpers/exec.js';
import { createSparseFile, writePatternFile } from '../helpers/files.js';
import { findMount, forceUnmount, readMounts, registerMount, unregisterMount, waitForMount, waitForUnmount } from '../helpers/mount.js';
import { tempDir } from '../helpers/tmp.js';
import { findAnyTool, requireFuse, requireTools } from '../helpers/tools.js';
import { checkBuild, cli, daemonPid, memoryMount, memoryMountForeground, testEnv, waitForExit } from './mount-harness.js';

const MiB = 1024 * 1024;
/** The core lifecycle tests run on both transports; the rest on the default (the session). */
const TRANSPORTS = ['session', 'fuse-native'] as const;
const ready = requireFuse() && requireTools('dd', 'cmp', 'cp', 'truncate', 'du', 'stat', 'jq', 'grep', 'wc', 'tail', 'umount', 'flock');

interface Fixture {
  dir: string;
  image: string;
  mnt: string;
  /** What the guest contents should be (kept in step with the writes). */
  model: string;
  runtime: string;
  env: NodeJS.ProcessEnv;
}

async function fixture(bytes = 8 * MiB, extraEnv: NodeJS.ProcessEnv = {}): Promise<Fixture> {
  const dir = await tempDir('mount');
  const image = join(dir, 'image.raw');
  const model = join(dir, 'model.raw');
  const mnt = join(dir, 'mnt');
  const runtime = join(dir, 'run');
  await writePatternFile(image, bytes, 1234);
  await copyFile(image, model);
  await run('mkdir', [mnt]);
  return { dir, image, mnt, model, runtime, env: testEnv(runtime, extraEnv) };
}

/** Mount in the background; expects exit 0 with the mount already live when the command returns. */
async function mount(f: Fixture, options: string[] = []): Promise<number> {
  registerMount(f.mnt);
  const result = await memoryMount([...options.flatMap((o) => ['-o', o]), f.image, f.mnt], f.env);
  expect(result.stderr).toBe('');
  expect(result.code).toBe(0);
  expect((await findMount(f.mnt))?.fsType).toBe('fuse.qcow2fuse');
  return daemonPid(f.mnt, f.runtime);
}

/** Tear down whatever is still mounted (tests unmount themselves; this is the safety net). */
async function cleanup(f: Fixture): Promise<void> {
  await forceUnmount(f.mnt);
  unregisterMount(f.mnt);
}

async function dd(args: string[]): Promise<void> {
  const result = await run('dd', [...args, 'status=none']);
  expect(result.stderr).toBe('');
  expect(result.code).toBe(0);
}

/** Run the same dd on the mount and on the model. */
async function ddBoth(f: Fixture, args: string[]): Promise<void> {
  await dd([...args, `of=${join(f.mnt, 'disk.raw')}`]);
  await dd([...args, `of=${f.model}`]);
}

async function expectSameFile(a: string, b: string): Promise<void> {
  const result = await run('cmp', [a, b]);
  expect(result.stdout + result.stderr).toBe('');
  expect(result.code).toBe(0);
}

async function unmountWithCli(f: Fixture): Promise<void> {
  const result = await cli(['unmount', f.mnt], f.env);
  expect(result.stderr).toBe('');
  expect(result.code).toBe(0);
  expect(await findMount(f.mnt)).toBeUndefined();
  unregisterMount(f.mnt);
}

describe.skipIf(!ready)('mount over a memory device', () => {
  beforeAll(checkBuild);

  it.each(TRANSPORTS)('[%s] returns once live; dd and cp read and write through it; unmount persists everything', async (transport) => {
    const f = await fixture();
    try {
      const pid = await mount(f, [`transport=${transport}`]);
      expect((await readdir(f.mnt)).sort()).toEqual(['check.json', 'disk.raw', 'info.json', 'layout.txt', 'map.json', 'snapshots']);
      await expectSameFile(join(f.mnt, 'disk.raw'), f.model);
      const src = join(f.dir, 'src.raw');
      await writePatternFile(src, 6 * MiB, 99);
      for (const [bs, seek, count] of [[512, 1000, 3], [4096, 3, 5], [65536, 12345, 2], [MiB, 777777, 2], [4 * MiB, 0, 1]]) {
        await ddBoth(f, [`if=${src}`, `bs=${bs}`, `count=${count}`, `seek=${seek}`, 'oflag=seek_bytes', 'conv=notrunc']);
      }
      await expectSameFile(join(f.mnt, 'disk.raw'), f.model);
      const copy = join(f.dir, 'copy.raw');
      await run('cp', [join(f.mnt, 'disk.raw'), copy]);
      await expectSameFile(copy, f.model);
      const hostFs = await run('stat', ['-f', '-c', '%S %b', f.dir]);
      const mountFs = await run('stat', ['-f', '-c', '%S %b', f.mnt]);
      const bytes = (text: string) => text.trim().split(' ').map(Number).reduce((a, b) => a * b, 1);
      expect(bytes(mountFs.stdout)).toBe(bytes(hostFs.stdout));

      await unmountWithCli(f);
      expect(await readdir(f.runtime)).not.toContain(expect.stringMatching(/\.json$/));
      await waitForExit(pid, 1);
      await expectSameFile(f.image, f.model);
    } finally {
      await cleanup(f);
    }
  });

  it('cp of a sparse file onto a non-empty disk.raw leaves exactly that file; truncate and writes past the end resize', async () => {
    const f = await fixture();
    try {
      await mount(f);
      const raw = join(f.mnt, 'disk.raw');
      const sparse = join(f.dir, 'sparse.raw');
      await createSparseFile(sparse, 20 * MiB);
      await dd([`if=${f.image}`, `of=${sparse}`, 'bs=64k', 'count=3', 'seek=16', 'conv=notrunc']);
      await dd([`if=${f.image}`, `of=${sparse}`, 'bs=4k', 'count=1', 'seek=2600', 'conv=notrunc']);
      expect((await run('cp', [sparse, raw])).code).toBe(0);
      expect((await stat(raw)).size).toBe(20 * MiB);
      await expectSameFile(raw, sparse);
      await copyFile(sparse, f.model);

      expect((await run('truncate', ['-s', '5M', raw])).code).toBe(0);
      expect((await run('truncate', ['-s', '6M', f.model])).code).toBe(0);
      expect((await run('truncate', ['-s', '6M', raw])).code).toBe(0);
      expect((await stat(raw)).size).toBe(6 * MiB);
      expect((await run('truncate', ['-s', '5M', f.model])).code).toBe(0);
      expect((await run('truncate', ['-s', '6M', f.model])).code).toBe(0);
      await ddBoth(f, [`if=${sparse}`, 'bs=64k', 'count=1', 'skip=16', 'seek=200', 'conv=notrunc']);
      expect((await stat(raw)).size).toBe(201 * 65536);
      await expectSameFile(raw, f.model);

      const info = JSON.parse(await readFile(join(f.mnt, 'info.json'), 'utf8')) as Record<string, number>;
      expect(info['virtual-size']).toBe(201 * 65536);
      const du = await run('du', ['-B1', raw]);
      expect(Number(du.stdout.split('\t')[0])).toBe(info['actual-size']);
      await unmountWithCli(f);
      await expectSameFile(f.image, f.model);
    } finally {
      await cleanup(f);
    }
  });

  it('inspection files work with cat, jq, grep, wc, tail and cp, and follow the image', async () => {
    const f = await fixture(4 * MiB);
    try {
      await mount(f);
      const file = (name: string) => join(f.mnt, name);
      const jq = await run('jq', ['-r', '."virtual-size"', file('info.json')]);
      expect(jq.stdout.trim()).toBe(String(4 * MiB));
      expect(Number((await run('jq', ['length', file('map.json')])).stdout)).toBeGreaterThan(0);
      expect((await run('jq', ['-e', '."check-errors" == 0', file('check.json')])).code).toBe(0);
      expect(Number((await run('grep', ['-c', '\tdata\t', file('layout.txt')])).stdout)).toBe(64);
      expect((await run('tail', ['-n', '1', file('layout.txt')])).stdout).toMatch(/^\d+\t65536\tdata\t4128768\n$/);
      const catBytes = (await run('sh', ['-c', `cat '${file('map.json')}' | wc -c`])).stdout.trim();
      expect((await run('wc', ['-c', file('map.json')])).stdout.split(' ')[0]).toBe(catBytes);
      await run('cp', [file('check.json'), join(f.dir, 'check.json')]);
      expect(JSON.parse(await readFile(join(f.dir, 'check.json'), 'utf8'))).toMatchObject({ format: 'qcow2', 'check-errors': 0 });

      expect((await run('truncate', ['-s', '64M', file('disk.raw')])).code).toBe(0);
      expect((await run('jq', ['-r', '."virtual-size"', file('info.json')])).stdout.trim()).toBe(String(64 * MiB));
      const write = await run('sh', ['-c', `echo x > '${file('info.json')}'`]);
      expect(write.stderr).toMatch(/Permission denied/);
      await unmountWithCli(f);
    } finally {
      await cleanup(f);
    }
  });

  const endings: [string, (f: Fixture, pid: number) => Promise<void>][] = [
    ['qcow2fuse unmount', async (f) => unmountWithCli(f)],
    ['umount', async (f) => { expect((await run('umount', [f.mnt])).code).toBe(0); }],
    ['fusermount -u', async (f) => {
      expect((await run(findAnyTool('fusermount', 'fusermount3') as string, ['-u', f.mnt])).code).toBe(0);
    }],
    ['SIGTERM', async (_f, pid) => { process.kill(pid, 'SIGTERM'); }],
    ['SIGINT', async (_f, pid) => { process.kill(pid, 'SIGINT'); }],
  ];

  it.each(TRANSPORTS.flatMap((transport) => endings.map(([name, end]) => [name, transport, end] as const)))(
    '%s ends in a clean close and the daemon exits [%s]', async (_name, transport, end) => {
    const f = await fixture(4 * MiB, { QCOW2FUSE_TEST_CLOSE_DELAY_MS: '300' });
    try {
      const pid = await mount(f, [`transport=${transport}`]);
      await ddBoth(f, [`if=${f.image}`, 'bs=64k', 'count=5', 'skip=3', 'seek=40', 'conv=notrunc']);
      await end(f, pid);
      await waitForExit(pid);
      await waitForUnmount(f.mnt);
      unregisterMount(f.mnt);
      await expectSameFile(f.image, f.model);
      expect((await readdir(f.runtime)).filter((n) => n.endsWith('.json'))).toEqual([]);
      const log = await readFile(join(f.runtime, (await readdir(f.runtime)).find((n) => n.endsWith('.log')) as string), 'utf8');
      expect(log).toMatch(/closed .*image\.raw\n$/);
    } finally {
      await cleanup(f);
    }
  });

  it('qcow2fuse unmount returns only after the image is closed', async () => {
    const f = await fixture(4 * MiB, { QCOW2FUSE_TEST_CLOSE_DELAY_MS: '1500' });
    try {
      await mount(f);
      await ddBoth(f, [`if=${f.image}`, 'bs=4k', 'count=1', 'seek=7', 'conv=notrunc']);
      await unmountWithCli(f);
      // No waiting here: the write-back happens in close, which the command waited for.
      await expectSameFile(f.image, f.model);
    } finally {
      await cleanup(f);
    }
  });

  it('serves in the foreground with -f until SIGINT', async () => {
    const f = await fixture(4 * MiB);
    registerMount(f.mnt);
    const child = memoryMountForeground([f.image, f.mnt], f.env);
    let stderr = '';
    child.stderr?.setEncoding('utf8').on('data', (s: string) => { stderr += s; });
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    try {
      await waitForMount(f.mnt, 20_000, 'fuse.qcow2fuse');
      await ddBoth(f, [`if=${f.image}`, 'bs=512', 'count=9', 'seek=33', 'conv=notrunc']);
      child.kill('SIGINT');
      expect(await exited).toBe(0);
      expect(await findMount(f.mnt)).toBeUndefined();
      await expectSameFile(f.image, f.model);
      expect(stderr).toMatch(/mounted on/);
      expect(stderr).toMatch(/closed /);
    } finally {
      child.kill('SIGKILL');
      await cleanup(f);
    }
  });

  it('a signal while the mount is being made ends it cleanly, with nothing left mounted', async () => {
    const f = await fixture(MiB, { QCOW2FUSE_TEST_OPEN_DELAY_MS: '2000' });
    const child = memoryMountForeground([f.image, f.mnt], f.env);
    let stderr = '';
    child.stderr?.setEncoding('utf8').on('data', (s: string) => { stderr += s; });
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    try {
      // The opener marks the moment it holds the image (locked) and waits: interrupt then.
      while (!(await access(`${f.image}.opening`).then(() => true, () => false))) await new Promise((r) => setTimeout(r, 20));
      child.kill('SIGTERM');
      expect(await exited).toBe(1);
      expect(stderr).toMatch(/mount interrupted \(SIGTERM\); the image was closed/);
      expect(await findMount(f.mnt)).toBeUndefined();
      expect((await run('flock', ['-n', '-x', f.image, 'true'])).code).toBe(0);
    } finally {
      child.kill('SIGKILL');
      await cleanup(f);
    }
  });

  it('refuses a busy mountpoint, a locked image, a missing or non-empty mountpoint and a missing image', async () => {
    const f = await fixture(MiB);
    try {
      await mount(f);
      const again = await memoryMount([f.image, f.mnt], f.env);
      expect(again.code).toBe(1);
      expect(again.stderr).toMatch(/already a mount point.*qcow2fuse unmount/);
      const other = join(f.dir, 'other');
      await run('mkdir', [other]);
      const locked = await memoryMount([f.image, other], f.env);
      expect(locked.code).toBe(1);
      expect(locked.stderr).toMatch(/in use by another process/);
      expect(await findMount(other)).toBeUndefined();
      const missing = await memoryMount([f.image, join(f.dir, 'nope')], f.env);
      expect([missing.code, missing.stderr]).toEqual([1, expect.stringMatching(/does not exist/)]);
      await writeFile(join(other, 'file'), 'x');
      const nonEmpty = await memoryMount([f.model, other], f.env);
      expect([nonEmpty.code, nonEmpty.stderr]).toEqual([1, expect.stringMatching(/is not empty/)]);
      await run('rm', [join(other, 'file')]);
      const noImage = await memoryMount([join(f.dir, 'absent.raw'), other], f.env);
      expect([noImage.code, noImage.stderr]).toEqual([1, expect.stringMatching(/ENOENT|no such file/i)]);
      const bad = await memoryMount(['-o', 'bogus', f.image, other], f.env);
      expect([bad.code, bad.stderr]).toEqual([1, expect.stringMatching(/unknown mount option 'bogus'/)]);
      await unmountWithCli(f);
    } finally {
      await cleanup(f);
    }
  });

  it('a killed daemon leaves a stale mount: mount names the command that clears it, unmount clears it', async () => {
    const f = await fixture(MiB);
    try {
      const pid = await mount(f);
      process.kill(pid, 'SIGKILL');
      await waitForExit(pid);
      const again = await memoryMount([f.model, f.mnt], f.env);
      expect(again.code).toBe(1);
      expect(again.stderr).toContain(`stale FUSE mount (its daemon is gone); clear it with: fusermount -u ${f.mnt}`);
      const unmount = await cli(['unmount', f.mnt], f.env);
      expect(unmount.code).toBe(1);
      expect(unmount.stderr).toMatch(/not running \(stale mount\); the mount was cleared, but the image .* was not closed cleanly/);
      expect(await findMount(f.mnt)).toBeUndefined();
      unregisterMount(f.mnt);
      const notMounted = await cli(['unmount', f.mnt], f.env);
      expect([notMounted.code, notMounted.stderr]).toEqual([1, expect.stringMatching(/is not mounted/)]);
    } finally {
      await cleanup(f);
    }
  });

  it('ro refuses writes with EROFS; nogrow refuses growth with EFBIG and truncation with EPERM', async () => {
    const f = await fixture(MiB);
    try {
      await mount(f, ['ro']);
      const raw = join(f.mnt, 'disk.raw');
      expect((await stat(raw)).mode & 0o777).toBe(0o444);
      const roWrite = await run('dd', ['if=/dev/zero', `of=${raw}`, 'bs=4k', 'count=1', 'conv=notrunc', 'status=none']);
      expect(roWrite.stderr).toMatch(/Read-only file system/);
      await unmountWithCli(f);

      await mount(f, ['nogrow']);
      const past = await run('dd', ['if=/dev/zero', `of=${raw}`, 'bs=4k', 'count=1', 'seek=256', 'conv=notrunc', 'status=none']);
      expect(past.stderr).toMatch(/File too large/);
      expect((await run('truncate', ['-s', '2M', raw])).stderr).toMatch(/Operation not permitted/);
      await ddBoth(f, [`if=${f.image}`, 'bs=4k', 'count=1', 'seek=255', 'conv=notrunc']);
      expect((await stat(raw)).size).toBe(MiB);
      await unmountWithCli(f);
      await expectSameFile(f.image, f.model);
    } finally {
      await cleanup(f);
    }
  });

  it('names the raw file with -o name= and shows snapshots as read-only files', async () => {
    const f = await fixture(MiB);
    try {
      const snapshot = `${f.image}.snapshot.before upgrade`;
      await writePatternFile(snapshot, 2 * MiB, 77);
      await mount(f, ['name=sda.img']);
      await expectSameFile(join(f.mnt, 'sda.img'), f.model);
      expect(await readdir(join(f.mnt, 'snapshots'))).toEqual(['before upgrade.raw']);
      await expectSameFile(join(f.mnt, 'snapshots', 'before upgrade.raw'), snapshot);
      const write = await run('dd', ['if=/dev/zero', `of=${join(f.mnt, 'snapshots', 'before upgrade.raw')}`, 'count=1', 'conv=notrunc', 'status=none']);
      expect(write.stderr).toMatch(/Permission denied/);
      await unmountWithCli(f);
    } finally {
      await cleanup(f);
    }
  });

  /** Reads of `disk.raw` at offset 0 the daemon served, from its DEBUG=qcow2fuse:fuse trace. */
  async function readsAtZero(f: Fixture): Promise<number> {
    const log = (await readdir(f.runtime)).find((n) => n.endsWith('.log')) as string;
    return (await readFile(join(f.runtime, log), 'utf8')).split('\n').filter((l) => /read \/disk\.raw fh=\d+ pos=0 /.test(l)).length;
  }

  /** Read the first 4 KiB twice through one descriptor, then again through a new one. */
  async function readTwiceThenReopen(raw: string): Promise<void> {
    const fd = await open(raw, 'r');
    await fd.read(Buffer.alloc(4096), 0, 4096, 0);
    await fd.read(Buffer.alloc(4096), 0, 4096, 0);
    await fd.close();
    const again = await open(raw, 'r');
    await again.read(Buffer.alloc(4096), 0, 4096, 0);
    await again.close();
  }

  it.each([
    ['default', [], 2],
    ['direct_io', ['direct_io'], 3],
    ['compress (direct_io by default)', ['compress'], 3],
    ['kernel_cache', ['kernel_cache'], 1],
  ])('page cache of disk.raw with %s', async (_name, options, expectedReads) => {
    const f = await fixture(MiB, { DEBUG: 'qcow2fuse:fuse' });
    try {
      await mount(f, [...options, 'allow_other']);
      expect((await readMounts()).find((m) => m.mountPoint === f.mnt)?.superOptions).toContain('allow_other');
      await readTwiceThenReopen(join(f.mnt, 'disk.raw'));
      expect(await readsAtZero(f)).toBe(expectedReads);
      expect(JSON.parse(await readFile(join(f.mnt, 'info.json'), 'utf8'))).toMatchObject({ 'virtual-size': MiB });
      await unmountWithCli(f);
    } finally {
      await cleanup(f);
    }
  });

  it('qcow2fuse unmount of a busy mount fails, leaving it mounted and serving', async () => {
    const f = await fixture(MiB);
    try {
      await mount(f);
      const busy = await open(join(f.mnt, 'disk.raw'), 'r');
      try {
        const result = await cli(['unmount', f.mnt], f.env);
        expect(result.code).toBe(1);
        expect(result.stderr).toMatch(/cannot unmount .*busy/i);
        expect((await busy.read(Buffer.alloc(16), 0, 16, 0)).bytesRead).toBe(16);
      } finally {
        await busy.close();
      }
      await unmountWithCli(f);
    } finally {
      await cleanup(f);
    }
  });

  it('handles image and mountpoint paths with spaces and commas', async () => {
    const f = await fixture(MiB);
    const image = join(f.dir, 'my image, v2.raw');
    const mnt = join(f.dir, 'mount point, one');
    await copyFile(f.image, image);
    await run('mkdir', [mnt]);
    const g = { ...f, image, mnt };
    try {
      await mount(g);
      expect((await findMount(mnt))?.source).toBe(image);
      await expectSameFile(join(mnt, 'disk.raw'), f.model);
      await unmountWithCli(g);
    } finally {
      await cleanup(g);
    }
  });

  it('an uncaught exception in the daemon still ends in a clean close', async () => {
    const f = await fixture(MiB, { QCOW2FUSE_TEST_BUG_ON_SIGUSR2: '1' });
    try {
      const pid = await mount(f);
      await ddBoth(f, [`if=${f.image}`, 'bs=4k', 'count=2', 'seek=11', 'conv=notrunc']);
      process.kill(pid, 'SIGUSR2');
      await waitForExit(pid);
      await waitForUnmount(f.mnt);
      unregisterMount(f.mnt);
      await expectSameFile(f.image, f.model);
      const log = await readFile(join(f.runtime, (await readdir(f.runtime)).find((n) => n.endsWith('.log')) as string), 'utf8');
      expect(log).toMatch(/fatal: Error: injected bug/);
      expect(log).toMatch(/closed .*image\.raw\n$/);
    } finally {
      await cleanup(f);
    }
  });

  it('a close that fails is reported by qcow2fuse unmount', async () => {
    const f = await fixture(MiB, { QCOW2FUSE_TEST_CLOSE_FAIL: '1' });
    try {
      const pid = await mount(f);
      const result = await cli(['unmount', f.mnt], f.env);
      expect(result.code).toBe(1);
      expect(result.stderr).toMatch(/was unmounted, but closing .*image\.raw failed: .*injected close failure/);
      expect(await findMount(f.mnt)).toBeUndefined();
      unregisterMount(f.mnt);
      await waitForExit(pid);
    } finally {
      await cleanup(f);
    }
  });
});
