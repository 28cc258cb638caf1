/**
 * Uncompressed writes leave out whole clusters of zeros that already read as zero (write.ts
 * writeSkippingZeros): unallocated clusters without a backing file and zero clusters stay as they
 * are; partial clusters, allocated clusters, clusters a backing file shows through and clusters
 * another write has in flight are written. Every case is checked against a raw file given the same
 * writes (qemu-img compare), with qemu-img map and a clean qemu-img check.
 */
import { open as openRaw } from 'node:fs/promises';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { ForwardingHostFile, type HostFileOpener, type WritePoint } from '../../../../src/io/host-file.js';
import { openNodeHostFile } from '../../../../src/io/node-host-file.js';
import type { Qcow2Image } from '../../../../src/qcow2/engine/image.js';
import { openImage } from '../../../../src/node.js';
import { patternBuffer } from '../../../helpers/patterns.js';
import { qemuImgCheckClean, qemuImgCompare, qemuImgCreate, qemuImgMap, qemuIoOk, type QemuMapEntry } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTool } from '../../../helpers/tools.js';

const hasQemu = requireTool('qemu-img');
const KiB = 1024;
const MiB = 1024 * KiB;
const CLUSTER = 64 * KiB;

/** Apply the same writes to the image and to a raw reference file of the same size. */
async function writeBoth(image: Qcow2Image, rawPath: string, writes: [number, Buffer][]): Promise<void> {
  const raw = await openRaw(rawPath, 'r+');
  try {
    for (const [offset, data] of writes) {
      await image.write(offset, data);
      await raw.write(data, 0, data.length, offset);
    }
  } finally {
    await raw.close();
  }
}

/** The map entry covering guest byte `offset`. */
function at(map: QemuMapEntry[], offset: number): QemuMapEntry {
  const entry = map.find((e) => e.start <= offset && offset < e.start + e.length);
  if (!entry) throw new Error(`no map entry at ${offset}`);
  return entry;
}

/** A raw reference file of `bytes` zeros. */
async function reference(dir: string, bytes: number): Promise<string> {
  const path = join(dir, 'ref.raw');
  const raw = await openRaw(path, 'w');
  await raw.truncate(bytes);
  await raw.close();
  return path;
}

describe.skipIf(!hasQemu)('writes of zero clusters that already read as zero', () => {
  const tmp = useTempDir('zero-skip');

  it('leaves unallocated and zero clusters alone, writes partial and allocated ones', async () => {
    const path = join(tmp.path, 'a.qcow2');
    await qemuImgCreate(path, 16 * MiB);
    await qemuIoOk(path, ['write -P 0x11 2M 128k', 'write -z 4M 128k']);
    const rawPath = await reference(tmp.path, 16 * MiB);
    const raw = await openRaw(rawPath, 'r+');
    await raw.write(Buffer.alloc(128 * KiB, 0x11), 0, 128 * KiB, 2 * MiB);
    await raw.close();
    const image = await openImage(path, { readOnly: false });
    const mixed = Buffer.alloc(MiB);
    patternBuffer(CLUSTER, 1, 0).copy(mixed, 0);
    patternBuffer(CLUSTER, 2, 0).copy(mixed, MiB - CLUSTER);
    await writeBoth(image, rawPath, [
      [0, mixed], // clusters 1..14 all zero, unallocated: left out
      [2 * MiB, Buffer.alloc(128 * KiB)], // allocated data overwritten with zeros: written
      [4 * MiB, Buffer.alloc(128 * KiB)], // zero clusters: left out
      [6 * MiB + 4 * KiB, Buffer.alloc(CLUSTER)], // covers no whole cluster: written
      [8 * MiB, Buffer.concat([Buffer.alloc(CLUSTER), patternBuffer(4 * KiB, 3, 0)])], // one whole zero cluster, then data
    ]);
    await image.close();
    const map = await qemuImgMap(path);
    expect(at(map, 0).data).toBe(true);
    expect(at(map, CLUSTER).data).toBe(false);
    expect(at(map, 7 * CLUSTER).data).toBe(false);
    expect(at(map, MiB - CLUSTER).data).toBe(true);
    expect(at(map, 2 * MiB).data).toBe(true); // still allocated, now holding zeros
    expect(at(map, 4 * MiB)).toMatchObject({ data: false, zero: true });
    expect(at(map, 6 * MiB).data).toBe(true);
    expect(at(map, 8 * MiB).data).toBe(false);
    expect(at(map, 8 * MiB + CLUSTER).data).toBe(true);
    expect(await qemuImgCompare(path, rawPath, { formatB: 'raw' })).toBe(true);
    await qemuImgCheckClean(path);
  });

  it('writes every zero cluster with detectZeroes: false (convert, bench)', async () => {
    const path = join(tmp.path, 'all.qcow2');
    await qemuImgCreate(path, 4 * MiB);
    const image = await openImage(path, { readOnly: false, detectZeroes: false });
    await image.write(0, Buffer.alloc(4 * CLUSTER));
    await image.close();
    expect(at(await qemuImgMap(path), 0)).toMatchObject({ data: true, length: 4 * CLUSTER });
    await qemuIoOk(path, [`read -P 0 0 ${4 * CLUSTER}`]);
    await qemuImgCheckClean(path);
  });

  it('writes zeros over clusters a backing file shows through', async () => {
    const base = join(tmp.path, 'base.qcow2');
    const path = join(tmp.path, 'over.qcow2');
    await qemuImgCreate(base, 4 * MiB);
    await qemuIoOk(base, ['write -P 0x5a 0 4M']);
    await qemuImgCreate(path, 4 * MiB, { backing_file: base, backing_fmt: 'qcow2' });
    const image = await openImage(path, { readOnly: false });
    await image.write(MiB, Buffer.alloc(2 * CLUSTER));
    await image.close();
    const map = await qemuImgMap(path);
    expect(at(map, MiB)).toMatchObject({ depth: 0 });
    expect(at(map, 0)).toMatchObject({ depth: 1 });
    await qemuIoOk(path, [`read -P 0 ${MiB} ${2 * CLUSTER}`, `read -P 0x5a 0 ${MiB}`, `read -P 0x5a ${MiB + 2 * CLUSTER} 64k`]);
    await qemuImgCheckClean(path);
  });

  it('writes a zero cluster another write has in flight, after it', async () => {
    const path = join(tmp.path, 'busy.qcow2');
    await qemuImgCreate(path, 4 * MiB);
    let release!: () => void;
    const gate = new Promise<void>((resolve) => { release = resolve; });
    let reached!: () => void;
    const heldWrite = new Promise<void>((resolve) => { reached = resolve; });
    const opener: HostFileOpener = async (p, options) => {
      const file = await openNodeHostFile(p, options);
      let held = false;
      return new (class extends ForwardingHostFile {
        override async pwrite(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<void> {
          if (point === 'data' && !held) {
            held = true;
            reached();
            await gate;
          }
          return this.inner.pwrite(buf, hostOffset, point);
        }
      })(file);
    };
    const image = await openImage(path, { readOnly: false, openHostFile: opener, preallocate: false });
    const first = image.write(0, patternBuffer(CLUSTER, 4, 0));
    await heldWrite;
    const zeros = image.write(0, Buffer.alloc(CLUSTER));
    release();
    await Promise.all([first, zeros]);
    const back = await image.read(0, CLUSTER);
    expect(back.every((b) => b === 0)).toBe(true);
    await image.close();
    await qemuIoOk(path, [`read -P 0 0 ${CLUSTER}`]);
    await qemuImgCheckClean(path);
  });
});
