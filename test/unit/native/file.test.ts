/**
 * native/file.c through its typed wrapper (src/io/native.ts): fallocate modes and errors, fadvise,
 * OFD locks, DIO alignment.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, constants as fsConstants, fstatSync, fsyncSync, mkdtempSync, openSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { dioAlignment, FADVISE, fadvise, FALLOC, fallocate, ofdGetLock, ofdSetLock } from '../../../src/io/native.js';
import { requireTool } from '../../helpers/tools.js';
import { expectCode, makeDirectIoDir, MiB } from './helpers.js';

let dir: string;

beforeAll(() => {
  dir = makeDirectIoDir();
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});


describe('dioAlignment', () => {
  it('reads STATX_DIOALIGN for a regular file on a block filesystem', () => {
    const path = join(dir, 'align.bin');
    writeFileSync(path, Buffer.alloc(4096));
    const fd = openSync(path, 'r');
    try {
      const alignment = dioAlignment(fd);
      expect(['statx', 'fallback']).toContain(alignment.source);
      for (const value of [alignment.memAlign, alignment.offsetAlign]) {
        expect(Number.isInteger(Math.log2(value))).toBe(true);
        expect(value).toBeLessThanOrEqual(65536);
      }
    } finally {
      closeSync(fd);
    }
  });

  it('falls back to 4096 where the kernel reports nothing (character device)', () => {
    const fd = openSync('/dev/null', 'r');
    try {
      expect(dioAlignment(fd)).toEqual({ memAlign: 4096, offsetAlign: 4096, source: 'fallback' });
    } finally {
      closeSync(fd);
    }
  });

  it('throws EBADF for a closed descriptor', () => {
    const fd = openSync('/dev/null', 'r');
    closeSync(fd);
    expect(() => dioAlignment(fd)).toThrow(expect.objectContaining({ code: 'EBADF' }) as Error);
  });
});

describe('fallocate', () => {
  it('exports the Linux mode values', () => {
    expect(FALLOC).toEqual({ DEFAULT: 0, KEEP_SIZE: 1, ZERO_RANGE: 16, ZERO_RANGE_KEEP_SIZE: 17, PUNCH_HOLE_KEEP_SIZE: 3 });
  });

  it('implements default, KEEP_SIZE, ZERO_RANGE and PUNCH_HOLE|KEEP_SIZE on the host filesystem', async () => {
    const path = join(dir, 'falloc.bin');
    const fd = openSync(path, 'w+');
    try {
      await fallocate(fd, FALLOC.DEFAULT, 0, MiB);
      expect(fstatSync(fd).size).toBe(MiB);
      expect(fstatSync(fd).blocks * 512).toBeGreaterThanOrEqual(MiB);

      await fallocate(fd, FALLOC.KEEP_SIZE, MiB, MiB);
      expect(fstatSync(fd).size).toBe(MiB);
      expect(fstatSync(fd).blocks * 512).toBeGreaterThanOrEqual(2 * MiB);

      writeSync(fd, Buffer.alloc(64 * 1024, 0xaa), 0, 64 * 1024, 0);
      await fallocate(fd, FALLOC.ZERO_RANGE, 4096, 8192);
      const back = Buffer.alloc(64 * 1024);
      readSync(fd, back, 0, back.length, 0);
      expect(back.subarray(0, 4096).every((b) => b === 0xaa)).toBe(true);
      expect(back.subarray(4096, 12288).every((b) => b === 0)).toBe(true);
      expect(back.subarray(12288).every((b) => b === 0xaa)).toBe(true);

      await fallocate(fd, FALLOC.ZERO_RANGE, MiB, 4096);
      expect(fstatSync(fd).size).toBe(MiB + 4096);

      const blocksBefore = fstatSync(fd).blocks;
      await fallocate(fd, FALLOC.PUNCH_HOLE_KEEP_SIZE, 0, 512 * 1024);
      expect(fstatSync(fd).size).toBe(MiB + 4096);
      expect(fstatSync(fd).blocks).toBeLessThan(blocksBefore);
      readSync(fd, back, 0, back.length, 0);
      expect(back.every((b) => b === 0)).toBe(true);
    } finally {
      closeSync(fd);
    }
  });

  it('rejects with EOPNOTSUPP where the filesystem lacks the mode (ZERO_RANGE on tmpfs)', async () => {
    const tmpfsDir = mkdtempSync('/dev/shm/qcow2fuse-native-');
    const fd = openSync(join(tmpfsDir, 'f.bin'), 'w+');
    try {
      let failure: unknown;
      await fallocate(fd, FALLOC.ZERO_RANGE, 0, 4096).catch((error: unknown) => {
        failure = error;
      });
      expectCode(failure, 'EOPNOTSUPP');
      expect((failure as { errno: number }).errno).toBe(-95);
      expect((failure as { syscall: string }).syscall).toBe('fallocate');
      await expect(fallocate(fd, FALLOC.PUNCH_HOLE_KEEP_SIZE, 0, 4096)).resolves.toBeUndefined();
    } finally {
      closeSync(fd);
      rmSync(tmpfsDir, { recursive: true, force: true });
    }
  });

  it('rejects with the errno of other failures (ENODEV on /dev/null, EBADF on a read-only fd)', async () => {
    const devNull = openSync('/dev/null', 'r+');
    const path = join(dir, 'ro.bin');
    writeFileSync(path, 'x');
    const readOnly = openSync(path, 'r');
    try {
      await expect(fallocate(devNull, FALLOC.DEFAULT, 0, 4096)).rejects.toMatchObject({ code: 'ENODEV', errno: -19 });
      await expect(fallocate(readOnly, FALLOC.DEFAULT, 0, 4096)).rejects.toMatchObject({ code: 'EBADF' });
    } finally {
      closeSync(devNull);
      closeSync(readOnly);
    }
  });

  it('validates offsets as safe non-negative integers', () => {
    expect(() => fallocate(0, 0, -1, 1)).toThrow(RangeError);
    expect(() => fallocate(0, 0, 2 ** 53, 1)).toThrow(RangeError);
    expect(() => fallocate(0, 0, 0.5, 1)).toThrow(RangeError);
    expect(() => fallocate(0, 0, Number.NaN, 1)).toThrow(RangeError);
  });
});

describe('fadvise', () => {
  it('exports the advice values', () => {
    expect(FADVISE).toMatchObject({ NORMAL: 0, RANDOM: 1, SEQUENTIAL: 2, WILLNEED: 3, DONTNEED: 4, NOREUSE: 5 });
  });

  const hasFincore = requireTool('fincore');
  it.skipIf(!hasFincore)('DONTNEED drops the file from the page cache', async () => {
    const path = join(dir, 'cached.bin');
    writeFileSync(path, Buffer.alloc(4 * MiB, 0x5a));
    const fd = openSync(path, 'r+');
    try {
      const residentBytes = (): number => {
        const out = spawnSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', path], { encoding: 'utf8' });
        return Number(out.stdout.trim());
      };
      fsyncSync(fd);
      readSync(fd, Buffer.alloc(4 * MiB), 0, 4 * MiB, 0);
      expect(residentBytes()).toBeGreaterThan(0);
      await fadvise(fd, 0, 0, FADVISE.DONTNEED);
      expect(residentBytes()).toBe(0);
    } finally {
      closeSync(fd);
    }
  });

  it('rejects with ESPIPE on a pipe', async () => {
    const path = join(dir, 'fifo');
    expect(spawnSync('mkfifo', [path]).status).toBe(0);
    const fd = openSync(path, fsConstants.O_RDWR);
    try {
      await expect(fadvise(fd, 0, 0, FADVISE.DONTNEED)).rejects.toMatchObject({ code: 'ESPIPE', syscall: 'posix_fadvise' });
    } finally {
      closeSync(fd);
    }
  });
});

describe('OFD locks', () => {
  it('conflict between open file descriptions, not within one', () => {
    const path = join(dir, 'locks.bin');
    writeFileSync(path, Buffer.alloc(512));
    const first = openSync(path, 'r+');
    const second = openSync(path, 'r+');
    try {
      ofdSetLock(first, 'read', 100, 1);
      expect(ofdGetLock(first, 'write', 100, 1)).toBeNull();
      expect(ofdGetLock(second, 'write', 100, 1)).toEqual({ type: 'read', start: 100, len: 1, pid: -1 });
      expect(ofdGetLock(second, 'read', 100, 1)).toBeNull();
      expect(() => ofdSetLock(second, 'write', 100, 1)).toThrow(expect.objectContaining({ code: 'EAGAIN' }) as Error);
      ofdSetLock(second, 'read', 100, 1);

      ofdSetLock(first, 'write', 300, 10);
      expect(ofdGetLock(second, 'read', 305, 1)).toEqual({ type: 'write', start: 300, len: 10, pid: -1 });
      expect(ofdGetLock(second, 'read', 310, 1)).toBeNull();

      ofdSetLock(first, 'unlock', 0, 0);
      expect(ofdGetLock(second, 'write', 0, 0)).toBeNull();
      ofdSetLock(second, 'write', 300, 10);
      expect(ofdGetLock(first, 'read', 300, 1)).toMatchObject({ type: 'write' });
    } finally {
      closeSync(first);
      closeSync(second);
    }
  });

  it('are released when the description is closed', () => {
    const path = join(dir, 'locks2.bin');
    writeFileSync(path, Buffer.alloc(512));
    const holder = openSync(path, 'r+');
    const observer = openSync(path, 'r');
    ofdSetLock(holder, 'read', 200, 4);
    expect(ofdGetLock(observer, 'write', 200, 4)).not.toBeNull();
    closeSync(holder);
    expect(ofdGetLock(observer, 'write', 200, 4)).toBeNull();
    closeSync(observer);
  });

  it('validates the lock type', () => {
    expect(() => ofdSetLock(0, 'exclusive' as 'read', 0, 1)).toThrow(RangeError);
    expect(() => ofdGetLock(0, 'unlock' as 'read', 0, 1)).toThrow(RangeError);
  });

  it('fail with EBADF on a closed descriptor', () => {
    const fd = openSync('/dev/null', 'r');
    closeSync(fd);
    expect(() => ofdSetLock(fd, 'read', 0, 1)).toThrow(expect.objectContaining({ code: 'EBADF', syscall: 'fcntl(F_OFD_SETLK)' }) as Error);
  });
});
