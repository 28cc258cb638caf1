/**
 * QEMU-compatible image locking against the real QEMU tools: the same lock bytes as qemu-io takes
 * (writer, reader, force-share reader), qemu-img refusing an image we write, us refusing an image
 * qemu-io writes, readers keeping writers out, force-share keeping nobody out — both ways.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, statSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';

import { LockError } from '../../../src/io/errors.js';
import type { HostFile } from '../../../src/io/host-file.js';
import {
  probeQemuLocks, QEMU_LOCK_PERM_BASE, QEMU_LOCK_SHARED_BASE, QEMU_READER, QEMU_SHARED_READER, QEMU_WRITER, qemuLockBytes,
  qemuPermissionsFor, queryQemuLocks,
} from '../../../src/io/locks.js';
import { openNodeHostFile } from '../../../src/io/node-host-file.js';
import { requireTool } from '../../helpers/tools.js';

interface RunResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

function run(command: string, args: string[]): RunResult {
  const result = spawnSync(command, args, { encoding: 'utf8', timeout: 60_000 });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

/** OFD lock bytes held on `path`, from /proc/locks (every holder, as a sorted list of byte offsets). */
async function procLockBytes(path: string): Promise<number[]> {
  const inode = statSync(path).ino;
  const bytes: number[] = [];
  for (const line of (await readFile('/proc/locks', 'utf8')).split('\n')) {
    const fields = line.trim().split(/\s+/);
    // "1: OFDLCK ADVISORY READ -1 fe:00:2146742 100 101"
    if (fields[1] !== 'OFDLCK' || Number(fields[5]?.split(':')[2]) !== inode) {
      continue;
    }
    for (let byte = Number(fields[6]); byte <= Number(fields[7]); byte++) {
      bytes.push(byte);
    }
  }
  return bytes.sort((a, b) => a - b);
}

async function waitFor(condition: () => boolean | Promise<boolean>, what: string): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (!(await condition())) {
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** A long-lived qemu-io with the image open, reading commands from a pipe we keep open. */
class QemuIo {
  private readonly child: ChildProcess;
  private readonly exited: Promise<void>;

  constructor(args: string[]) {
    this.child = spawn('qemu-io', args, { stdio: ['pipe', 'ignore', 'pipe'] });
    this.exited = new Promise((resolve) => this.child.once('exit', () => resolve()));
  }

  /** Wait until the process holds its locks on `path` (the lock bytes appear in /proc/locks). */
  async ready(path: string, expectedBytes: number): Promise<void> {
    await waitFor(async () => (await procLockBytes(path)).length >= expectedBytes, 'qemu-io to lock the image');
  }

  async stop(): Promise<void> {
    this.child.stdin?.end('quit\n');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 5000);
    await this.exited;
    clearTimeout(timer);
  }
}

const hasQemu = requireTool('qemu-img') && requireTool('qemu-io');
let dir: string;
let image: string;
const openFiles: HostFile[] = [];
const qemuProcesses: QemuIo[] = [];

async function openTracked(readOnly: boolean, lock = true, forceShare = false): Promise<HostFile> {
  const file = await openNodeHostFile(image, { readOnly, lock, forceShare });
  openFiles.push(file);
  return file;
}

function startQemuIo(args: string[]): QemuIo {
  const process = new QemuIo(args);
  qemuProcesses.push(process);
  return process;
}

beforeAll(() => {
  dir = mkdtempSync('/var/tmp/qcow2fuse-locks-');
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

beforeEach(() => {
  image = join(dir, `image-${Date.now()}-${Math.random().toString(16).slice(2)}.qcow2`);
  if (hasQemu) {
    expect(run('qemu-img', ['create', '-q', '-f', 'qcow2', image, '64M']).status).toBe(0);
  }
});

afterEach(async () => {
  await Promise.all(openFiles.splice(0).map((file) => file.close()));
  await Promise.all(qemuProcesses.splice(0).map((process) => process.stop()));
  rmSync(image, { force: true });
});

describe('QEMU lock byte layout', () => {
  it('matches file-posix.c: held permissions at 100+bit, unshared at 200+bit', () => {
    expect(QEMU_LOCK_PERM_BASE).toBe(100);
    expect(QEMU_LOCK_SHARED_BASE).toBe(200);
    expect(qemuLockBytes(QEMU_WRITER)).toEqual([100, 101, 103, 201, 203]);
    expect(qemuLockBytes(QEMU_READER)).toEqual([100, 201, 203]);
    expect(qemuLockBytes(QEMU_SHARED_READER)).toEqual([100]);
  });

  it('picks writer, reader or force-share reader; force-share needs read-only, as in QEMU', () => {
    expect(qemuPermissionsFor('i', false, false)).toBe(QEMU_WRITER);
    expect(qemuPermissionsFor('i', true, false)).toBe(QEMU_READER);
    expect(qemuPermissionsFor('i', true, true)).toBe(QEMU_SHARED_READER);
    expect(() => qemuPermissionsFor('i', false, true)).toThrow('force-share=on can only be used with read-only images');
  });
});

describe.skipIf(!hasQemu)('interop with qemu-img and qemu-io', () => {
  it('takes exactly the bytes qemu-io takes, for write, for read and for a force-shared read', async () => {
    const qemuWriter = startQemuIo([image]);
    await qemuWriter.ready(image, 5);
    const qemuWriterBytes = await procLockBytes(image);
    await qemuWriter.stop();
    expect(await procLockBytes(image)).toEqual([]);

    const ours = await openTracked(false);
    expect(await procLockBytes(image)).toEqual(qemuWriterBytes);
    await ours.close();
    expect(await procLockBytes(image)).toEqual([]);

    const qemuReader = startQemuIo(['-r', image]);
    await qemuReader.ready(image, 3);
    const qemuReaderBytes = await procLockBytes(image);
    await qemuReader.stop();
    const reader = await openTracked(true);
    expect(await procLockBytes(image)).toEqual(qemuReaderBytes);
    await reader.close();

    const qemuSharedReader = startQemuIo(['-r', '-U', image]);
    await qemuSharedReader.ready(image, 1);
    const qemuSharedReaderBytes = await procLockBytes(image);
    await qemuSharedReader.stop();
    await openTracked(true, true, true);
    expect(await procLockBytes(image)).toEqual(qemuSharedReaderBytes);
  });

  it('while we write, qemu-img info fails with its lock error and info -U works', async () => {
    await openTracked(false);
    const info = run('qemu-img', ['info', image]);
    expect(info.status).not.toBe(0);
    expect(info.stderr).toContain('Failed to get shared "write" lock');
    const shared = run('qemu-img', ['info', '-U', image]);
    expect(shared.status).toBe(0);
    expect(shared.stdout).toContain('file format: qcow2');
    const write = run('qemu-io', ['-c', 'write 0 512', image]);
    expect(write.status).not.toBe(0);
    expect(write.stderr).toContain('Failed to get "write" lock');
  });

  it('while we read, qemu-img info works and qemu-io cannot write (we do not share write)', async () => {
    await openTracked(true);
    expect(run('qemu-img', ['info', image]).status).toBe(0);
    const write = run('qemu-io', ['-c', 'write -P 7 0 512', image]);
    expect(write.status).not.toBe(0);
    expect(write.stderr).toContain('Failed to get "write" lock');
  });

  it('while we read with force-share, qemu-io writes work', async () => {
    await openTracked(true, true, true);
    expect(run('qemu-img', ['info', image]).status).toBe(0);
    const write = run('qemu-io', ['-c', 'write -P 7 0 512', image]);
    expect(write.stderr).toBe('');
    expect(write.status).toBe(0);
  });

  it('once we close, qemu-img info works again', async () => {
    const file = await openTracked(false);
    expect(run('qemu-img', ['info', image]).status).not.toBe(0);
    await file.close();
    expect(run('qemu-img', ['info', image]).status).toBe(0);
  });

  it('while qemu-io writes, our opens for write and for read fail with LockError; force-share reads', async () => {
    const qemu = startQemuIo([image]);
    await qemu.ready(image, 5);
    const failure = await openNodeHostFile(image, { readOnly: false }).catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(LockError);
    expect(failure).toMatchObject({
      code: 'ELOCKED', details: { path: image, permission: 'write', qemuMessage: 'Failed to get "write" lock' },
    });
    expect((failure as Error).message).toContain(`${image}: image is in use by another process that is writing it`);
    expect((failure as Error).message).toContain('use -U (--force-share), or -o ro,force-share for a mount');
    // The failed open released whatever it had taken: only qemu-io's bytes remain.
    expect(await procLockBytes(image)).toEqual([100, 101, 103, 201, 203]);

    const readFailure = await openNodeHostFile(image, { readOnly: true }).catch((error: unknown) => error);
    expect(readFailure).toBeInstanceOf(LockError);
    expect(readFailure).toMatchObject({
      code: 'ELOCKED', details: { path: image, permission: 'write', qemuMessage: 'Failed to get shared "write" lock' },
    });
    expect((readFailure as Error).message).toContain('Failed to get shared "write" lock; is another process using the image?');
    expect((readFailure as Error).message).toContain('-U (--force-share)');
    expect(await procLockBytes(image)).toEqual([100, 101, 103, 201, 203]);
    expect(probeQemuLocks(image)).toEqual({ held: ['consistent read', 'write', 'resize'], unshared: ['write', 'resize'] });

    const reader = await openTracked(true, true, true);
    const header = Buffer.alloc(4);
    expect(await reader.pread(header, 0)).toBe(4);
    expect(header.toString('latin1')).toBe('QFI\xfb');

    await qemu.stop();
    await openTracked(false);
  });

  it('while a plain read-only qemu-io has it open, our open for write fails (write not shared)', async () => {
    const qemu = startQemuIo(['-r', image]);
    await qemu.ready(image, 3);
    const failure = await openNodeHostFile(image, { readOnly: false }).catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(LockError);
    expect((failure as Error).message).toContain("does not share the 'write' permission");
    expect((failure as Error).message).toContain('wait for it to finish or stop it');
    await openTracked(true);
  });

  it('while a force-share qemu-io reads, our open for write works', async () => {
    const qemu = startQemuIo(['-r', '-U', image]);
    await qemu.ready(image, 1);
    const writer = await openTracked(false);
    await writer.pwrite(Buffer.from('x'), 1 << 20);
  });

  it('reports what other processes hold', async () => {
    const qemu = startQemuIo([image]);
    await qemu.ready(image, 5);
    const fd = openSync(image, 'r');
    try {
      expect(queryQemuLocks(fd)).toEqual({ held: ['consistent read', 'write', 'resize'], unshared: ['write', 'resize'] });
    } finally {
      closeSync(fd);
    }
  });
});

describe.skipIf(!hasQemu)('between our own handles', () => {
  it('a second writer and a reader fail; force-share readers and unlocked opens work', async () => {
    await openTracked(false);
    const failure = await openNodeHostFile(image, { readOnly: false }).catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(LockError);
    expect((failure as Error).message).toContain('flock');
    const readFailure = await openNodeHostFile(image, { readOnly: true }).catch((error: unknown) => error);
    expect(readFailure).toBeInstanceOf(LockError);
    expect((readFailure as Error).message).toContain('that is writing it');
    await openTracked(true, true, true);
    await openTracked(false, false);
  });

  it('readers share with readers and keep writers out; a force-share reader keeps nobody out', async () => {
    await openTracked(true);
    await openTracked(true);
    const failure = await openNodeHostFile(image, { readOnly: false }).catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(LockError);
    expect((failure as Error).message).toContain("does not share the 'write' permission");
    await Promise.all(openFiles.splice(0).map((file) => file.close()));
    await openTracked(true, true, true);
    const writer = await openTracked(false);
    await writer.pwrite(Buffer.from('x'), 1 << 20);
  });

  it('force-share on a read-write open is refused', async () => {
    const failure = await openNodeHostFile(image, { readOnly: false, forceShare: true }).catch((error: unknown) => error);
    expect(failure).toMatchObject({ code: 'EINVAL' });
    expect((failure as Error).message).toContain('force-share=on can only be used with read-only images');
  });
});
