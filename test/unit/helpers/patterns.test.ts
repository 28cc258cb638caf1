import { describe, expect, it } from 'vitest';
import { checkPattern, expectPattern, fillPattern, isZero, parseSeed, patternBuffer, patternByte, Prng, seedFromEnv } from '../../helpers/patterns.js';
import { deflateRawSync } from 'node:zlib';

describe('pattern data', () => {
  it('is a pure function of (seed, absolute offset): any split and start give the same bytes', () => {
    const whole = patternBuffer(10_000, 7, 123_456);
    const pieces = Buffer.concat([patternBuffer(1, 7, 123_456), patternBuffer(4094, 7, 123_457), patternBuffer(5905, 7, 127_551)]);
    expect(pieces.equals(whole)).toBe(true);
    for (const i of [0, 1, 2, 3, 4, 4095, 9999]) expect(whole[i]).toBe(patternByte(7, 123_456 + i));
    const unalignedMemory = new Uint8Array(10_001).subarray(1);
    expect(Buffer.from(fillPattern(unalignedMemory, 7, 123_456)).equals(whole)).toBe(true);
  });

  it('differs between seeds, between offsets, and for offsets beyond 4 GiB', () => {
    expect(patternBuffer(4096, 1, 0).equals(patternBuffer(4096, 2, 0))).toBe(false);
    expect(patternBuffer(4096, 1, 0).equals(patternBuffer(4096, 1, 4096))).toBe(false);
    const high = 2 ** 40 + 12;
    expect(patternBuffer(4096, 1, high).equals(patternBuffer(4096, 1, 12))).toBe(false);
    expect(patternBuffer(4096, 1, high).equals(patternBuffer(4096, 1, high))).toBe(true);
    const across16GiB = 2 ** 34 - 10;
    const span = patternBuffer(24, 1, across16GiB);
    span.forEach((byte, i) => expect(byte).toBe(patternByte(1, across16GiB + i)));
  });

  it('random data is incompressible and compressible data shrinks but is never zero', () => {
    const random = patternBuffer(1 << 16, 3, 0);
    const text = patternBuffer(1 << 16, 3, 0, 'compressible');
    expect(deflateRawSync(random).length).toBeGreaterThan(random.length * 0.99);
    expect(deflateRawSync(text).length).toBeLessThan(text.length * 0.4);
    expect(text.every((b) => b >= 0x41 && b <= 0x44)).toBe(true);
    expect(isZero(text)).toBe(false);
  });

  it('checkPattern returns -1 on a match and the absolute offset of the first flipped byte', () => {
    const offset = 5 * 65536 + 3;
    const buf = patternBuffer(3 << 20, 11, offset);
    expect(checkPattern(buf, 11, offset)).toBe(-1);
    buf[2_500_000] ^= 0x01;
    buf[2_600_000] ^= 0x80;
    expect(checkPattern(buf, 11, offset)).toBe(offset + 2_500_000);
    expect(checkPattern(buf, 12, offset)).toBe(offset);
    expect(checkPattern(patternBuffer(100, 11, offset + 4), 11, offset)).toBe(offset);
  });

  it('expectPattern names the offset, the seed and the bytes', () => {
    const buf = patternBuffer(64, 5, 1000, 'compressible');
    expect(() => expectPattern(buf, 5, 1000, 'compressible')).not.toThrow();
    buf[10] = 0;
    expect(() => expectPattern(buf, 5, 1000, 'compressible')).toThrow(/mismatch at offset 1010 .*seed=5 kind=compressible.*got 00/);
  });

  it('fillPattern rejects negative or unsafe offsets', () => {
    expect(() => fillPattern(new Uint8Array(4), 1, -1)).toThrow(RangeError);
    expect(() => fillPattern(new Uint8Array(4), 1, 2 ** 53)).toThrow(RangeError);
  });

  it('isZero sees a single non-zero byte anywhere, at any alignment', () => {
    const buf = Buffer.alloc(1000);
    expect(isZero(buf.subarray(3))).toBe(true);
    for (const i of [3, 7, 8, 500, 999]) {
      buf[i] = 1;
      expect(isZero(buf.subarray(3))).toBe(false);
      buf[i] = 0;
    }
  });
});

describe('Prng', () => {
  it('is deterministic per seed and matches the xoshiro128** reference sequence', () => {
    const a = new Prng(42);
    const b = new Prng(42);
    const seqA = Array.from({ length: 8 }, () => a.u32());
    expect(Array.from({ length: 8 }, () => b.u32())).toEqual(seqA);
    expect(Array.from({ length: 8 }, () => new Prng(43).u32())).not.toEqual(seqA);
    // From the C reference (xoshiro128starstar.c, state from 4 splitmix32 draws of seed 42).
    expect(seqA).toEqual([2837322924, 544945897, 479756282, 3500138142, 339756180, 113173290, 65323186, 1112262688]);
  });

  it('int/range/float stay in bounds and cover them', () => {
    const rng = new Prng(1);
    const seen = new Set<number>();
    for (let i = 0; i < 5000; i++) {
      const v = rng.range(-3, 3);
      expect(v).toBeGreaterThanOrEqual(-3);
      expect(v).toBeLessThanOrEqual(3);
      seen.add(v);
      const f = rng.float();
      expect(f >= 0 && f < 1).toBe(true);
    }
    expect(seen.size).toBe(7);
    expect(() => rng.int(0)).toThrow(RangeError);
    const mean = Array.from({ length: 20_000 }, () => rng.float()).reduce((s, x) => s + x, 0) / 20_000;
    expect(Math.abs(mean - 0.5)).toBeLessThan(0.01);
  });

  it('bytes() fills every byte, including a ragged tail', () => {
    const buf = new Prng(9).bytes(new Uint8Array(4099));
    expect(isZero(buf.subarray(4096))).toBe(false);
    expect(buf).toEqual(new Prng(9).bytes(new Uint8Array(4099)));
  });

  it('parseSeed accepts decimal and hex and rejects junk', () => {
    expect(parseSeed('1234')).toBe(1234);
    expect(parseSeed('0xdeadbeef')).toBe(0xdeadbeef);
    expect(() => parseSeed('-1')).toThrow(RangeError);
    expect(() => parseSeed('seed')).toThrow(RangeError);
    expect(() => parseSeed('0x100000000')).toThrow(RangeError);
  });

  it('seedFromEnv honours the environment variable', () => {
    process.env.QCOW2FUSE_SEED_UNDER_TEST = '0x2a';
    try {
      expect(seedFromEnv('QCOW2FUSE_SEED_UNDER_TEST')).toBe(42);
    } finally {
      delete process.env.QCOW2FUSE_SEED_UNDER_TEST;
    }
    const drawn = seedFromEnv('QCOW2FUSE_SEED_UNDER_TEST');
    expect(Number.isInteger(drawn) && drawn >= 0 && drawn <= 0xffffffff).toBe(true);
  });
});
