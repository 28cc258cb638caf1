/** Inspection file text (qemu-img's formats) and content snapshots (memory and spilled). */
import { readdir } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { ContentSnapshot, INSPECTION_FILES, layoutText, qemuJson, type ContentGenerator } from '../../../src/fuse/inspect.js';
import type { LayoutEntry, MapExtent } from '../../../src/qcow2/engine/block-device.js';
import { tempDir } from '../../helpers/tmp.js';
import { MemoryDevice } from './memory-device.js';

async function* from<T>(items: Iterable<T>): AsyncIterable<T> {
  yield* items;
}

async function text(chunks: AsyncIterable<string>): Promise<string> {
  let all = '';
  for await (const chunk of chunks) all += chunk;
  return all;
}

describe('map.json', () => {
  it("is the JSON array of the device's extents, streamed in chunks for large maps", async () => {
    const device = new MemoryDevice(64 * 1024 * 1024, { clusterSize: 4096 });
    for (let c = 0; c < 16384; c += 2) await device.write(c * 4096, Buffer.alloc(1, 1));
    const chunks: string[] = [];
    for await (const chunk of (INSPECTION_FILES.get('map.json') as ContentGenerator)(device)) chunks.push(chunk);
    expect(chunks.length).toBeGreaterThan(1);
    const extents: MapExtent[] = [];
    for await (const e of device.mapExtents()) extents.push(e);
    const parsed = JSON.parse(chunks.join('')) as Record<string, unknown>[];
    expect(parsed).toHaveLength(16384);
    expect(parsed.map((e) => [e.start, e.length, e.data, e.offset])).toEqual(extents.map((e) => [e.start, e.length, e.data, e.offset]));
  });

  it('is [] for an empty image', async () => {
    expect(await text((INSPECTION_FILES.get('map.json') as ContentGenerator)(new MemoryDevice(0)))).toBe('[]\n');
  });
});

describe('layout.txt', () => {
  it('has a header and one tab-separated line per entry', async () => {
    const entries: LayoutEntry[] = [
      { hostOffset: 0, bytes: 65536, kind: 'header' },
      { hostOffset: 65536, bytes: 65536, kind: 'data', guestOffset: 131072, note: 'refcount\t2' },
    ];
    expect(await text(layoutText(from(entries)))).toBe('# host_offset\tbytes\tkind\tguest_offset\tnote\n0\t65536\theader\t-\n65536\t65536\tdata\t131072\trefcount 2\n');
  });
});

describe('qemuJson', () => {
  it('indents by 4 and ends with a newline, like qemu-img', () => {
    expect(qemuJson({ a: 1, b: [2] })).toBe('{\n    "a": 1,\n    "b": [\n        2\n    ]\n}\n');
  });
});

describe('ContentSnapshot', () => {
  it('keeps small content in memory and serves ranges', async () => {
    const snap = await ContentSnapshot.capture(from(['hello ', '', 'world']));
    expect(snap.size).toBe(11);
    expect((await snap.read(6, 100)).toString()).toBe('world');
    expect((await snap.read(11, 5)).length).toBe(0);
    await snap.close();
  });

  it('spills past the memory limit to an unlinked file, with identical content', async () => {
    const dir = await tempDir('spill');
    const parts = Array.from({ length: 100 }, (_, i) => `line ${i} ${'x'.repeat(i)}\n`);
    const snap = await ContentSnapshot.capture(from(parts), { memoryLimitBytes: 500, spillDir: dir });
    const whole = parts.join('');
    expect(snap.size).toBe(Buffer.byteLength(whole));
    expect(await readdir(dir)).toEqual([]);
    expect((await snap.read(0, snap.size)).toString()).toBe(whole);
    expect((await snap.read(1234, 50)).toString()).toBe(whole.slice(1234, 1284));
    await snap.close();
  });

  it('a failing generator leaves nothing behind and rethrows', async () => {
    const dir = await tempDir('spill');
    async function* failing(): AsyncIterable<string> {
      yield 'x'.repeat(1000);
      throw new Error('generator broke');
    }
    await expect(ContentSnapshot.capture(failing(), { memoryLimitBytes: 10, spillDir: dir })).rejects.toThrow('generator broke');
    expect(await readdir(dir)).toEqual([]);
  });
});
