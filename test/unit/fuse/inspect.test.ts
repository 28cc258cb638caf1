/** Inspection file text (qemu-img's formats) and content snapshots (memory and spilled). */
import { readdir } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { ContentSnapshot, layoutText, mapJsonText, qemuJson } from '../../../src/fuse/inspect.js';
import type { LayoutEntry, MapExtent } from '../../../src/qcow2/block-device.js';
import { tempDir } from '../../helpers/tmp.js';

async function* from<T>(items: Iterable<T>): AsyncIterable<T> {
  yield* items;
}

async function text(chunks: AsyncIterable<string>): Promise<string> {
  let all = '';
  for await (const chunk of chunks) all += chunk;
  return all;
}

const extent = (start: number, length: number, data: boolean, offset?: number): MapExtent =>
  ({ start, length, depth: 0, present: data, zero: !data, data, compressed: false, ...(offset === undefined ? {} : { offset }) });

describe('map.json', () => {
  it('prints qemu-img map --output=json lines', async () => {
    const out = await text(mapJsonText(from([extent(0, 65536, true, 327680), extent(65536, 983040, false)])));
    expect(out).toBe('[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 327680},\n' +
      '{ "start": 65536, "length": 983040, "depth": 0, "present": false, "zero": true, "data": false, "compressed": false}]\n');
    expect(JSON.parse(out)).toHaveLength(2);
  });

  it('prints [] for an empty image and streams many extents in chunks', async () => {
    expect(await text(mapJsonText(from([])))).toBe('[]\n');
    const many = Array.from({ length: 5000 }, (_, i) => extent(i * 65536, 65536, i % 2 === 0, i % 2 === 0 ? i * 65536 : undefined));
    const chunks: string[] = [];
    for await (const chunk of mapJsonText(from(many))) chunks.push(chunk);
    expect(chunks.length).toBeGreaterThan(1);
    expect(JSON.parse(chunks.join(''))).toHaveLength(5000);
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
