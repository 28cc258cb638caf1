/**
 * native/aio.c through its typed wrapper (src/io/native.ts): Linux AIO completions delivered on the
 * event loop, with byte counts and -errno results per slot.
 */
import { closeSync, constants as fsConstants, openSync, rmSync } from 'node:fs';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { aioCreate, aioSubmit, alignedBuffer } from '../../../src/io/native.js';
import { makeDirectIoDir } from './helpers.js';

let dir: string;

beforeAll(() => {
  dir = makeDirectIoDir();
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** A context of `capacity` slots whose completions resolve per-slot promises. */
function context(capacity: number) {
  const slots = new Int32Array(capacity);
  const results = new Float64Array(capacity);
  const waiting = new Map<number, (result: number) => void>();
  const handle = aioCreate(capacity, slots, results, (count) => {
    for (let i = 0; i < count; i++) waiting.get(slots[i])?.(results[i]);
  });
  const submit = (slot: number, write: boolean, fd: number, view: Uint8Array, offset: number) =>
    new Promise<number>((resolve) => {
      waiting.set(slot, resolve);
      aioSubmit(handle, slot, write, fd, view, offset);
    });
  return { submit };
}

describe('aio', () => {
  it('writes and reads back many queued O_DIRECT requests', async () => {
    const fd = openSync(join(dir, 'aio.bin'), fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_DIRECT, 0o644);
    try {
      const aio = context(32);
      const writes = Array.from({ length: 32 }, (_, i) => {
        const buf = alignedBuffer(4096, 4096).fill(i + 1);
        return aio.submit(i, true, fd, buf, i * 4096);
      });
      expect(await Promise.all(writes)).toEqual(Array(32).fill(4096));
      const bufs = Array.from({ length: 32 }, () => alignedBuffer(4096, 4096));
      expect(await Promise.all(bufs.map((buf, i) => aio.submit(i, false, fd, buf, i * 4096)))).toEqual(Array(32).fill(4096));
      bufs.forEach((buf, i) => expect(buf.every((b) => b === i + 1)).toBe(true));
    } finally {
      closeSync(fd);
    }
  });

  it('completes an unaligned request with -EINVAL instead of throwing', async () => {
    const fd = openSync(join(dir, 'aio-bad.bin'), fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_DIRECT, 0o644);
    try {
      const aio = context(1);
      const buf = alignedBuffer(4096 + 1, 4096).subarray(1);
      expect(await aio.submit(0, true, fd, buf, 0)).toBe(-22);
    } finally {
      closeSync(fd);
    }
  });

  it('rejects a slot outside the context', () => {
    const slots = new Int32Array(2);
    const handle = aioCreate(2, slots, new Float64Array(2), () => undefined);
    expect(() => aioSubmit(handle, 5, false, 0, alignedBuffer(4096, 4096), 0)).toThrow(RangeError);
  });
});
