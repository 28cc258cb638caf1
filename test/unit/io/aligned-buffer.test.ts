import { describe, expect, it } from 'vitest';

import {
  alignDown, alignUp, AlignedBufferPool, allocAligned, isAddressAligned, isAligned, isDirectIoReady,
} from '../../../src/io/aligned-buffer.js';

describe('alignment arithmetic', () => {
  it('works beyond 32 bits without bitwise truncation', () => {
    const big = 2 ** 40 + 4096 * 3 + 17;
    expect(alignDown(big, 4096)).toBe(2 ** 40 + 4096 * 3);
    expect(alignUp(big, 4096)).toBe(2 ** 40 + 4096 * 4);
    expect(alignUp(2 ** 40, 4096)).toBe(2 ** 40);
    expect(isAligned(2 ** 52, 512)).toBe(true);
    expect(isAligned(2 ** 52 + 1, 512)).toBe(false);
    expect(alignDown(0, 512)).toBe(0);
    expect(alignUp(1, 512)).toBe(512);
  });
});

describe('allocAligned / isAddressAligned / isDirectIoReady', () => {
  it('allocates page-aligned zeroed memory by default', () => {
    const buf = allocAligned(10000);
    expect(buf.length).toBe(10000);
    expect(isAddressAligned(buf, 4096)).toBe(true);
    expect(buf.every((b) => b === 0)).toBe(true);
    expect(isAddressAligned(buf.subarray(100), 512)).toBe(false);
  });

  it('requires memory, offset and length alignment for direct I/O', () => {
    const buf = allocAligned(8192, 4096);
    expect(isDirectIoReady(buf, 4096, 512, 512)).toBe(true);
    expect(isDirectIoReady(buf.subarray(0, 1000), 4096, 512, 512)).toBe(false);
    expect(isDirectIoReady(buf, 100, 512, 512)).toBe(false);
    expect(isDirectIoReady(buf.subarray(512), 0, 512, 512)).toBe(true);
    expect(isDirectIoReady(buf.subarray(512), 0, 4096, 512)).toBe(false);
  });
});

describe('AlignedBufferPool', () => {
  it('hands out aligned buffers of power-of-two classes and reuses released ones zeroed', () => {
    const pool = new AlignedBufferPool(4096, 1024 * 1024, 2);
    const first = pool.acquire(5000);
    expect(first.length).toBe(8192);
    expect(isAddressAligned(first, 4096)).toBe(true);
    first.fill(0xee);
    pool.release(first);
    const again = pool.acquire(8000);
    expect(again).toBe(first);
    expect(again.every((b) => b === 0)).toBe(true);
    expect(pool.acquire(1).length).toBe(4096);
  });

  it('keeps at most maxPerClass buffers and never pools oversized ones', () => {
    const pool = new AlignedBufferPool(4096, 64 * 1024, 1);
    const a = pool.acquire(4096);
    const b = pool.acquire(4096);
    pool.release(a);
    pool.release(b);
    expect(pool.acquire(4096)).toBe(a);
    expect(pool.acquire(4096)).not.toBe(b);

    const huge = pool.acquire(100 * 1024);
    expect(huge.length).toBe(128 * 1024);
    pool.release(huge);
    expect(pool.acquire(100 * 1024)).not.toBe(huge);
  });

  it('ignores buffers that are not its own shape', () => {
    const pool = new AlignedBufferPool(4096);
    const odd = Buffer.alloc(5000);
    pool.release(odd);
    expect(pool.acquire(5000)).not.toBe(odd);
  });
});
