/**
 * Sharing an image with QEMU and with other qcow2fuse processes, through the CLI as a user runs it:
 * readers (info, map, check, snapshot -l, convert, mount -o ro) are refused while a writer holds the
 * image and keep new writers out while they read; -U / --force-share and -o ro,force-share read
 * anyway (with a warning) and keep nobody out — QEMU's semantics, checked against qemu-io and
 * qemu-img both ways. Backing files are held as QEMU holds them: as readers.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { run } from '../helpers/exec.js';
import { registerMount, unregisterMount } from '../helpers/mount.js';
import { qemuImg, qemuImgCheckClean, qemuImgCreate, qemuIo, qemuIoOk } from '../helpers/qemu.js';
import { tempDir } from '../helpers/tmp.js';
import { requireFuse, requireTools } from '../helpers/tools.js';
import { checkBuild, cli, testEnv } from './mount-harness.js';

const ready = requireFuse() && requireTools('qemu-img', 'qemu-io');
const LOCKED = 'Failed to get shared "write" lock';

/** OFD lock bytes held on `path` by anyone, from /proc/locks. */
async function lockBytes(path: string): Promise<number> {
  const inode = (await stat(path)).ino;
  return (await readFile('/proc/locks', 'utf8')).split('\n')
    .filter((line) => line.includes('OFDLCK') && Number(line.trim().split(/\s+/)[5]?.split(':')[2]) === inode).length;
}

/** An interactive qemu-io holding `image` open (read-write unless args say otherwise) until stop(). */
async function holdWithQemuIo(image: string, args: string[] = []): Promise<{ stop(): Promise<void> }> {
  const before = await lockBytes(image);
  const child: ChildProcess = spawn('qemu-io', [...args, image], { stdio: ['pipe', 'ignore', 'inherit'] });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const deadline = Date.now() + 20_000;
  while (await lockBytes(image) <= before) {
    if (Date.now() > deadline || child.exitCode !== null) throw new Error(`qemu-io ${args.join(' ')} did not lock ${image}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return {
    async stop() {
      child.stdin?.end('quit\n');
      await exited;
    },
  };
}

interface Fixture {
  dir: string;
  image: string;
  env: NodeJS.ProcessEnv;
}

async function fixture(): Promise<Fixture> {
  await checkBuild();
  const dir = await tempDir('sharing');
  const image = join(dir, 'vm.qcow2');
  await qemuImgCreate(image, '16M');
  await qemuIoOk(image, ['write -P 0x5a 0 1M']);
  return { dir, image, env: testEnv(join(dir, 'run')) };
}

/** Mount on a new directory under the fixture; returns the mountpoint and an unmount that asserts success. */
async function mount(f: Fixture, name: string, options: string): Promise<{ mnt: string; unmount(): Promise<void> }> {
  const mnt = join(f.dir, name);
  await mkdir(mnt);
  registerMount(mnt);
  const result = await cli(['mount', '-o', options, f.image, mnt], f.env);
  expect(result.stderr.split('\n').filter((l) => !l.includes('warning:') && l !== '')).toEqual([]);
  expect(result.code).toBe(0);
  return {
    mnt,
    async unmount() {
      expect(await cli(['unmount', mnt], f.env)).toMatchObject({ code: 0, stderr: '' });
      unregisterMount(mnt);
    },
  };
}

function expectRefused(result: { code: number; stderr: string }, image: string, qemuMessage = LOCKED): void {
  expect(result.code).not.toBe(0);
  expect(result.stderr).toContain(image);
  expect(result.stderr).toContain(qemuMessage);
  expect(result.stderr).toContain('-U (--force-share)');
}

describe.skipIf(!ready)('sharing images with QEMU and other qcow2fuse processes', () => {
  it('while qemu-io writes, info/map/check/snapshot -l/convert refuse as qemu-img does, and read with -U', async () => {
    const f = await fixture();
    const holder = await holdWithQemuIo(f.image);
    try {
      expect((await qemuImg(['info', f.image])).stderr).toContain(LOCKED);
      const commands = [['info'], ['map'], ['check'], ['snapshot', '-l'], ['convert', '-O', 'raw', f.image, join(f.dir, 'copy.raw')]];
      for (const command of commands) {
        const args = command[0] === 'convert' ? command : [...command, f.image];
        expectRefused(await cli(args, f.env), f.image);
        for (const flag of ['-U', '--force-share']) {
          const shared = await cli([args[0], flag, ...args.slice(1)], f.env);
          expect(shared.code, shared.stderr).toBe(0);
          expect(shared.stderr).toBe(`qcow2fuse ${args[0]}: warning: ${f.image} is open for writing in another process; ` +
            'reading it anyway (force-share): what is read may be stale or inconsistent\n');
        }
      }
      const ours = await cli(['info', '-U', '--output=json', 'vm.qcow2'], f.env, { cwd: f.dir });
      const theirs = await run('qemu-img', ['info', '-U', '--output=json', 'vm.qcow2'], { cwd: f.dir });
      expect(ours.stdout).toBe(theirs.stdout);
      // Buffer.equals: vitest's deep equality walks 16 Mi indices one by one.
      expect((await readFile(join(f.dir, 'copy.raw'))).equals(Buffer.concat([Buffer.alloc(1 << 20, 0x5a), Buffer.alloc(15 << 20)]))).toBe(true);
      const repair = await cli(['check', '-U', '-r', 'all', f.image], f.env);
      expect(repair.code).toBe(1);
      expect(repair.stderr).toContain('force-share=on can only be used with read-only images');
    } finally {
      await holder.stop();
    }
    expect(await cli(['info', f.image], f.env)).toMatchObject({ code: 0, stderr: '' });
  });

  it('while qemu-io writes, mount -o ro is refused, -o ro,force-share mounts and reads, force-share without ro is refused', async () => {
    const f = await fixture();
    const holder = await holdWithQemuIo(f.image);
    try {
      await mkdir(join(f.dir, 'mnt'));
      const refused = await cli(['mount', '-o', 'ro', f.image, join(f.dir, 'mnt')], f.env);
      expectRefused(refused, f.image);
      expect(refused.stderr).toContain('-o ro,force-share for a mount');
      const rw = await cli(['mount', '-o', 'force-share', f.image, join(f.dir, 'mnt')], f.env);
      expect(rw.code).toBe(1);
      expect(rw.stderr).toContain('mount option force-share needs ro');
      const shared = await mount(f, 'shared', 'ro,force-share');
      const head = await readFile(join(shared.mnt, 'disk.raw'));
      expect(head.subarray(0, 1 << 20).equals(Buffer.alloc(1 << 20, 0x5a))).toBe(true);
      await shared.unmount();
    } finally {
      await holder.stop();
    }
  });

  it('a read-only mount keeps qemu-io and our writers out and shares with readers; force-share keeps nobody out', async () => {
    const f = await fixture();
    const ro = await mount(f, 'ro', 'ro');
    const write = await qemuIo(f.image, ['write -P 1 0 4k']);
    expect(write.code).not.toBe(0);
    expect(write.stderr).toContain('Failed to get "write" lock');
    await mkdir(join(f.dir, 'rw'));
    const ourWriter = await cli(['mount', f.image, join(f.dir, 'rw')], f.env);
    expect(ourWriter.code).toBe(1);
    expect(ourWriter.stderr).toContain("does not share the 'write' permission");
    expect((await qemuImg(['info', f.image])).code).toBe(0);
    expect((await cli(['map', f.image], f.env)).code).toBe(0);
    const second = await mount(f, 'ro2', 'ro');
    await second.unmount();
    await ro.unmount();

    const shared = await mount(f, 'shared', 'ro,force-share');
    await qemuIoOk(f.image, ['write -P 7 1M 64k']);
    await shared.unmount();
    await qemuIoOk(f.image, ['read -P 7 1M 64k', 'read -P 0x5a 0 1M']);
    await qemuImgCheckClean(f.image);
  });

  it('a read-write mount keeps readers out: qcow2fuse info and qemu-img info refuse, -U reads', async () => {
    const f = await fixture();
    const rw = await mount(f, 'rw', 'rw');
    try {
      expectRefused(await cli(['info', f.image], f.env), f.image);
      expect((await cli(['info', '-U', f.image], f.env)).code).toBe(0);
      expect((await qemuImg(['info', f.image])).stderr).toContain(LOCKED);
      expect((await qemuImg(['info', '-U', f.image])).code).toBe(0);
      expect((await qemuIo(f.image, ['read 0 4k'], { readOnly: true })).stderr).toContain(LOCKED);
      await mkdir(join(f.dir, 'ro'));
      expectRefused(await cli(['mount', '-o', 'ro', f.image, join(f.dir, 'ro')], f.env), f.image);
      await run('dd', ['if=/dev/zero', `of=${join(rw.mnt, 'disk.raw')}`, 'bs=64k', 'count=1', 'seek=32', 'conv=notrunc,fsync']);
    } finally {
      await rw.unmount();
    }
    await qemuImgCheckClean(f.image);
  });

  it('backing files are held as readers: a writer of the top keeps writers of the base out; info does not open the chain', async () => {
    const f = await fixture();
    const top = join(f.dir, 'top.qcow2');
    await qemuImgCreate(top, '16M', {}, { backing: 'vm.qcow2', backingFormat: 'qcow2' });
    const topFixture = { ...f, image: top };
    const rw = await mount(topFixture, 'top', 'rw');
    try {
      const write = await qemuIo(f.image, ['write 0 4k']);
      expect(write.stderr).toContain('Failed to get "write" lock');
      expect((await qemuImg(['info', f.image])).code).toBe(0);
      expect((await cli(['map', f.image], f.env)).code).toBe(0);
    } finally {
      await rw.unmount();
    }
    const holder = await holdWithQemuIo(f.image);
    try {
      expect((await qemuImg(['map', top])).stderr).toContain(LOCKED);
      expectRefused(await cli(['map', top], f.env), f.image);
      expect((await cli(['map', '-U', top], f.env)).code).toBe(0);
      expect((await qemuImg(['info', top])).code).toBe(0);
      expect(await cli(['info', top], f.env)).toMatchObject({ code: 0, stderr: '' });
    } finally {
      await holder.stop();
    }
    await qemuImgCheckClean(top);
    await qemuImgCheckClean(f.image);
  });
});
