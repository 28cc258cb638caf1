/**
 * The Linux AIO engine (src/io/aio.ts over native/addon.c): batches beyond its slots, short reads at
 * end of file, errno errors per request without disturbing the others, on a real O_DIRECT file.
 */
import { closeSync, constants as fsConstants, mkdtempSync, openSync, rmSync } from 'node:fs';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { nativeAio } from '../../../src/io/aio.js';
import { allocAligned } from '../../../src/io/aligned-buffer.js';

let dir: string;
const fds: number[] = [];

function openDirect(name: string, readOnly = false): number {
  const fd = openSync(join(dir, name), (readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR | fsConstants.O_CREAT) | fsConstants.O_DIRECT, 0o644);
  fds.push(fd);
  return fd;
}

beforeAll(() => {
  dir = mkdtempSync('/var/tmp/qcow2fuse-aio-');
});

afterAll(() => {
  for (const fd of fds) closeSync(fd);
  rmSync(dir, { recursive: true, force: true });
});

describe('native AIO engine', () => {
  it('is available on this kernel', () => {
    expect(nativeAio()).not.toBeNull();
  });

  it('carries a queue four times its slots, each request with its own data', async () => {
    const aio = nativeAio()!;
    const fd = openDirect('queue.raw');
    const nbRequests = 1024;
    const bufs = Array.from({ length: nbRequests }, (_, i) => allocAligned(4096).fill(i % 251));
    const written = await Promise.all(bufs.map((b, i) => aio.submit(true, fd, b, i * 4096)));
    expect(written.every((n) => n === 4096)).toBe(true);
    const back = Array.from({ length: nbRequests }, () => allocAligned(4096));
    const read = await Promise.all(back.map((b, i) => aio.submit(false, fd, b, i * 4096)));
    expect(read.every((n) => n === 4096)).toBe(true);
    back.forEach((b, i) => expect(b.every((x) => x === i % 251), `block ${i}`).toBe(true));
  });

  it('returns short reads at the end of file', async () => {
    const aio = nativeAio()!;
    const fd = openDirect('short.raw');
    await aio.submit(true, fd, allocAligned(8192).fill(1), 0);
    expect(await aio.submit(false, fd, allocAligned(16384), 4096)).toBe(4096);
    expect(await aio.submit(false, fd, allocAligned(4096), 1 << 20)).toBe(0);
  });

  it('fails a bad request with its errno and carries on with the others', async () => {
    const aio = nativeAio()!;
    const fd = openDirect('errors.raw');
    const aligned = allocAligned(8192).fill(9);
    const results = await Promise.allSettled([
      aio.submit(true, fd, aligned.subarray(0, 4096), 0),
      aio.submit(true, fd, aligned.subarray(1, 4097), 4096), // memory not aligned for O_DIRECT
      aio.submit(true, fd, aligned.subarray(0, 4096), 8192),
    ]);
    expect(results[0]).toEqual({ status: 'fulfilled', value: 4096 });
    expect(results[2]).toEqual({ status: 'fulfilled', value: 4096 });
    expect(results[1].status).toBe('rejected');
    expect((results[1] as PromiseRejectedResult).reason).toMatchObject({ code: 'EINVAL', errno: -22 });

    const readOnly = openDirect('errors.raw', true);
    await expect(aio.submit(true, readOnly, aligned.subarray(0, 4096), 0)).rejects.toMatchObject({ code: 'EBADF' });
    expect(await aio.submit(false, readOnly, allocAligned(4096), 0)).toBe(4096);
  });
});
