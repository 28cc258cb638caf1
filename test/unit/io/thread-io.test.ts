/**
 * Our I/O thread pool (src/io/thread-io.ts over native/threadio.c): queues beyond its slots, short
 * reads at end of file, errno errors per request, page-cache reads answered inline and misses
 * (EAGAIN) sent to the pool, and a buffered NodeHostFile closed with requests in flight.
 */
import { closeSync, fsyncSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { openNodeHostFile } from '../../../src/io/node-host-file.js';
import { FADVISE, fadvise, preadNowait, threadIoCreate, threadIoSubmit } from '../../../src/io/native.js';
import { threadIo, threadIoStats } from '../../../src/io/thread-io.js';
import { patternBuffer } from '../../helpers/patterns.js';
import { tempBase } from '../../helpers/tmp.js';

const KiB = 1024;
const EAGAIN = 11;
let dir: string;
const fds: number[] = [];

function openRw(name: string): number {
  const fd = openSync(join(dir, name), 'w+');
  fds.push(fd);
  return fd;
}

/** Write `data` to a new file and drop it from the page cache; returns an fd open for reading. */
async function coldFile(name: string, data: Buffer): Promise<number> {
  writeFileSync(join(dir, name), data);
  const fd = openSync(join(dir, name), 'r');
  fds.push(fd);
  fsyncSync(fd);
  await fadvise(fd, 0, 0, FADVISE.DONTNEED);
  return fd;
}

beforeAll(() => {
  dir = mkdtempSync(join(tempBase(), 'qcow2fuse-threadio-'));
});

afterAll(() => {
  for (const fd of fds) closeSync(fd);
  rmSync(dir, { recursive: true, force: true });
});

describe('I/O thread pool', () => {
  it('starts on this machine', () => {
    expect(threadIo()).not.toBeNull();
  });

  it('carries a queue four times its slots, each request with its own data', async () => {
    const pool = threadIo()!;
    const fd = openRw('queue.raw');
    const nbRequests = 4 * pool.nbSlots;
    const bufs = Array.from({ length: nbRequests }, (_, i) => patternBuffer(4 * KiB, i, 0));
    const written = await Promise.all(bufs.map((b, i) => pool.submit(true, fd, b, i * 4 * KiB)));
    expect(written.every((n) => n === 4 * KiB)).toBe(true);
    const back = Array.from({ length: nbRequests }, () => Buffer.alloc(4 * KiB));
    const read = await Promise.all(back.map((b, i) => pool.submit(false, fd, b, i * 4 * KiB)));
    expect(read.every((n) => n === 4 * KiB)).toBe(true);
    back.forEach((b, i) => expect(b.equals(bufs[i]), `block ${i}`).toBe(true));
  });

  it('returns short reads at the end of file', async () => {
    const pool = threadIo()!;
    const fd = openRw('short.raw');
    await pool.submit(true, fd, Buffer.alloc(8 * KiB, 1), 0);
    const out = Buffer.alloc(16 * KiB, 0xee);
    expect(await pool.submit(false, fd, out, 4 * KiB)).toBe(4 * KiB);
    expect(out.subarray(0, 4 * KiB).every((b) => b === 1)).toBe(true);
    expect(out.subarray(4 * KiB).every((b) => b === 0xee)).toBe(true);
    expect(await pool.submit(false, fd, Buffer.alloc(4 * KiB), 1 << 20)).toBe(0);
    expect(await pool.read(fd, Buffer.alloc(4 * KiB), 1 << 20)).toBe(0);
  });

  it('fails a bad request with its errno and carries on with the others', async () => {
    const pool = threadIo()!;
    const fd = openRw('errors.raw');
    writeFileSync(join(dir, 'ro.raw'), Buffer.alloc(4 * KiB, 3));
    const readOnly = openSync(join(dir, 'ro.raw'), 'r');
    fds.push(readOnly);
    // The good read follows the write (the pool runs requests in parallel, in no set order).
    expect(await pool.submit(true, fd, Buffer.alloc(4 * KiB, 9), 0)).toBe(4 * KiB);
    const back = Buffer.alloc(4 * KiB);
    const results = await Promise.allSettled([
      pool.submit(true, readOnly, Buffer.alloc(4 * KiB, 9), 0),
      pool.submit(false, fd, back, 0),
      pool.submit(false, 1 << 20, Buffer.alloc(4 * KiB), 0),
    ]);
    expect((results[0] as PromiseRejectedResult).reason).toMatchObject({ code: 'EBADF', errno: -9 });
    expect(results[1]).toEqual({ status: 'fulfilled', value: 4 * KiB });
    expect(back.every((b) => b === 9)).toBe(true);
    expect((results[2] as PromiseRejectedResult).reason).toMatchObject({ code: 'EBADF' });
  });

  it('answers page-cache hits inline and sends misses (EAGAIN) to the pool', async () => {
    const pool = threadIo()!;
    const data = patternBuffer(256 * KiB, 7, 0);
    const probe = await coldFile('probe.raw', data);
    expect(preadNowait(probe, Buffer.alloc(4 * KiB), 128 * KiB)).toBe(-EAGAIN);
    const fd = await coldFile('cold.raw', data);
    let before = threadIoStats();
    const first = Buffer.alloc(64 * KiB);
    expect(await pool.read(fd, first, 128 * KiB)).toBe(64 * KiB);
    expect(first.equals(data.subarray(128 * KiB, 192 * KiB))).toBe(true);
    expect(threadIoStats().submitted - before.submitted).toBe(1);
    expect(threadIoStats().inlineReads - before.inlineReads).toBe(0);
    before = threadIoStats();
    const again = Buffer.alloc(64 * KiB);
    expect(await pool.read(fd, again, 128 * KiB)).toBe(64 * KiB);
    expect(again.equals(first)).toBe(true);
    expect(threadIoStats().submitted - before.submitted).toBe(0);
    expect(threadIoStats().inlineReads - before.inlineReads).toBe(1);
  });

  it('rejects a slot outside the pool and bad arguments', () => {
    const handle = threadIoCreate(1, 2, new Int32Array(2), new Float64Array(2), () => undefined);
    expect(() => threadIoSubmit(handle, 5, false, 0, Buffer.alloc(16), 0)).toThrow(RangeError);
    expect(() => threadIoCreate(0, 2, new Int32Array(2), new Float64Array(2), () => undefined)).toThrow(RangeError);
    expect(() => threadIoCreate(1, 8, new Int32Array(2), new Float64Array(8), () => undefined)).toThrow();
  });
});

describe('buffered NodeHostFile on the thread pool', () => {
  it('goes through the pool, and close waits for the requests in flight', async () => {
    const path = join(dir, 'close.raw');
    const file = await openNodeHostFile(path, { readOnly: false, create: true, lock: false });
    const before = threadIoStats().submitted;
    const settled: number[] = [];
    const writes = Array.from({ length: 64 }, (_, i) =>
      file.pwrite(patternBuffer(64 * KiB, i, 0), i * 64 * KiB).then(() => { settled.push(i); }));
    const closing = file.close().then(() => settled.length);
    expect(await closing).toBe(64);
    await Promise.all(writes);
    expect(threadIoStats().submitted - before).toBeGreaterThanOrEqual(64);
    const reopened = await openNodeHostFile(path, { readOnly: true, lock: false });
    try {
      for (let i = 0; i < 64; i++) {
        const back = Buffer.alloc(64 * KiB);
        expect(await reopened.pread(back, i * 64 * KiB)).toBe(64 * KiB);
        expect(back.equals(patternBuffer(64 * KiB, i, 0)), `block ${i}`).toBe(true);
      }
    } finally {
      await reopened.close();
    }
  });
});
