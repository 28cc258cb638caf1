/**
 * native/aligned.c through its typed wrapper (src/io/native.ts): aligned memory, and O_DIRECT with
 * Node's fs on it.
 */
import { closeSync, constants as fsConstants, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { alignedBuffer, bufferAddressAlignment, dioAlignment } from '../../../src/io/native.js';
import { expectCode, makeDirectIoDir, MiB } from './helpers.js';

let dir: string;

beforeAll(() => {
  dir = makeDirectIoDir();
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});


describe('alignedBuffer', () => {
  it('returns zero-filled buffers aligned as requested', () => {
    for (const alignment of [8, 512, 4096, 65536, 2 * MiB]) {
      const buf = alignedBuffer(3 * 4096 + 17, alignment);
      expect(buf.length).toBe(3 * 4096 + 17);
      expect(bufferAddressAlignment(buf)).toBeGreaterThanOrEqual(alignment);
      expect(buf.every((byte) => byte === 0)).toBe(true);
    }
  });

  it('supports zero-length buffers', () => {
    expect(alignedBuffer(0, 4096).length).toBe(0);
  });

  it('rejects bad alignments and sizes', () => {
    expect(() => alignedBuffer(4096, 3000)).toThrow(RangeError);
    expect(() => alignedBuffer(4096, 4)).toThrow(RangeError);
    expect(() => alignedBuffer(-1, 4096)).toThrow(RangeError);
    expect(() => alignedBuffer(1.5, 4096)).toThrow(RangeError);
  });

  it('frees memory when buffers are collected', async () => {
    const before = process.memoryUsage().rss;
    for (let i = 0; i < 3000; i++) {
      const buf = alignedBuffer(MiB, 4096);
      buf[0] = 1;
      if (i % 16 === 0) {
        // Node runs native finalizers from the event loop, so let it turn as real I/O code does.
        await new Promise((resolve) => setImmediate(resolve));
      }
    }
    // 3 GiB allocated in total; the finalizer and external-memory accounting keep RSS bounded.
    expect(process.memoryUsage().rss - before).toBeLessThan(512 * MiB);
  });
});

describe('bufferAddressAlignment', () => {
  it('reports the alignment of views and subarrays', () => {
    const buf = alignedBuffer(8192, 4096);
    expect(bufferAddressAlignment(buf.subarray(4096))).toBeGreaterThanOrEqual(4096);
    expect(bufferAddressAlignment(buf.subarray(512))).toBe(512);
    expect(bufferAddressAlignment(buf.subarray(1))).toBe(1);
    expect(bufferAddressAlignment(new Uint32Array(buf.buffer, buf.byteOffset + 8, 4))).toBe(8);
    expect(bufferAddressAlignment(new DataView(buf.buffer, buf.byteOffset + 2048, 16))).toBe(2048);
  });

  it('rejects non-views', () => {
    expect(() => bufferAddressAlignment('nope' as unknown as Uint8Array)).toThrow(TypeError);
  });
});

describe('O_DIRECT through Node fs', () => {
  it('works with aligned buffers and fails EINVAL with a plain unaligned Buffer', () => {
    const path = join(dir, 'direct.bin');
    const fd = openSync(path, fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_DIRECT, 0o644);
    try {
      const alignment = dioAlignment(fd);
      const out = alignedBuffer(MiB, 4096);
      for (let i = 0; i < out.length; i++) {
        out[i] = (i * 7) % 251;
      }
      expect(writeSync(fd, out, 0, out.length, 0)).toBe(MiB);
      const back = alignedBuffer(MiB, 4096);
      expect(readSync(fd, back, 0, back.length, 0)).toBe(MiB);
      expect(back.equals(out)).toBe(true);

      const plain = Buffer.allocUnsafeSlow(MiB);
      plain.set(out);
      if (bufferAddressAlignment(plain) < alignment.memAlign) {
        let failure: unknown;
        try {
          writeSync(fd, plain, 0, plain.length, 0);
        } catch (error) {
          failure = error;
        }
        expectCode(failure, 'EINVAL');
      } else {
        console.warn(`plain Buffer happened to be ${bufferAddressAlignment(plain)}-aligned; EINVAL case not exercised`);
      }
      if (alignment.offsetAlign > 1) {
        expect(() => writeSync(fd, out, 0, 4096, 1)).toThrow(expect.objectContaining({ code: 'EINVAL' }) as Error);
      }
    } finally {
      closeSync(fd);
    }
  });
});

