import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { run } from '../../helpers/exec.js';
import {
  forceUnmount, isMounted, mountsUnder, parseMountinfo, registerMount, unmountRegistered, waitForMount, waitForUnmount,
} from '../../helpers/mount.js';
import { qemuImgCreate } from '../../helpers/qemu.js';
import { removeTempDir, tempDir } from '../../helpers/tmp.js';
import { requireFuse, requireRoot, requireTool } from '../../helpers/tools.js';

describe('parseMountinfo', () => {
  it('parses optional fields and decodes octal escapes', () => {
    const text = [
      '36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue',
      '40 36 0:50 / /var/tmp/m rw,nosuid,nodev - fuse.qcow2fuse qcow2fuse rw,user_id=0,group_id=0',
    ].join('\n');
    expect(parseMountinfo(text)).toEqual([
      { mountId: 36, parentId: 35, mountPoint: '/mnt/with space', options: ['rw', 'noatime'], fsType: 'ext3', source: '/dev/root', superOptions: ['rw', 'errors=continue'] },
      { mountId: 40, parentId: 36, mountPoint: '/var/tmp/m', options: ['rw', 'nosuid', 'nodev'], fsType: 'fuse.qcow2fuse', source: 'qcow2fuse', superOptions: ['rw', 'user_id=0', 'group_id=0'] },
    ]);
    expect(() => parseMountinfo('garbage line')).toThrow(/unparsable/);
  });
});

const root = requireRoot();

describe.skipIf(!root)('mount helpers on real mounts', () => {
  it('see a tmpfs mount come and go; waitForUnmount / waitForMount time out clearly', async () => {
    const dir = join(await tempDir(), 'mnt');
    await mkdir(dir);
    expect(await isMounted(dir)).toBe(false);
    await expect(waitForMount(dir, 100)).rejects.toThrow(/not mounted within 100 ms/);
    expect((await run('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'qcow2fuse-test', dir])).code).toBe(0);
    registerMount(dir);
    const entry = await waitForMount(dir, 1000, 'tmpfs');
    expect(entry).toMatchObject({ fsType: 'tmpfs', source: 'qcow2fuse-test', mountPoint: dir });
    await expect(waitForUnmount(dir, 100)).rejects.toThrow(/still mounted/);
    expect(await forceUnmount(dir)).toBe(true);
    expect(await isMounted(dir)).toBe(false);
    expect(await forceUnmount(dir)).toBe(false);
  });

  it('unmountRegistered tears down stacked and nested mounts, newest first', async () => {
    const dir = await tempDir();
    const outer = join(dir, 'outer');
    await mkdir(outer);
    expect((await run('mount', ['-t', 'tmpfs', 'qcow2fuse-test', outer])).code).toBe(0);
    registerMount(outer);
    const inner = join(outer, 'inner');
    await mkdir(inner);
    expect((await run('mount', ['-t', 'tmpfs', 'qcow2fuse-test', inner])).code).toBe(0);
    registerMount(inner);
    expect((await mountsUnder(dir)).map((m) => m.mountPoint)).toEqual([inner, outer]);
    expect(await unmountRegistered()).toEqual([inner, outer]);
    expect(await mountsUnder(dir)).toEqual([]);
  });

  it('removeTempDir unmounts before deleting, so files in the mount are not touched through it', async () => {
    const dir = await tempDir();
    const mnt = join(dir, 'm');
    await mkdir(mnt);
    expect((await run('mount', ['-t', 'tmpfs', 'qcow2fuse-test', mnt])).code).toBe(0);
    await writeFile(join(mnt, 'inside'), 'data');
    expect(await removeTempDir(dir)).toEqual([mnt]);
    expect(existsSync(dir)).toBe(false);
  });
});

const fuse = requireFuse() && requireTool('qemu-storage-daemon') && requireTool('qemu-img');

describe.skipIf(!fuse)('mount helpers on a real FUSE mount (qemu-storage-daemon export)', () => {
  it('waits for the FUSE file mount and force-unmounts it with fusermount', async () => {
    const dir = await tempDir();
    const img = join(dir, 'img.qcow2');
    const mnt = join(dir, 'export');
    await qemuImgCreate(img, '4M');
    await writeFile(mnt, '');
    const daemon = spawn('qemu-storage-daemon', [
      '--blockdev', `driver=file,node-name=f,filename=${img}`,
      '--blockdev', 'driver=qcow2,node-name=q,file=f',
      '--export', `type=fuse,id=e,node-name=q,mountpoint=${mnt},writable=on`,
    ], { stdio: 'ignore' });
    const exited = new Promise<void>((resolve) => daemon.once('exit', () => resolve()));
    try {
      registerMount(mnt);
      const entry = await waitForMount(mnt, 10_000, 'fuse');
      expect(entry.fsType).toMatch(/^fuse/);
      expect(await forceUnmount(mnt)).toBe(true);
      expect(await isMounted(mnt)).toBe(false);
    } finally {
      daemon.kill('SIGTERM');
      await exited;
    }
  });
});
