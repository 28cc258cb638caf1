/**
 * layout(): every host cluster of the file exactly once, in host order; metadata where the header
 * and tables say it is; data clusters serving the guest offsets qemu-img map reports; compressed
 * clusters with their chunk counts; leaked clusters flagged; the same result whatever the window.
 */
import { readFile, stat, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import type { LayoutEntry } from '../../../../src/qcow2/engine/block-device.js';
import { layout, type LayoutOptions } from '../../../../src/qcow2/tools/layout.js';
import { patternBuffer } from '../../../helpers/patterns.js';
import { qemuImg, qemuImgCreate, qemuImgMap, qemuIoOk } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTools } from '../../../helpers/tools.js';
import { openImage } from '../../../../src/node.js';

const hasQemu = requireTools('qemu-img', 'qemu-io');
const CLUSTER = 65536;

async function collect(path: string, options: LayoutOptions = {}): Promise<LayoutEntry[]> {
  const image = await openImage(path, { readOnly: true });
  try {
    const entries: LayoutEntry[] = [];
    for await (const e of layout(image, options)) entries.push(e);
    return entries;
  } finally {
    await image.close();
  }
}

/** The entry covering host offset `hostOffset`. */
function at(entries: LayoutEntry[], hostOffset: number): LayoutEntry | undefined {
  return entries.find((e) => e.hostOffset <= hostOffset && hostOffset < e.hostOffset + e.bytes);
}

describe.skipIf(!hasQemu)('layout', () => {
  const tmp = useTempDir('layout');

  async function richImage(): Promise<string> {
    const path = tmp.file('a.qcow2');
    await qemuImgCreate(path, '64M');
    await qemuIoOk(path, ['write -P 1 0 256k', 'write -c -P 2 1M 128k', 'write -P 3 32M 64k']);
    expect((await qemuImg(['snapshot', '-c', 's1', path])).code).toBe(0);
    await qemuIoOk(path, ['write -P 4 0 64k', 'write -P 5 40M 128k']);
    return path;
  }

  it('covers the file once, in host order, and puts every structure where the image says', async () => {
    const path = await richImage();
    const entries = await collect(path);
    const fileBytes = (await stat(path)).size;
    let end = 0;
    for (const e of entries) {
      expect(e.hostOffset).toBe(end);
      expect(e.bytes).toBeGreaterThan(0);
      end = e.hostOffset + e.bytes;
    }
    expect(end).toBe(fileBytes);

    const header = await readFile(path);
    expect(at(entries, 0)?.kind).toBe('header');
    expect(at(entries, Number(header.readBigUInt64BE(40)))?.kind).toBe('l1');
    expect(at(entries, Number(header.readBigUInt64BE(48)))?.kind).toBe('reftable');
    expect(at(entries, Number(header.readBigUInt64BE(64)))?.kind).toBe('snapshot-table');
    const kinds = new Set(entries.map((e) => e.kind));
    for (const kind of ['refblock', 'l2', 'snapshot-l1', 'data', 'compressed'] as const) expect(kinds).toContain(kind);
    const compressed = entries.filter((e) => e.kind === 'compressed');
    expect(compressed.map((e) => e.note)).toEqual(['2 chunks']);
    expect(compressed[0].guestOffset).toBe(1 << 20);
    expect(entries.some((e) => e.kind === 'l2' && e.note === 'snapshot')).toBe(true);
    expect(entries.some((e) => e.kind === 'data' && e.note === 'snapshot' && e.guestOffset === 0)).toBe(true);
  });

  it('maps data clusters to the guest offsets qemu-img map reports', async () => {
    const path = await richImage();
    const entries = await collect(path);
    const extents = (await qemuImgMap(path)).filter((m) => m.data && m.offset !== undefined);
    expect(extents.length).toBeGreaterThan(0);
    for (const m of extents) {
      for (let done = 0; done < m.length; done += CLUSTER) {
        const e = at(entries, m.offset! + done);
        expect(e?.kind).toBe('data');
        expect(e!.guestOffset! + (m.offset! + done - e!.hostOffset)).toBe(m.start + done);
      }
    }
  });

  it('flags a cluster with a refcount that nothing refers to, and free space', async () => {
    const path = tmp.file('leak.qcow2');
    await qemuImgCreate(path, '64M');
    await qemuIoOk(path, ['write -P 1 0 64k', 'write -P 2 1M 64k']);
    const bytes = await readFile(path);
    const refblock = Number(bytes.readBigUInt64BE(Number(bytes.readBigUInt64BE(48))));
    const clusters = bytes.length / CLUSTER;
    bytes.writeUInt16BE(1, refblock + clusters * 2); // leak: the cluster appended below
    await writeFile(path, Buffer.concat([bytes, Buffer.alloc(2 * CLUSTER)]));
    const entries = await collect(path);
    expect(at(entries, clusters * CLUSTER)).toMatchObject({ kind: 'unknown', note: 'unreferenced, refcount 1' });
    expect(at(entries, (clusters + 1) * CLUSTER)).toMatchObject({ kind: 'free' });
  });

  it('gives the same layout whatever the window size', async () => {
    const path = await richImage();
    expect(await collect(path, { windowClusters: 3 })).toEqual(await collect(path));
    expect(await collect(path, { windowClusters: 1 })).toEqual(await collect(path));
  });

  it('shows what a live image holds, including writes still in its caches', async () => {
    const path = tmp.file('live.qcow2');
    await qemuImgCreate(path, '64M');
    const image = await openImage(path, { readOnly: false });
    try {
      await image.write(5 * CLUSTER, patternBuffer(2 * CLUSTER, 1, 5 * CLUSTER));
      const entries: LayoutEntry[] = [];
      for await (const e of layout(image)) entries.push(e);
      const data = entries.filter((e) => e.kind === 'data');
      expect(data).toHaveLength(1);
      expect(data[0]).toMatchObject({ guestOffset: 5 * CLUSTER, bytes: 2 * CLUSTER });
    } finally {
      await image.close();
    }
  });

  it('ignores table entries that point outside the file', async () => {
    const path = tmp.file('hostile.qcow2');
    await qemuImgCreate(path, '64M');
    await qemuIoOk(path, ['write -P 1 0 64k']);
    const bytes = await readFile(path);
    const l2 = Number(bytes.readBigUInt64BE(Number(bytes.readBigUInt64BE(40))) & 0x00fffffffffffe00n);
    bytes.writeBigUInt64BE(0x8000000000000000n | (1n << 50n), l2 + 8); // data cluster at 1 PiB
    bytes.writeBigUInt64BE(0x8000000000000000n | 0x200n, l2 + 16); // unaligned
    await writeFile(path, bytes);
    const entries = await collect(path);
    expect(entries.reduce((n, e) => n + e.bytes, 0)).toBe(bytes.length);
    expect(entries.filter((e) => e.kind === 'data').map((e) => e.guestOffset)).toEqual([0]);
  });
});
