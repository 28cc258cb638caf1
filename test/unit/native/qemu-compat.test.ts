/**
 * The codecs against QEMU itself: `qemu-img convert -c` writes compressed clusters; we find them
 * through the L1/L2 tables (a minimal parser, enough for a fresh single-L2 image), decompress them
 * with ours, and check that our compressor produces the very bytes QEMU stored (both link the same
 * system zlib and libzstd, and we call them as QEMU does).
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { compress, decompress, type CompressionType } from '../../../src/io/native.js';
import { requireTool } from '../../helpers/tools.js';

const CLUSTER_BYTES = 65536;
const CLUSTERS = 6;

/** Compressible cluster contents that differ per cluster. */
function clusterData(index: number): Buffer {
  const out = Buffer.alloc(CLUSTER_BYTES);
  let state = index + 1;
  for (let i = 0; i < CLUSTER_BYTES; i++) {
    state = (state * 1103515245 + 12345) % 2147483648;
    out[i] = 0x41 + (Math.floor(state / 65536) % (3 + index));
  }
  return out;
}

interface CompressedCluster {
  hostOffset: number;
  storedBytes: number;
}

/** Locate guest cluster `index` of a fresh qcow2 image whose clusters are all compressed. */
function findCompressedCluster(image: Buffer, index: number): CompressedCluster {
  const clusterBits = image.readUInt32BE(20);
  const l1Offset = Number(image.readBigUInt64BE(40));
  const l2Offset = Number(image.readBigUInt64BE(l1Offset) & 0x00fffffffffffe00n);
  const entry = image.readBigUInt64BE(l2Offset + 8 * index);
  expect(entry & (1n << 62n)).not.toBe(0n);
  const offsetBits = BigInt(62 - (clusterBits - 8));
  const hostOffset = Number(entry & ((1n << offsetBits) - 1n));
  const sectors = Number((entry >> offsetBits) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
  return { hostOffset, storedBytes: sectors * 512 - (hostOffset % 512) };
}

const hasQemuImg = requireTool('qemu-img');
let dir: string;
let raw: Buffer;

beforeAll(() => {
  dir = mkdtempSync('/var/tmp/qcow2fuse-codec-');
  raw = Buffer.concat(Array.from({ length: CLUSTERS }, (_, index) => clusterData(index)));
  writeFileSync(join(dir, 'src.raw'), raw);
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe.each<CompressionType>(['zlib', 'zstd'])('%s clusters written by qemu-img convert -c', (type) => {
  it.skipIf(!hasQemuImg)('decompress to the source data, and our compressor reproduces them', async () => {
    const imagePath = join(dir, `${type}.qcow2`);
    const convert = spawnSync('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o',
      `compression_type=${type},cluster_size=${CLUSTER_BYTES}`, join(dir, 'src.raw'), imagePath], { encoding: 'utf8' });
    expect(convert.stderr).toBe('');
    expect(convert.status).toBe(0);
    const image = readFileSync(imagePath);
    for (let index = 0; index < CLUSTERS; index++) {
      const cluster = findCompressedCluster(image, index);
      const stored = image.subarray(cluster.hostOffset, cluster.hostOffset + cluster.storedBytes);
      const out = Buffer.alloc(CLUSTER_BYTES);
      await decompress(type, stored, out);
      expect(out.equals(raw.subarray(index * CLUSTER_BYTES, (index + 1) * CLUSTER_BYTES))).toBe(true);

      const ours = await compress(type, out, CLUSTER_BYTES - 1);
      expect(ours).not.toBeNull();
      expect(ours!.length).toBeLessThanOrEqual(cluster.storedBytes);
      expect(ours!.length).toBeGreaterThan(cluster.storedBytes - 512);
      expect(ours!.equals(stored.subarray(0, ours!.length))).toBe(true);
    }
  });
});
