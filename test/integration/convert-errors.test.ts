/**
 * Issue 13, bad input: every failure gives a clear, coded error and leaves nothing that looks like
 * success. A failing source (unreadable, vanished, failing mid-way, a pipe that ends early or fails)
 * removes the partial destination unless it existed before (-n); a failing destination (ENOSPC on a
 * small tmpfs, EIO from a dying disk) reports the offset and leaves a qcow2 image `qemu-img check`
 * does not call corrupt (leaks allowed); a destination that is the source is refused; a block-device
 * source mounted read-write elsewhere gets a warning.
 */
import { mkdir, stat, symlink, truncate, writeFile } from 'node:fs/promises';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { convertCli } from './convert-harness.js';
import { ForwardingHostFile, type HostFile, type HostFileOpener } from '../../src/io/host-file.js';
import { HostIoError } from '../../src/io/errors.js';
import { openNodeHostFile } from '../../src/io/node-host-file.js';
import { patternBuffer } from '../helpers/patterns.js';
import { sha256, sha256File } from '../helpers/files.js';
import { qemuImg, qemuImgCheck, run } from '../helpers/qemu.js';
import { useTempDir } from '../helpers/tmp.js';
import { requireRoot, requireTools } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const ready = requireTools('qemu-img', 'losetup', 'mkfs.ext4', 'mount', 'umount');

async function exists(path: string): Promise<boolean> {
  return stat(path).then(() => true, () => false);
}

/** The rejection of `promise` (fails the test when it resolves). */
async function failure(promise: Promise<unknown>): Promise<Error & { code?: string; details?: Record<string, unknown> }> {
  try {
    await promise;
  } catch (err) {
    return err as Error & { code?: string };
  }
  throw new Error('expected a failure, got success');
}

/** Opens files through `wrap` when their path is `path`, normally otherwise. */
function openerFor(path: string, wrap: (file: HostFile) => HostFile): HostFileOpener {
  return async (p, options) => {
    const file = await openNodeHostFile(p, options);
    return p === path ? wrap(file) : file;
  };
}

/** A disk that dies: once `budgetBytes` have been written through any handle, every write fails EIO. */
class DyingDisk {
  writtenBytes = 0;
  constructor(private readonly budgetBytes: number) {}
  /** Take `bytes` from the budget; false once the disk is dead. */
  spend(bytes: number): boolean {
    if (this.writtenBytes + bytes > this.budgetBytes) return false;
    this.writtenBytes += bytes;
    return true;
  }

  wrap(inner: HostFile): HostFile {
    const spend = (bytes: number): boolean => this.spend(bytes);
    return new (class extends ForwardingHostFile {
      override async pwrite(buf: Uint8Array, hostOffset: number, point?: Parameters<HostFile['pwrite']>[2]): Promise<void> {
        if (!spend(buf.length)) throw new HostIoError('EIO', inner.path, 'pwrite', hostOffset, 'injected: the disk died');
        return super.pwrite(buf, hostOffset, point);
      }
    })(inner);
  }
}

/** A qcow2 image left by a failed convert: qemu-img check finds no corruption (0 clean, 3 leaks only). */
async function expectNotCorrupt(path: string): Promise<void> {
  const check = await qemuImgCheck(path);
  expect([0, 3], `qemu-img check ${path}: ${check.stderr} ${JSON.stringify(check.report)}`).toContain(check.code);
}

describe.skipIf(!ready)('convert: failures', () => {
  const tmp = useTempDir('convert-errors');

  it('an unreadable source: coded error, no destination', async () => {
    const err = await failure(convertCli(['-O', 'qcow2', tmp.file('missing.raw'), tmp.file('out.qcow2')]));
    expect(err.code).toBe('ENOENT');
    expect(err.message).toMatch(/missing\.raw/);
    expect(await exists(tmp.file('out.qcow2'))).toBe(false);
  });

  it('a source failing or vanishing mid-way: error with the offset, the partial destination removed (kept with -n)', async () => {
    const source = tmp.file('disk.raw');
    await writeFile(source, patternBuffer(32 * MiB, 1, 0));
    const failing = openerFor(source, (inner) => new (class extends ForwardingHostFile {
      override async pread(buf: Uint8Array, hostOffset: number): Promise<number> {
        if (hostOffset >= 16 * MiB) throw new HostIoError('EIO', inner.path, 'pread', hostOffset, 'injected');
        return super.pread(buf, hostOffset);
      }
    })(inner));
    for (const args of [['-c'], []]) {
      const err = await failure(convertCli([...args, '-O', 'qcow2', source, tmp.file('out.qcow2')], { openHostFile: failing }));
      expect(err.code).toBe('EIO');
      expect(err.message).toMatch(/error while reading .*disk\.raw at offset 16777216/);
      expect(await exists(tmp.file('out.qcow2'))).toBe(false);
    }
    // The file shrinks under the copy (deleted, truncated by someone): the reads come back short.
    const vanishing = openerFor(source, (inner) => new (class extends ForwardingHostFile {
      override async pread(buf: Uint8Array, hostOffset: number): Promise<number> {
        if (hostOffset >= 8 * MiB) await truncate(source, MiB);
        return super.pread(buf, hostOffset);
      }
    })(inner));
    expect((await qemuImg(['create', '-q', '-f', 'qcow2', tmp.file('existing.qcow2'), '32M'])).code).toBe(0);
    const err = await failure(convertCli(['-n', '-O', 'qcow2', source, tmp.file('existing.qcow2')], { openHostFile: vanishing }));
    expect(err.code).toBe('EIO');
    expect(err.message).toMatch(/unexpected end of file/);
    expect(await exists(tmp.file('existing.qcow2'))).toBe(true);
    expect((await qemuImgCheck(tmp.file('existing.qcow2'))).code).toBe(0);
  });

  it('a pipe that ends before -o size=, or fails: error, the partial destination removed (kept with -n)', async () => {
    const data = patternBuffer(3 * MiB, 2, 0);
    let err = await failure(convertCli(['-c', '-O', 'qcow2', '-o', 'size=4M', '-', tmp.file('out.qcow2')], { stdin: Readable.from([data]) }));
    expect(err.code).toBe('ESHORTREAD');
    expect(err.message).toMatch(/ended early, after 3145728 of 4194304 bytes/);
    expect(await exists(tmp.file('out.qcow2'))).toBe(false);
    err = await failure(convertCli(['-O', 'raw', '-o', 'size=2M', '-', tmp.file('out.raw')], { stdin: Readable.from([data]) }));
    expect(err.code).toBe('ELONGREAD');
    expect(await exists(tmp.file('out.raw'))).toBe(false);
    // A stream that fails after some data (the ssh connection drops).
    const broken = new Readable({ read() {} });
    broken.push(data);
    setTimeout(() => broken.destroy(Object.assign(new Error('connection reset'), { code: 'ECONNRESET' })), 50);
    err = await failure(convertCli(['-c', '-O', 'qcow2', '-', tmp.file('out.qcow2')], { stdin: broken }));
    expect(err.code).toBe('ECONNRESET');
    expect(err.message).toMatch(/error while reading - at offset/);
    expect(await exists(tmp.file('out.qcow2'))).toBe(false);
    // -n: the target is the user's; it stays (and is consistent).
    expect((await qemuImg(['create', '-q', '-f', 'qcow2', tmp.file('existing.qcow2'), '4M'])).code).toBe(0);
    err = await failure(convertCli(['-n', '-O', 'qcow2', '-o', 'size=4M', '-', tmp.file('existing.qcow2')], { stdin: Readable.from([data]) }));
    expect(err.code).toBe('ESHORTREAD');
    expect((await qemuImgCheck(tmp.file('existing.qcow2'))).code).toBe(0);
  });

  it('ENOSPC on the destination (a 6 MiB tmpfs): error with the offset, the image left is not corrupt', async () => {
    if (!requireRoot()) return;
    const source = tmp.file('disk.raw');
    await writeFile(source, patternBuffer(24 * MiB, 3, 0));
    const small = tmp.file('small');
    await mkdir(small);
    expect((await run('mount', ['-t', 'tmpfs', '-o', 'size=6m', 'tmpfs', small])).code).toBe(0);
    try {
      for (const args of [[], ['-c']]) {
        const out = `${small}/out${args.length}.qcow2`;
        const err = await failure(convertCli([...args, '-O', 'qcow2', source, out]));
        expect(err.code, err.message).toBe('ENOSPC');
        expect(err.message).toMatch(/error while writing .*out\d\.qcow2 at offset \d+/);
        await expectNotCorrupt(out);
        await run('rm', ['-f', out]);
      }
    } finally {
      await run('umount', [small]);
    }
  });

  it('EIO from a dying destination disk: error with the offset, the image left is not corrupt', async () => {
    const source = tmp.file('disk.raw');
    await writeFile(source, patternBuffer(12 * MiB, 4, 0, 'compressible'));
    for (const args of [[], ['-c'], ['-c', '-o', 'compression_type=zstd']]) {
      const out = tmp.file(`out${args.length}.qcow2`);
      const disk = new DyingDisk(args.length === 0 ? 5 * MiB : MiB);
      const err = await failure(convertCli([...args, '-O', 'qcow2', source, out], { openHostFile: openerFor(out, (f) => disk.wrap(f)) }));
      expect(err.code, err.message).toBe('EIO');
      expect(err.message).toMatch(/error while writing .* at offset \d+/);
      await expectNotCorrupt(out);
    }
  });

  it('a destination that is the source (same path, a symlink) or its backing file is refused and left alone', async () => {
    const source = tmp.file('disk.raw');
    const data = patternBuffer(MiB, 5, 0);
    await writeFile(source, data);
    await symlink(source, tmp.file('link.raw'));
    for (const dest of [source, tmp.file('link.raw')]) {
      const err = await failure(convertCli(['-O', 'raw', source, dest]));
      expect(err.code).toBe('EINVAL');
      expect(err.message).toMatch(/the destination is the source/);
    }
    expect((await stat(source)).size).toBe(MiB);
    // The backing file of a qcow2 source: it is read while DEST is written.
    expect((await qemuImg(['create', '-q', '-f', 'qcow2', '-b', source, '-F', 'raw', tmp.file('top.qcow2')])).code).toBe(0);
    for (const args of [['-O', 'qcow2'], ['-O', 'raw']]) {
      const err = await failure(convertCli([...args, tmp.file('top.qcow2'), source]));
      expect(err.code).toBe('EINVAL');
      expect(err.message).toMatch(/the destination is a file the source reads/);
    }
    expect((await qemuImg(['compare', '-q', '-f', 'raw', '-F', 'qcow2', source, tmp.file('top.qcow2')])).code).toBe(0);
    expect(await sha256File(source)).toBe(sha256(data));
  });

  it('a block device mounted read-write elsewhere: converted with a warning', async () => {
    if (!requireRoot()) return;
    const backing = tmp.file('fs.img');
    await truncate(await writeFile(backing, '').then(() => backing), 16 * MiB);
    expect((await run('mkfs.ext4', ['-q', '-F', backing])).code).toBe(0);
    const loop = (await run('losetup', ['-f', '--show', backing])).stdout.trim();
    const mnt = tmp.file('mnt');
    await mkdir(mnt);
    try {
      expect((await run('mount', ['-o', 'rw', loop, mnt])).code).toBe(0);
      const warnings: string[] = [];
      try {
        await convertCli(['-c', '-O', 'qcow2', loop, tmp.file('out.qcow2')], { onWarning: (m) => warnings.push(m) });
      } finally {
        await run('umount', [mnt]);
      }
      expect(warnings).toHaveLength(1);
      expect(warnings[0]).toMatch(new RegExp(`${loop} is mounted read-write at ${mnt}: the copy may be inconsistent`));
      expect((await qemuImgCheck(tmp.file('out.qcow2'))).code).toBe(0);
      // Not mounted: no warning.
      warnings.length = 0;
      await convertCli(['-O', 'raw', loop, tmp.file('out.raw')], { onWarning: (m) => warnings.push(m) });
      expect(warnings).toEqual([]);
    } finally {
      await run('losetup', ['-d', loop]);
    }
  });
});
