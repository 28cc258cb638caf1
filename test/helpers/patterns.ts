/**
 * Deterministic data for tests.
 *
 * Pattern data: every byte is a pure function of (seed, absolute guest offset, kind), so a buffer
 * written at any offset, in any split, can be verified later from the offset alone, and a byte that
 * landed at the wrong offset is caught. Kinds: 'random' (incompressible) and 'compressible'
 * (4-symbol text, deflates to roughly a third; never all zeros, so no cluster is mistaken for a zero one).
 *
 * Prng: xoshiro128** seeded through splitmix32. `seedFromEnv()` reads TEST_SEED (decimal or 0x-hex)
 * or draws a fresh seed, and prints `TEST_SEED=…` when a test of the current file fails.
 */
import { afterEach, expect, onTestFailed } from 'vitest';

export type PatternKind = 'random' | 'compressible';

/** murmur3's 32-bit finalizer. */
function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** Mix of the high half of a word index (constant across 16 GiB, so hoisted out of loops). */
function hiMix(seed: number, hi: number): number {
  return fmix32(hi + Math.imul(seed, 0x7feb352d) + 0x165667b1);
}

/** The 32-bit pattern word with word index hi * 2^32 + lo, covering 4 absolute bytes. */
function word32(seed: number, lo: number, hiMixed: number, kind: PatternKind): number {
  const h = fmix32(Math.imul(lo ^ seed, 0x9e3779b1) ^ hiMixed);
  // 'compressible': each byte one of 'A'..'D' (2 bits of entropy per byte).
  return kind === 'random' ? h : ((h & 0x03030303) | 0x41414141) >>> 0;
}

function patternWord(seed: number, wordIndex: number, kind: PatternKind): number {
  return word32(seed, wordIndex >>> 0, hiMix(seed, Math.floor(wordIndex / 0x1_0000_0000)), kind);
}

const littleEndian = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/** The pattern byte at an absolute offset. */
export function patternByte(seed: number, offset: number, kind: PatternKind = 'random'): number {
  return (patternWord(seed, Math.floor(offset / 4), kind) >>> ((offset % 4) * 8)) & 0xff;
}

function checkRange(guestOffset: number): void {
  if (!Number.isSafeInteger(guestOffset) || guestOffset < 0) throw new RangeError(`bad pattern offset ${guestOffset}`);
}

/** Fill `buf` with the pattern bytes for absolute offsets [guestOffset, guestOffset + buf.length). */
export function fillPattern(buf: Uint8Array, seed: number, guestOffset: number, kind: PatternKind = 'random'): Uint8Array {
  checkRange(guestOffset);
  let i = 0;
  while (i < buf.length && (guestOffset + i) % 4 !== 0) {
    buf[i] = patternByte(seed, guestOffset + i, kind);
    i++;
  }
  const words = Math.floor((buf.length - i) / 4);
  const first = (guestOffset + i) / 4;
  if (littleEndian && (buf.byteOffset + i) % 4 === 0) {
    const view = new Uint32Array(buf.buffer, buf.byteOffset + i, words);
    const random = kind === 'random';
    for (let k = 0; k < words;) {
      const index = first + k;
      const mixed = hiMix(seed, Math.floor(index / 0x1_0000_0000));
      // Words up to the next 2^32 boundary share the high mix.
      const end = Math.min(words, k + (0x1_0000_0000 - (index >>> 0)));
      for (let lo = index >>> 0; k < end; k++, lo++) {
        let h = Math.imul(lo ^ seed, 0x9e3779b1) ^ mixed;
        h ^= h >>> 16;
        h = Math.imul(h, 0x85ebca6b);
        h ^= h >>> 13;
        h = Math.imul(h, 0xc2b2ae35);
        h ^= h >>> 16;
        view[k] = random ? h : (h & 0x03030303) | 0x41414141;
      }
    }
  } else {
    for (let k = 0; k < words; k++) {
      const w = patternWord(seed, first + k, kind);
      const at = i + 4 * k;
      buf[at] = w & 0xff;
      buf[at + 1] = (w >>> 8) & 0xff;
      buf[at + 2] = (w >>> 16) & 0xff;
      buf[at + 3] = w >>> 24;
    }
  }
  i += 4 * words;
  for (; i < buf.length; i++) buf[i] = patternByte(seed, guestOffset + i, kind);
  return buf;
}

/** A new Buffer of `length` pattern bytes starting at absolute `guestOffset`. */
export function patternBuffer(length: number, seed: number, guestOffset: number, kind: PatternKind = 'random'): Buffer {
  const buf = Buffer.allocUnsafe(length);
  fillPattern(buf, seed, guestOffset, kind);
  return buf;
}

/** Absolute offset of the first byte of `buf` that differs from the pattern, or -1 when all match. */
export function checkPattern(buf: Uint8Array, seed: number, guestOffset: number, kind: PatternKind = 'random'): number {
  checkRange(guestOffset);
  const chunk = new Uint8Array(Math.min(buf.length, 1 << 20));
  for (let start = 0; start < buf.length; start += chunk.length) {
    const n = Math.min(chunk.length, buf.length - start);
    const expected = chunk.subarray(0, n);
    fillPattern(expected, seed, guestOffset + start, kind);
    const actual = buf.subarray(start, start + n);
    if (Buffer.compare(expected, actual) === 0) continue;
    for (let i = 0; i < n; i++) if (actual[i] !== expected[i]) return guestOffset + start + i;
  }
  return -1;
}

/** Throws a descriptive error (offset, expected vs actual, seed) unless `buf` holds the pattern. */
export function expectPattern(buf: Uint8Array, seed: number, guestOffset: number, kind: PatternKind = 'random'): void {
  const bad = checkPattern(buf, seed, guestOffset, kind);
  if (bad < 0) return;
  const i = bad - guestOffset;
  const hex = (b: Uint8Array) => Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex');
  const expected = patternBuffer(Math.min(16, buf.length - i), seed, bad, kind);
  throw new Error(`pattern mismatch at offset ${bad} (0x${bad.toString(16)}; buffer index ${i}) seed=${seed} kind=${kind}: ` +
    `expected ${hex(expected)}, got ${hex(buf.subarray(i, i + expected.length))}`);
}

/** True when every byte of `buf` is zero. */
export function isZero(buf: Uint8Array): boolean {
  let i = 0;
  for (; i < buf.length && (buf.byteOffset + i) % 8 !== 0; i++) if (buf[i] !== 0) return false;
  const words = new BigUint64Array(buf.buffer, buf.byteOffset + i, Math.floor((buf.length - i) / 8));
  for (const w of words) if (w !== 0n) return false;
  for (i += words.length * 8; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

function splitmix32(state: number): () => number {
  let s = state >>> 0;
  return () => {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
    return (z ^ (z >>> 16)) >>> 0;
  };
}

/** xoshiro128**: small, fast, good-quality deterministic PRNG. */
export class Prng {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  constructor(readonly seed: number) {
    const next = splitmix32(seed);
    this.s0 = next();
    this.s1 = next();
    this.s2 = next();
    this.s3 = next();
  }

  /** Uniform 32-bit unsigned integer. */
  u32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5), 7), 9) >>> 0;
    const t = this.s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /** Uniform float in [0, 1) with 53 random bits. */
  float(): number {
    return ((this.u32() >>> 5) * 0x4000000 + (this.u32() >>> 6)) / 0x20000000000000;
  }

  /** Uniform integer in [0, n) for 0 < n <= 2^53. */
  int(n: number): number {
    if (!Number.isSafeInteger(n) || n <= 0) throw new RangeError(`Prng.int: bad bound ${n}`);
    return Math.floor(this.float() * n);
  }

  /** Uniform integer in [min, max] (inclusive). */
  range(min: number, max: number): number {
    return min + this.int(max - min + 1);
  }

  /** True with probability p. */
  chance(p: number): boolean {
    return this.float() < p;
  }

  pick<T>(items: readonly T[]): T {
    if (items.length === 0) throw new RangeError('Prng.pick: empty list');
    return items[this.int(items.length)];
  }

  /** Fill with random bytes. */
  bytes(buf: Uint8Array): Uint8Array {
    for (let i = 0; i < buf.length; i += 4) {
      const w = this.u32();
      for (let k = 0; k < 4 && i + k < buf.length; k++) buf[i + k] = (w >>> (8 * k)) & 0xff;
    }
    return buf;
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}

/** Parse a seed given as decimal or 0x-hex, as a 32-bit unsigned integer. */
export function parseSeed(text: string): number {
  const value = Number(text.trim());
  if (!Number.isSafeInteger(value) || value < 0 || value > 0xffffffff) throw new RangeError(`bad seed '${text}' (want 0..2^32-1, decimal or 0x-hex)`);
  return value;
}

/**
 * The seed for a randomized test: `process.env[name]` when set, otherwise a fresh random one.
 * Called inside a test, a failure of that test prints `name=SEED`; called at file or describe level,
 * a failure of any later test in that scope prints it. Rerun with `name=SEED npx vitest run FILE`.
 */
export function seedFromEnv(name = 'TEST_SEED'): number {
  const given = process.env[name];
  const seed = given !== undefined && given !== '' ? parseSeed(given) : Math.floor(Math.random() * 0x1_0000_0000);
  const report = () => console.error(`\n*** randomized test failed: reproduce with ${name}=${seed} ***\n`);
  if (expect.getState().currentTestName !== undefined) onTestFailed(report);
  else afterEach((context) => { if (context.task.result?.state === 'fail') report(); });
  return seed;
}
