/**
 * The FUSE session (the default transport) under stress, over a memory device (mount-memory-daemon.ts):
 * a thousand requests in flight at once, a client killed with requests outstanding, the kernel's
 * writeback cache (durable at unmount), and requests the mount refuses — each answered with an errno while the daemon keeps serving, and the mount still
 * ending in a clean close with the data intact.
 */
import { spawn } from 'node:child_process';
import { copyFile, mkdir, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { beforeAll, describe, expect, it } from 'vitest';
import { run } from '../helpers/exec.js';
import { writePatternFile } from '../helpers/files.js';
import { findMount, forceUnmount, registerMount, unregisterMount } from '../helpers/mount.js';
import { tempDir } from '../helpers/tmp.js';
import { findTool, requireFuse, requireTools } from '../helpers/tools.js';
import { checkBuild, cli, daemonPid, memoryMount, testEnv, waitForExit } from './mount-harness.js';

const MiB = 1024 * 1024;
const ready = requireFuse() && requireTools('fio', 'cmp', 'dd', 'cat', 'chmod', 'chown', 'mkdir', 'touch', 'mknod', 'rm', 'mv', 'ln', 'rmdir', 'truncate');

interface Fixture {
  dir: string;
  image: string;
  model: string;
  mnt: string;
  runtime: string;
  env: NodeJS.ProcessEnv;
}

async function fixture(bytes: number): Promise<Fixture> {
  const dir = await tempDir('session');
  const f = { dir, image: join(dir, 'image.raw'), model: join(dir, 'model.raw'), mnt: join(dir, 'mnt'), runtime: join(dir, 'run'), env: testEnv(join(dir, 'run')) };
  await writePatternFile(f.image, bytes, 77);
  await copyFile(f.image, f.model);
  await mkdir(f.mnt);
  return f;
}

async function mount(f: Fixture, options: string[] = []): Promise<number> {
  registerMount(f.mnt);
  const result = await memoryMount([...options.flatMap((o) => ['-o', o]), f.image, f.mnt], f.env);
  expect(result.stderr).toBe('');
  expect(result.code).toBe(0);
  return daemonPid(f.mnt, f.runtime);
}

/** Unmount with the CLI (a clean close), then the image must equal the model. */
async function unmountClean(f: Fixture, pid: number): Promise<void> {
  const result = await cli(['unmount', f.mnt], f.env);
  expect(result.stderr).toBe('');
  expect(result.code).toBe(0);
  unregisterMount(f.mnt);
  await waitForExit(pid);
  expect((await readdir(f.runtime)).filter((n) => n.endsWith('.json'))).toEqual([]);
  expect((await run('cmp', [f.image, f.model])).code).toBe(0);
}

async function cleanup(f: Fixture): Promise<void> {
  await forceUnmount(f.mnt);
  unregisterMount(f.mnt);
}

function fio(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return run(findTool('fio') ?? 'fio', ['--output-format=terse', '--group_reporting', ...args]);
}

describe.skipIf(!ready)('the FUSE session under stress', () => {
  beforeAll(checkBuild);

  it('serves 1 000 requests in flight at once (fio iodepth 1000, O_DIRECT), the data verified', async () => {
    const f = await fixture(64 * MiB);
    try {
      const pid = await mount(f);
      const raw = join(f.mnt, 'disk.raw');
      const write = await fio(['--name=q', `--filename=${raw}`, '--rw=randwrite', '--bs=4k', '--ioengine=libaio', '--iodepth=1000',
        '--iodepth_batch_submit=1000', '--direct=1', '--size=16M', '--offset=32M', '--verify=crc32c', '--verify_fatal=1', '--do_verify=1',
        '--verify_state_save=0']);
      expect(write.stderr).toBe('');
      expect(write.code).toBe(0);
      const read = await fio(['--name=r', `--filename=${raw}`, '--rw=randread', '--bs=4k', '--ioengine=libaio', '--iodepth=1000',
        '--iodepth_batch_submit=1000', '--direct=1', '--size=32M', '--number_ios=20000']);
      expect(read.stderr).toBe('');
      expect(read.code).toBe(0);
      // The region fio did not touch is still the image's pattern; the written one goes to the model.
      expect((await run('cmp', ['-n', String(32 * MiB), raw, f.model])).code).toBe(0);
      await run('dd', [`if=${raw}`, `of=${f.model}`, 'bs=1M', 'skip=32', 'seek=32', 'count=16', 'conv=notrunc', 'status=none']);
      await unmountClean(f, pid);
    } finally {
      await cleanup(f);
    }
  });

  it('keeps serving when a client is killed with requests outstanding', async () => {
    const f = await fixture(64 * MiB);
    try {
      const pid = await mount(f);
      const raw = join(f.mnt, 'disk.raw');
      for (let round = 0; round < 3; round++) {
        const client = spawn(findTool('fio') ?? 'fio', ['--name=k', '--thread', `--filename=${raw}`, '--rw=randread', '--bs=64k', '--ioengine=libaio',
          '--iodepth=256', '--direct=1', '--size=64M', '--time_based', '--runtime=30'], { stdio: 'ignore' });
        // --thread: the job runs in fio's own process, so the kill reaches the process holding the requests.
        const exited = new Promise<NodeJS.Signals | null>((resolve) => client.on('exit', (_code, signal) => resolve(signal)));
        await sleep(700);
        client.kill('SIGKILL');
        expect(await exited).toBe('SIGKILL');
      }
      expect((await run('cmp', [raw, f.model])).code).toBe(0);
      await unmountClean(f, pid);
    } finally {
      await cleanup(f);
    }
  });

  it.each(['qcow2fuse unmount', 'umount'])('-o writeback_cache: 4 KiB writes, then %s, leave every byte in the image', async (ending) => {
    const f = await fixture(16 * MiB);
    try {
      const pid = await mount(f, ['writeback_cache']);
      const raw = join(f.mnt, 'disk.raw');
      const src = join(f.dir, 'src.raw');
      await writePatternFile(src, 4 * MiB, 5);
      for (const [seek, sync] of [[100, 'conv=notrunc,fsync'], [3000, 'conv=notrunc']] as const) {
        for (const target of [raw, f.model]) {
          const dd = await run('dd', [`if=${src}`, `of=${target}`, 'bs=4k', 'count=1000', `seek=${seek}`, sync, 'status=none']);
          expect(dd.code).toBe(0);
        }
      }
      expect((await run('cmp', [raw, f.model])).code).toBe(0);
      if (ending === 'umount') {
        expect((await run('umount', [f.mnt])).code).toBe(0);
        unregisterMount(f.mnt);
        await waitForExit(pid);
        expect((await run('cmp', [f.image, f.model])).code).toBe(0);
      } else {
        await unmountClean(f, pid);
      }
    } finally {
      await cleanup(f);
    }
  });

  it('answers every request the mount refuses with an errno, and serves on', async () => {
    const f = await fixture(4 * MiB);
    try {
      const pid = await mount(f);
      const at = (name: string) => join(f.mnt, name);
      const refused: [string, string[], RegExp][] = [
        ['chmod', ['600', at('disk.raw')], /Operation not permitted/],
        ['chown', ['1:1', at('disk.raw')], /Operation not permitted/],
        ['mkdir', [at('dir')], /Operation not permitted/],
        ['touch', [at('new')], /Operation not permitted/],
        ['mknod', [at('fifo'), 'p'], /Operation not permitted/],
        ['rm', ['-f', at('disk.raw')], /Operation not permitted/],
        ['mv', [at('disk.raw'), at('moved')], /Operation not permitted/],
        ['ln', [at('disk.raw'), at('hard')], /Operation not permitted/],
        ['ln', ['-s', 'disk.raw', at('soft')], /Operation not permitted/],
        ['rmdir', [at('snapshots')], /Operation not permitted/],
        ['truncate', ['-s', '0', at('info.json')], /Permission denied/],
        ['cat', [at('nothing-here')], /No such file or directory/],
      ];
      for (const [command, args, message] of refused) {
        const result = await run(command, args);
        expect(`${command} ${args.join(' ')}: ${result.code} ${result.stderr}`).toMatch(message);
        expect(result.code).not.toBe(0);
      }
      expect((await readdir(f.mnt)).sort()).toEqual(['check.json', 'disk.raw', 'info.json', 'layout.txt', 'map.json', 'snapshots']);
      expect((await run('cmp', [at('disk.raw'), f.model])).code).toBe(0);
      expect(await findMount(f.mnt)).toBeDefined();
      await unmountClean(f, pid);
    } finally {
      await cleanup(f);
    }
  });
});
