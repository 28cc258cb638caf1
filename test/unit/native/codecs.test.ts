/**
 * QEMU-compatible compression codecs of the native addon: round trips, "does not fit", QEMU's
 * decompression rules (trailing input ignored, dst must be filled), interoperability with Node's
 * zlib (raw deflate, 12-bit window) and the zstd CLI, and fuzzing with garbage input.
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { deflateRawSync, inflateRawSync } from 'node:zlib';

import { describe, expect, it } from 'vitest';

import { compress, decompress, decompressBatch, type CompressionType } from '../../../src/io/native.js';
import { requireTool } from '../../helpers/tools.js';

const CODECS: CompressionType[] = ['zlib', 'zstd'];

/** Deterministic, compressible data: text-like records with a counter. */
function compressible(bytes: number, seed = 1): Buffer {
  const out = Buffer.alloc(bytes);
  let state = seed;
  for (let i = 0; i < bytes; i++) {
    state = (state * 1103515245 + 12345) % 2147483648;
    out[i] = 0x61 + (Math.floor(state / 65536) % 4) + (i % 64 === 0 ? 10 : 0);
  }
  return out;
}

/** Deterministic PRNG for the fuzz loops. */
function rng(seed: number): () => number {
  let state = seed;
  return () => {
    state = (state * 1103515245 + 12345) % 2147483648;
    return state / 2147483648;
  };
}

async function expectBadCompressed(promise: Promise<void>): Promise<void> {
  await expect(promise).rejects.toMatchObject({ code: 'EBADCOMPRESSED' });
}

describe.each(CODECS)('%s', (type) => {
  it('round-trips cluster-sized data of several sizes', async () => {
    for (const bytes of [512, 4096, 65536, 2 * 1024 * 1024]) {
      const src = compressible(bytes, bytes);
      const packed = await compress(type, src, bytes - 1);
      expect(packed).not.toBeNull();
      expect(packed!.length).toBeLessThan(bytes / 2);
      const out = Buffer.alloc(bytes);
      await decompress(type, packed!, out);
      expect(out.equals(src)).toBe(true);
    }
  });

  it('resolves null when the result does not fit', async () => {
    const random = randomBytes(65536);
    expect(await compress(type, random, 65535)).toBeNull();
    const src = compressible(65536);
    const packed = await compress(type, src, 65535);
    expect(packed).not.toBeNull();
    const exactBytes = packed!.length;
    expect(await compress(type, src, exactBytes - 1)).toBeNull();
    expect(await compress(type, src, 0)).toBeNull();
    // zlib may need the room for one more deflate call to report the end, exactly like QEMU's
    // single deflate(Z_FINISH): an exact fit is either the same stream or "does not fit".
    const exact = await compress(type, src, exactBytes);
    expect(exact === null || exact.equals(packed!)).toBe(true);
    expect((await compress(type, src, exactBytes + 64))?.equals(packed!)).toBe(true);
  });

  it('is deterministic across threadpool threads and concurrent jobs', async () => {
    const src = compressible(65536, 7);
    const results = await Promise.all(Array.from({ length: 32 }, () => compress(type, src, 65535)));
    for (const packed of results) {
      expect(packed?.equals(results[0]!)).toBe(true);
    }
    const outs = await Promise.all(results.map(async (packed) => {
      const out = Buffer.alloc(65536);
      await decompress(type, packed!, out);
      return out;
    }));
    for (const out of outs) {
      expect(out.equals(src)).toBe(true);
    }
  });

  it('ignores bytes after the stream (qcow2 stores sector-rounded lengths)', async () => {
    const src = compressible(65536, 3);
    const packed = (await compress(type, src, 65535))!;
    const out = Buffer.alloc(65536);
    await decompress(type, Buffer.concat([packed, randomBytes(511)]), out);
    expect(out.equals(src)).toBe(true);
  });

  it('rejects truncated streams and streams that end before dst is full', async () => {
    const src = compressible(65536, 4);
    const packed = (await compress(type, src, 65535))!;
    await expectBadCompressed(decompress(type, packed.subarray(0, packed.length - 8), Buffer.alloc(65536)));
    await expectBadCompressed(decompress(type, packed, Buffer.alloc(65536 + 1)));
    await expectBadCompressed(decompress(type, Buffer.alloc(0), Buffer.alloc(16)));
  });

  it('survives random garbage and corrupted streams without crashing', async () => {
    const next = rng(type === 'zlib' ? 11 : 13);
    const valid = (await compress(type, compressible(8192, 5), 8191))!;
    let rejected = 0;
    for (let i = 0; i < 3000; i++) {
      let src: Buffer;
      if (i % 2 === 0) {
        src = randomBytes(Math.floor(next() * 4096));
      } else {
        src = Buffer.from(valid);
        for (let flips = 1 + Math.floor(next() * 4); flips > 0; flips--) {
          const at = Math.floor(next() * src.length);
          src[at] = src[at] ^ (1 + Math.floor(next() * 255));
        }
      }
      const dst = Buffer.alloc(i % 2 === 0 ? 1 + Math.floor(next() * 65536) : 8192);
      try {
        await decompress(type, src, dst);
      } catch (error) {
        expect((error as { code?: unknown }).code).toBe('EBADCOMPRESSED');
        rejected += 1;
      }
    }
    expect(rejected).toBeGreaterThan(1000);
  });

  it('validates its arguments', () => {
    expect(() => compress('lz4' as CompressionType, Buffer.alloc(1), 10)).toThrow(RangeError);
    expect(() => compress(type, 'text' as unknown as Buffer, 10)).toThrow(TypeError);
    expect(() => compress(type, Buffer.alloc(1), -1)).toThrow(RangeError);
    expect(() => decompress(type, Buffer.alloc(1), 5 as unknown as Buffer)).toThrow(TypeError);
  });
});

describe.each(CODECS)('%s batches (decompressBatch: several chunks in one job)', (type) => {
  /** Chunks packed back to back with sector padding (as qcow2 stores them) and their spans into a dst of clusters. */
  async function packed(clusters: Buffer[]): Promise<{ src: Buffer; spans: Uint32Array }> {
    const parts: Buffer[] = [];
    const spans = new Uint32Array(4 * clusters.length);
    let srcOffset = 0;
    let dstOffset = 0;
    for (const [i, cluster] of clusters.entries()) {
      const chunk = (await compress(type, cluster, cluster.length - 1))!;
      const padded = Buffer.concat([chunk, Buffer.alloc((512 - (chunk.length % 512)) % 512, 0xee)]);
      spans.set([srcOffset, padded.length, dstOffset, cluster.length], 4 * i);
      parts.push(padded);
      srcOffset += padded.length;
      dstOffset += cluster.length;
    }
    return { src: Buffer.concat(parts), spans };
  }

  it('decodes every chunk of a run into its place in dst', async () => {
    const clusters = [0, 1, 2, 3, 4].map((i) => compressible(i === 2 ? 4096 : 65536, 40 + i));
    const { src, spans } = await packed(clusters);
    const dst = Buffer.alloc(clusters.reduce((n, c) => n + c.length, 0), 0x55);
    expect(await decompressBatch(type, src, dst, spans)).toBeNull();
    expect(dst.equals(Buffer.concat(clusters))).toBe(true);
  });

  it('reports which chunks are bad data and still decodes the others', async () => {
    const clusters = [0, 1, 2].map((i) => compressible(65536, 50 + i));
    const { src, spans } = await packed(clusters);
    src.fill(0xa5, spans[4], spans[4] + spans[5]); // chunk 1 is garbage
    const dst = Buffer.alloc(3 * 65536);
    const statuses = await decompressBatch(type, src, dst, spans);
    expect(statuses && [...statuses].map((s) => s !== 0)).toEqual([false, true, false]);
    expect(dst.subarray(0, 65536).equals(clusters[0])).toBe(true);
    expect(dst.subarray(131072).equals(clusters[2])).toBe(true);
  });

  it('refuses spans outside their buffers and malformed span arrays', () => {
    const src = Buffer.alloc(1024);
    const dst = Buffer.alloc(4096);
    expect(() => decompressBatch(type, src, dst, Uint32Array.from([0, 1025, 0, 4096]))).toThrow(RangeError);
    expect(() => decompressBatch(type, src, dst, Uint32Array.from([0, 1024, 1, 4096]))).toThrow(RangeError);
    expect(() => decompressBatch(type, src, dst, Uint32Array.from([0, 1024, 0]))).toThrow(TypeError);
  });
});

describe('zlib compatibility (QEMU: raw deflate, window bits 12)', () => {
  it('decodes raw deflate streams from Node zlib with a 12-bit window', async () => {
    const src = compressible(65536, 9);
    const packed = deflateRawSync(src, { windowBits: 12, memLevel: 9 });
    const out = Buffer.alloc(65536);
    await decompress('zlib', packed, out);
    expect(out.equals(src)).toBe(true);
  });

  it('produces raw deflate that Node zlib inflates with a 12-bit window', async () => {
    const src = compressible(65536, 10);
    const packed = (await compress('zlib', src, 65535))!;
    expect(inflateRawSync(packed, { windowBits: 12 }).equals(src)).toBe(true);
  });

  it('accepts far distances within the output, as QEMU\'s single inflate(Z_FINISH) call does', async () => {
    // One inflate call with the whole cluster as output buffer uses that output as history, so a
    // 16 KiB match distance decodes even with a 4 KiB window; QEMU reads such streams too.
    const block = randomBytes(16384);
    const src = Buffer.concat([block, block]);
    const packed = deflateRawSync(src, { windowBits: 15 });
    expect(packed.length).toBeLessThan(src.length * 0.75);
    const out = Buffer.alloc(src.length);
    await decompress('zlib', packed, out);
    expect(out.equals(src)).toBe(true);
  });

  it('fills dst from a longer stream (QEMU accepts Z_BUF_ERROR with dst full)', async () => {
    const src = compressible(65536, 12);
    const packed = (await compress('zlib', src, 65535))!;
    const out = Buffer.alloc(4096);
    await decompress('zlib', packed, out);
    expect(out.equals(src.subarray(0, 4096))).toBe(true);
  });
});

describe('zstd compatibility (QEMU: one ZSTD_e_end stream, decoded until dst is full)', () => {
  it('emits a standard zstd frame with the content size', async () => {
    const src = compressible(65536, 14);
    const packed = (await compress('zstd', src, 65535))!;
    expect(packed.readUInt32LE(0)).toBe(0xfd2fb528);
  });

  it('rejects a frame that is larger than dst, as QEMU does', async () => {
    const src = compressible(65536, 15);
    const packed = (await compress('zstd', src, 65535))!;
    await expectBadCompressed(decompress('zstd', packed, Buffer.alloc(4096)));
  });

  it('refuses frames asking for a huge window instead of allocating it', async () => {
    // Magic, frame header descriptor 0 (no single segment, no content size), window descriptor 0xf8
    // (2^41 bytes), then a raw last block of 4 bytes.
    const hostile = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xf8, 0x21, 0x00, 0x00, 1, 2, 3, 4]);
    await expectBadCompressed(decompress('zstd', hostile, Buffer.alloc(4)));
  });

  const hasZstd = requireTool('zstd');
  it.skipIf(!hasZstd)('interoperates with the zstd command-line tool both ways', async () => {
    const src = compressible(65536, 16);
    const packed = (await compress('zstd', src, 65535))!;
    const decoded = spawnSync('zstd', ['-d', '-c', '-q'], { input: packed, maxBuffer: 1 << 24 });
    expect(decoded.status).toBe(0);
    expect(decoded.stdout.equals(src)).toBe(true);

    const fromCli = spawnSync('zstd', ['-c', '-q', '-19'], { input: src, maxBuffer: 1 << 24 });
    expect(fromCli.status).toBe(0);
    const out = Buffer.alloc(65536);
    await decompress('zstd', fromCli.stdout, out);
    expect(out.equals(src)).toBe(true);
  });
});
