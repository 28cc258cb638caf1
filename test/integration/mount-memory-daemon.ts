/**
 * Test entry point (run from dist/ with node): `qcow2fuse mount`'s exact command code over a
 * MemoryDevice instead of a qcow2 image, so the mount lifecycle is tested for real (daemon, signals,
 * unmount paths) independently of the driver.
 *
 * The "image" is a raw file: loaded into memory at open, locked with flock like a real image (a second
 * writable mount is refused with a LockError), written back (truncated to the virtual size) and
 * unlocked on close. Sibling files IMAGE.snapshot.NAME appear as internal snapshots NAME.
 * Environment knobs: QCOW2FUSE_TEST_CLOSE_DELAY_MS delays close (to prove unmount waits for it),
 * QCOW2FUSE_TEST_CLOSE_FAIL=1 makes close fail with EIO after writing back,
 * QCOW2FUSE_TEST_BUG_ON_SIGUSR2=1 makes SIGUSR2 throw an exception nothing catches (a stand-in for a bug),
 * QCOW2FUSE_TEST_OPEN_DELAY_MS holds the open (image locked, IMAGE.opening present) that long before it completes.
 */
import { closeSync, openSync, readdirSync, readFileSync, unlinkSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { basename, dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { runMount } from '../../src/cli/commands/mount.js';
import type { DeviceOpener } from '../../src/fuse/mount.js';
import { CodedError, LockError } from '../../src/io/errors.js';
import { MemoryDevice } from '../unit/fuse/memory-device.js';

const fsExt = createRequire(import.meta.url)('fs-ext') as { flockSync(fd: number, flags: string): void };

const openMemoryImage: DeviceOpener = async (path, options) => {
  const fd = openSync(path, options.readOnly ? 'r' : 'r+');
  try {
    fsExt.flockSync(fd, options.readOnly ? 'shnb' : 'exnb');
  } catch (err) {
    closeSync(fd);
    throw new LockError(path, `image is in use by another process (failed to get an exclusive flock: ${(err as Error).message})`);
  }
  const openDelay = Number(process.env.QCOW2FUSE_TEST_OPEN_DELAY_MS ?? 0);
  if (openDelay > 0) {
    writeFileSync(`${path}.opening`, '');
    await sleep(openDelay);
    unlinkSync(`${path}.opening`);
  }
  const prefix = `${basename(path)}.snapshot.`;
  const snapshots = readdirSync(dirname(path)).filter((f) => f.startsWith(prefix)).sort()
    .map((f, i) => ({ id: String(i + 1), name: f.slice(prefix.length), data: readFileSync(join(dirname(path), f)) }));
  const device = new MemoryDevice(readFileSync(path), { readOnly: options.readOnly, filename: path, snapshots });
  if (process.env.QCOW2FUSE_TEST_BUG_ON_SIGUSR2 === '1') process.on('SIGUSR2', () => { throw new Error('injected bug'); });
  const close = device.close.bind(device);
  let done = false;
  device.close = async () => {
    if (!done) {
      done = true;
      await sleep(Number(process.env.QCOW2FUSE_TEST_CLOSE_DELAY_MS ?? 0));
      if (!options.readOnly) writeFileSync(path, device.data);
      closeSync(fd);
      if (process.env.QCOW2FUSE_TEST_CLOSE_FAIL === '1') throw new CodedError('EIO', `${path}: injected close failure`);
    }
    await close();
  };
  return device;
};

process.exitCode = await runMount(process.argv.slice(2), { opener: openMemoryImage, daemonArgs: [...process.execArgv, process.argv[1]] });
