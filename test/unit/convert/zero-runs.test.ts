import { describe, expect, it } from 'vitest';
import { classifyWindow } from '../../../src/convert/zero-runs.js';

const K = 1024;

/** A window of `granules` granules of `granuleBytes`, non-zero where `dataAt` says. */
function window(granuleBytes: number, pattern: string): Buffer {
  const buf = Buffer.alloc(granuleBytes * pattern.length);
  [...pattern].forEach((c, i) => { if (c === 'D') buf.fill(7, i * granuleBytes, (i + 1) * granuleBytes); else if (c === 'd') buf[i * granuleBytes + 5] = 1; });
  return buf;
}

describe('classifyWindow (qemu-img convert -S)', () => {
  it('skips zero granules on a zero-initialized destination, writes zeroes on an existing one (-n)', () => {
    const data = window(4 * K, 'D..d.');
    expect(classifyWindow(data, 0, { granuleBytes: 4 * K, minSparseBytes: 4 * K, zeroInitialized: true })).toEqual([
      { kind: 'data', start: 0, end: 4 * K }, { kind: 'skip', start: 4 * K, end: 12 * K }, { kind: 'data', start: 12 * K, end: 16 * K },
      { kind: 'skip', start: 16 * K, end: 20 * K },
    ]);
    expect(classifyWindow(data, 0, { granuleBytes: 4 * K, minSparseBytes: 4 * K, zeroInitialized: false }).map((r) => r.kind)).toEqual(['data', 'zero', 'data', 'zero']);
  });

  it('-S 0 writes everything; -S larger than a granule writes short zero gaps between data', () => {
    const data = window(4 * K, 'D.D..D');
    expect(classifyWindow(data, 0, { granuleBytes: 4 * K, minSparseBytes: 0, zeroInitialized: true })).toEqual([{ kind: 'data', start: 0, end: 24 * K }]);
    expect(classifyWindow(data, 0, { granuleBytes: 4 * K, minSparseBytes: 8 * K, zeroInitialized: true })).toEqual([
      { kind: 'data', start: 0, end: 12 * K }, { kind: 'skip', start: 12 * K, end: 20 * K }, { kind: 'data', start: 20 * K, end: 24 * K },
    ]);
  });

  it('cuts granules at multiples of the granule in guest offsets (a window starting mid-granule)', () => {
    const data = Buffer.alloc(8 * K);
    data[5 * K] = 1;
    // Window at guest 2 KiB: granules [2K,4K) [4K,8K) [8K,10K) → relative [0,2K) [2K,6K) [6K,8K).
    expect(classifyWindow(data, 2 * K, { granuleBytes: 4 * K, minSparseBytes: 4 * K, zeroInitialized: true })).toEqual([
      { kind: 'skip', start: 0, end: 2 * K }, { kind: 'data', start: 2 * K, end: 6 * K }, { kind: 'skip', start: 6 * K, end: 8 * K },
    ]);
  });

  it('-B: granules equal to the backing file are skipped, zeros over backing data are written as zeroes', () => {
    const backing = window(4 * K, 'DD.D');
    const data = window(4 * K, 'Dd..');
    expect(classifyWindow(data, 0, { granuleBytes: 4 * K, minSparseBytes: 4 * K, zeroInitialized: true, backing }).map((r) => r.kind))
      .toEqual(['skip', 'data', 'skip', 'zero']);
  });
});
