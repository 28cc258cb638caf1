/**
 * Shared by the convert-*.test.ts files: a raw disk with every kind of content convert must treat
 * right (data, compressible data, holes, written zeros, scattered 4 KiB blocks, an unaligned end),
 * the CLI's arguments run through the library in-process (parseConvertArgs + convertFiles), and the
 * "no data where the source had none" check on `qemu-img map`.
 */
import { open } from 'node:fs/promises';
import { expect } from 'vitest';
import { convertFiles } from '../../src/convert/convert-files.js';
import { parseConvertArgs } from '../../src/cli/commands/convert.js';
import type { ConvertResult } from '../../src/convert/engine.js';
import type { ConvertFilesOptions } from '../../src/convert/convert-files.js';
import { patternBuffer } from '../helpers/patterns.js';
import { qemuImgMap } from '../helpers/qemu.js';
import { nodeHostAllocationProbe } from '../../src/io/host-allocation.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Guest ranges of the disk that hold no data: holes, and data extents that are all zeros. */
export interface SourceDisk {
  path: string;
  sizeBytes: number;
  /** [start, end) ranges that read as zeros. */
  zeroRanges: [number, number][];
}

/**
 * Write the test disk at `path` (sparse; ~20 MiB, with an end that is not cluster-aligned):
 *   0–1 MiB random · 1–2 MiB hole · 2–4 MiB compressible · 4–5 MiB written zeros · 5–7 MiB hole
 *   with a random 4 KiB block every 256 KiB · 7–12 MiB hole · 12–15 MiB compressible · 15 MiB to
 *   the end (20 MiB + 1536) random at 19 MiB only.
 */
export async function writeSourceDisk(path: string): Promise<SourceDisk> {
  const sizeBytes = 20 * MiB + 1536;
  const handle = await open(path, 'w');
  try {
    await handle.truncate(sizeBytes);
    const put = async (offset: number, data: Buffer): Promise<void> => { await handle.write(data, 0, data.length, offset); };
    await put(0, patternBuffer(MiB, 1, 0));
    await put(2 * MiB, patternBuffer(2 * MiB, 2, 2 * MiB, 'compressible'));
    await put(4 * MiB, Buffer.alloc(MiB));
    for (let o = 5 * MiB; o < 7 * MiB; o += 256 * KiB) await put(o, patternBuffer(4 * KiB, 3, o));
    await put(12 * MiB, patternBuffer(3 * MiB, 4, 12 * MiB, 'compressible'));
    await put(19 * MiB, patternBuffer(MiB, 5, 19 * MiB));
  } finally {
    await handle.close();
  }
  const zeroRanges: [number, number][] = [[MiB, 2 * MiB], [4 * MiB, 5 * MiB], [7 * MiB, 12 * MiB], [15 * MiB, 19 * MiB], [20 * MiB, sizeBytes]];
  for (let o = 5 * MiB; o < 7 * MiB; o += 256 * KiB) zeroRanges.push([o + 64 * KiB, o + 256 * KiB]);
  return { path, sizeBytes, zeroRanges };
}

/** Run `qcow2fuse convert ARGS…` in-process (the CLI's parser, the library's engine). */
export async function convertCli(argv: string[], extra: ConvertFilesOptions = {}): Promise<ConvertResult> {
  const args = parseConvertArgs(argv);
  return convertFiles(args.source, args.dest, { ...args.options, ...extra });
}

/** Assert that `qemu-img map` of `image` shows no data in the clusters wholly inside one of `zeroRanges`. */
export async function expectNoDataIn(image: string, zeroRanges: [number, number][], clusterBytes: number): Promise<void> {
  const map = await qemuImgMap(image);
  for (const entry of map.filter((e) => e.data)) {
    for (const [zeroStart, zeroEnd] of zeroRanges) {
      const start = Math.ceil(zeroStart / clusterBytes) * clusterBytes;
      const end = Math.floor(zeroEnd / clusterBytes) * clusterBytes;
      const overlap = Math.min(end, entry.start + entry.length) - Math.max(start, entry.start);
      expect(overlap, `data at ${entry.start}+${entry.length} overlaps the zero range ${start}–${end}`).toBeLessThanOrEqual(0);
    }
  }
}

/** Bytes of `path` in data extents (SEEK_DATA/SEEK_HOLE): how sparse a raw file is, without the filesystem's own metadata blocks. */
export async function dataExtentBytes(path: string): Promise<number> {
  const probe = nodeHostAllocationProbe();
  try {
    const size = await probe.sizeBytes(path);
    let total = 0;
    for (let pos = 0; pos < size;) {
      const extent = await probe.extentAt(path, pos);
      if (extent.kind === 'trailing-hole') break;
      const end = extent.kind === 'unknown' ? size : extent.endBytes;
      if (extent.kind !== 'hole') total += end - pos;
      pos = end;
    }
    return total;
  } finally {
    probe.close();
  }
}
