/**
 * TableCache (src/qcow2/engine/table-cache.ts): pins, hits and misses, dirty writeback on eviction, eviction
 * of unpinned slots only, writeback ordering (dependsOn, dependsOnFlush), writethrough, discard and
 * failures. A recording HostFile logs every pread / pwrite / fdatasync so the tests assert the order
 * of I/O, not just its effect; the last group checks the order an image produces on a real workload
 * (a new L2 entry reaches the disk only after its cluster's refcount and data are durable).
 */
import { describe, expect, it } from 'vitest';
import { HostIoError } from '../../../../src/io/errors.js';
import { FaultyHostFile } from '../../../../src/io/faulty-host-file.js';
import { ForwardingHostFile, type HostFile, type WritePoint } from '../../../../src/io/host-file.js';
import { MemoryHostFile } from '../../../../src/io/memory-host-file.js';
import { Geometry } from '../../../../src/qcow2/format/geometry.js';
import { clusterKind, l2HostOffset, readL2Entry } from '../../../../src/qcow2/format/l2-entry.js';
import { decodeReftableEntry, getRefcount } from '../../../../src/qcow2/format/refcount-block.js';
import { TableCache, type TableCacheOptions } from '../../../../src/qcow2/engine/table-cache.js';
import { isZero, patternBuffer, Prng, seedFromEnv } from '../../../helpers/patterns.js';
import { qemuImgCreate } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTool } from '../../../helpers/tools.js';
import { readFile } from 'node:fs/promises';
import { openImage } from '../../../../src/node.js';

const TABLE = 512;

type IoEvent =
  | { op: 'pread'; offset: number; point: WritePoint | undefined }
  | { op: 'pwrite'; offset: number; point: WritePoint | undefined; data: Buffer }
  | { op: 'fdatasync' };

/** A HostFile that forwards to `inner` and logs every pread, pwrite and fdatasync in order. */
class RecordingFile extends ForwardingHostFile {
  readonly events: IoEvent[] = [];
  /** Fail this many of the next preads with EIO. */
  failReads = 0;
  override async pread(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<number> {
    this.events.push({ op: 'pread', offset: hostOffset, point });
    if (this.failReads > 0) {
      this.failReads--;
      throw new HostIoError('EIO', this.path, 'pread', hostOffset, 'EIO (injected)');
    }
    return this.inner.pread(buf, hostOffset, point);
  }
  override async pwrite(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<void> {
    await this.inner.pwrite(buf, hostOffset, point);
    this.events.push({ op: 'pwrite', offset: hostOffset, point, data: Buffer.from(buf) });
  }
  override async fdatasync(): Promise<void> {
    await this.inner.fdatasync();
    this.events.push({ op: 'fdatasync' });
  }

  /** The events since `from` as short strings: 'r@1024', 'w@512', 'sync'. */
  trace(from = 0): string[] {
    return this.events.slice(from).map((e) => (e.op === 'fdatasync' ? 'sync' : `${e.op === 'pread' ? 'r' : 'w'}@${e.offset}`));
  }
}

function makeCache(file: HostFile, options: Partial<TableCacheOptions> = {}): TableCache {
  return new TableCache({
    name: 'test', file, tableBytes: TABLE, nbSlots: 4, writePoint: 'l2', allocBuffer: (bytes) => Buffer.alloc(bytes), ...options,
  });
}

/** A memory file whose table at offset k*TABLE holds pattern bytes seeded k. */
function patternedFile(nbTables: number): MemoryHostFile {
  return MemoryHostFile.from(Buffer.concat(Array.from({ length: nbTables }, (_, k) => patternBuffer(TABLE, k, 0))));
}

describe('TableCache: pins, hits and misses', () => {
  it('reads a table on a miss, hits on the next get, and pins once per get', async () => {
    const file = new RecordingFile(patternedFile(8));
    const cache = makeCache(file);
    const a = await cache.get(3 * TABLE);
    expect(a.buf.equals(patternBuffer(TABLE, 3, 0))).toBe(true);
    const b = await cache.get(3 * TABLE);
    expect(b.slot).toBe(a.slot);
    expect(b.buf).toBe(a.buf);
    expect(cache.stats).toMatchObject({ hits: 1, misses: 1 });
    expect(file.trace()).toEqual([`r@${3 * TABLE}`]);
    expect(cache.pinnedCount()).toBe(1);
    await cache.put(a);
    expect(cache.pinnedCount()).toBe(1);
    cache.release(b);
    expect(cache.pinnedCount()).toBe(0);
  });

  it('getEmpty gives a zeroed table without reading the file', async () => {
    const file = new RecordingFile(patternedFile(8));
    const cache = makeCache(file);
    const h = await cache.getEmpty(2 * TABLE);
    expect(isZero(h.buf)).toBe(true);
    expect(file.events).toEqual([]);
    h.buf.fill(7);
    cache.markDirty(h);
    await cache.put(h);
    // A later getEmpty of a cached table zeroes it too.
    const again = await cache.getEmpty(2 * TABLE);
    expect(again.slot).toBe(h.slot);
    expect(isZero(again.buf)).toBe(true);
    cache.release(again);
  });

  it('a table past the end of the file reads as zeros', async () => {
    const cache = makeCache(patternedFile(1));
    const h = await cache.get(16 * TABLE);
    expect(isZero(h.buf)).toBe(true);
    cache.release(h);
  });

  it('keeps as many consecutive tables as it has slots without evicting', async () => {
    for (const nbSlots of [4, 16, 64, 1024]) {
      const cache = makeCache(new MemoryHostFile(), { nbSlots });
      for (let k = 0; k < nbSlots; k++) cache.release(await cache.get(k * TABLE));
      for (let k = 0; k < nbSlots; k++) cache.release(await cache.get(k * TABLE));
      expect({ nbSlots, ...cache.stats }).toEqual({ nbSlots, hits: nbSlots, misses: nbSlots, writes: 0, evictions: 0 });
    }
  });
});

describe('TableCache: eviction', () => {
  it('writes a dirty table back before its slot is reused, then reads the new table', async () => {
    const file = new RecordingFile(patternedFile(8));
    const cache = makeCache(file, { nbSlots: 4 });
    for (let k = 0; k < 4; k++) {
      const h = await cache.get(k * TABLE);
      h.buf.fill(0x10 + k);
      cache.markDirty(h);
      await cache.put(h);
    }
    expect(cache.dirtyCount).toBe(4);
    const mark = file.events.length;
    const h4 = await cache.get(4 * TABLE);
    // The least recently used table (0) goes: written back first, then the new table is read.
    expect(file.trace(mark)).toEqual(['w@0', `r@${4 * TABLE}`]);
    const written = file.events[mark] as Extract<IoEvent, { op: 'pwrite' }>;
    expect(written.data.equals(Buffer.alloc(TABLE, 0x10))).toBe(true);
    expect(written.point).toBe('l2');
    expect(cache.dirtyCount).toBe(3);
    expect(cache.stats.evictions).toBe(1);
    cache.release(h4);
    // Table 0 comes back from the file with the written contents.
    const h0 = await cache.get(0);
    expect(h0.buf.equals(Buffer.alloc(TABLE, 0x10))).toBe(true);
    cache.release(h0);
  });

  it('never evicts a pinned table; fails clearly when every candidate slot is pinned', async () => {
    const file = new RecordingFile(patternedFile(64));
    const cache = makeCache(file, { nbSlots: 4 });
    const pinned = [await cache.get(0), await cache.get(TABLE), await cache.get(2 * TABLE)];
    for (const h of pinned) h.buf.fill(0xee);
    for (let k = 3; k < 40; k++) {
      const h = await cache.get(k * TABLE);
      expect(pinned.map((p) => p.slot)).not.toContain(h.slot);
      await cache.put(h);
    }
    for (const h of pinned) expect(h.buf.equals(Buffer.alloc(TABLE, 0xee))).toBe(true);
    const hitsBefore = cache.stats.hits;
    for (let k = 0; k < 3; k++) cache.release(await cache.get(k * TABLE));
    expect(cache.stats.hits - hitsBefore).toBe(3);
    const fourth = await cache.get(50 * TABLE);
    await expect(cache.get(51 * TABLE)).rejects.toThrow(/pinned/);
    cache.release(fourth);
    for (const h of pinned) cache.release(h);
    expect(cache.pinnedCount()).toBe(0);
  });

  it('evicts the least recently used unpinned table', async () => {
    const cache = makeCache(patternedFile(8), { nbSlots: 4 });
    for (let k = 0; k < 4; k++) cache.release(await cache.get(k * TABLE));
    // Touch 0, 1, 3: table 2 is now the least recently used.
    for (const k of [0, 1, 3]) cache.release(await cache.get(k * TABLE));
    cache.release(await cache.get(5 * TABLE));
    const misses = cache.stats.misses;
    for (const k of [0, 1, 3, 5]) cache.release(await cache.get(k * TABLE));
    expect(cache.stats.misses).toBe(misses);
    cache.release(await cache.get(2 * TABLE));
    expect(cache.stats.misses).toBe(misses + 1);
  });

  it('a pinned table stays pinned in its slot even after discard()', async () => {
    const cache = makeCache(patternedFile(64), { nbSlots: 4 });
    const held = await cache.get(0);
    held.buf.fill(0xab);
    cache.discard(0);
    for (let k = 1; k < 20; k++) {
      const h = await cache.get(k * TABLE);
      expect(h.slot, `table ${k} got the slot of a pinned (discarded) table`).not.toBe(held.slot);
      cache.release(h);
    }
    expect(held.buf.equals(Buffer.alloc(TABLE, 0xab))).toBe(true);
    cache.release(held);
    expect(cache.pinnedCount()).toBe(0);
  });
});

describe('TableCache: writeback and ordering', () => {
  it('flush writes dirty tables in host order, then fdatasyncs; a clean cache does nothing', async () => {
    const file = new RecordingFile(patternedFile(8));
    const cache = makeCache(file, { nbSlots: 8 });
    for (const k of [5, 1, 3]) {
      const h = await cache.get(k * TABLE);
      cache.markDirty(h);
      await cache.put(h);
    }
    const mark = file.events.length;
    await cache.flush();
    expect(file.trace(mark)).toEqual([`w@${TABLE}`, `w@${3 * TABLE}`, `w@${5 * TABLE}`, 'sync']);
    expect(cache.dirtyCount).toBe(0);
    const after = file.events.length;
    await cache.flush();
    expect(file.events.length).toBe(after);
  });

  it('writeOne writes just that table when dirty', async () => {
    const file = new RecordingFile(patternedFile(8));
    const cache = makeCache(file, { nbSlots: 8 });
    for (const k of [1, 2]) {
      const h = await cache.get(k * TABLE);
      cache.markDirty(h);
      await cache.put(h);
    }
    const mark = file.events.length;
    await cache.writeOne(2 * TABLE);
    await cache.writeOne(2 * TABLE);
    await cache.writeOne(7 * TABLE);
    expect(file.trace(mark)).toEqual([`w@${2 * TABLE}`]);
    expect(cache.dirtyCount).toBe(1);
  });

  it('dependsOn: the dependency is written and synced before any table of the dependent cache', async () => {
    const file = new RecordingFile(new MemoryHostFile());
    const refcounts = makeCache(file, { name: 'refcount', writePoint: 'refblock', nbSlots: 4 });
    const l2 = makeCache(file, { name: 'l2', writePoint: 'l2', nbSlots: 4 });
    const r = await refcounts.get(100 * TABLE);
    refcounts.markDirty(r);
    await refcounts.put(r);
    const t = await l2.get(10 * TABLE);
    l2.markDirty(t);
    await l2.put(t);
    await l2.dependsOn(refcounts);
    const mark = file.events.length;
    await l2.flush();
    expect(file.trace(mark)).toEqual([`w@${100 * TABLE}`, 'sync', `w@${10 * TABLE}`, 'sync']);
    // The dependency is satisfied: later L2 writes do not flush the refcount cache again.
    const r2 = await refcounts.get(101 * TABLE);
    refcounts.markDirty(r2);
    await refcounts.put(r2);
    const t2 = await l2.get(11 * TABLE);
    l2.markDirty(t2);
    await l2.put(t2);
    const mark2 = file.events.length;
    await l2.flush();
    expect(file.trace(mark2)).toEqual([`w@${11 * TABLE}`, 'sync']);
    expect(refcounts.dirtyCount).toBe(1);
  });

  it('dependsOn also orders eviction writeback', async () => {
    const file = new RecordingFile(new MemoryHostFile());
    const refcounts = makeCache(file, { name: 'refcount', writePoint: 'refblock', nbSlots: 4 });
    const l2 = makeCache(file, { name: 'l2', writePoint: 'l2', nbSlots: 1 });
    const t = await l2.get(0);
    l2.markDirty(t);
    await l2.put(t);
    for (const k of [200, 100]) {
      const r = await refcounts.get(k * TABLE);
      refcounts.markDirty(r);
      await refcounts.put(r);
    }
    await l2.dependsOn(refcounts);
    const mark = file.events.length;
    l2.release(await l2.get(TABLE));
    expect(file.trace(mark)).toEqual([`w@${100 * TABLE}`, `w@${200 * TABLE}`, 'sync', 'w@0', `r@${TABLE}`]);
  });

  it('dependsOn in the other direction first resolves the existing dependency (no cycle)', async () => {
    const file = new RecordingFile(new MemoryHostFile());
    const refcounts = makeCache(file, { name: 'refcount', writePoint: 'refblock' });
    const l2 = makeCache(file, { name: 'l2', writePoint: 'l2' });
    const r = await refcounts.get(100 * TABLE);
    refcounts.markDirty(r);
    await refcounts.put(r);
    await l2.dependsOn(refcounts);
    const t = await l2.get(0);
    l2.markDirty(t);
    await l2.put(t);
    const mark = file.events.length;
    // A free: the refcount cache must now wait for the L2 cache. L2's own dependency is flushed now.
    await refcounts.dependsOn(l2);
    expect(file.trace(mark)).toEqual([`w@${100 * TABLE}`, 'sync']);
    const r2 = await refcounts.get(101 * TABLE);
    refcounts.markDirty(r2);
    await refcounts.put(r2);
    const mark2 = file.events.length;
    await refcounts.flush();
    expect(file.trace(mark2)).toEqual(['w@0', 'sync', `w@${101 * TABLE}`, 'sync']);
  });

  it('dependsOnFlush: the next write is preceded by one fdatasync', async () => {
    const file = new RecordingFile(new MemoryHostFile());
    const l2 = makeCache(file, { nbSlots: 4 });
    for (const k of [1, 2]) {
      const h = await l2.get(k * TABLE);
      l2.markDirty(h);
      await l2.put(h);
    }
    l2.dependsOnFlush();
    const mark = file.events.length;
    await l2.flush();
    expect(file.trace(mark)).toEqual(['sync', `w@${TABLE}`, `w@${2 * TABLE}`, 'sync']);
    const h = await l2.get(3 * TABLE);
    l2.markDirty(h);
    await l2.put(h);
    const mark2 = file.events.length;
    await l2.flush();
    expect(file.trace(mark2)).toEqual([`w@${3 * TABLE}`, 'sync']);
  });

  it('writethrough writes a dirty table when its last pin is put, never on release or for clean tables', async () => {
    const file = new RecordingFile(new MemoryHostFile());
    const cache = makeCache(file, { writethrough: true });
    const a = await cache.get(0);
    const b = await cache.get(0);
    cache.markDirty(a);
    await cache.put(a);
    expect(file.trace()).toEqual(['r@0']);
    await cache.put(b);
    expect(file.trace()).toEqual(['r@0', 'w@0']);
    expect(cache.dirtyCount).toBe(0);
    const c = await cache.get(TABLE);
    await cache.put(c);
    expect(file.trace()).toEqual(['r@0', 'w@0', `r@${TABLE}`]);
    // Writeback mode keeps the same sequence in memory.
    const wbFile = new RecordingFile(new MemoryHostFile());
    const wb = makeCache(wbFile);
    const d = await wb.get(0);
    wb.markDirty(d);
    await wb.put(d);
    expect(wbFile.trace()).toEqual(['r@0']);
    expect(wb.dirtyCount).toBe(1);
  });

  it('discard forgets a dirty table without writing it; invalidateClean keeps dirty and pinned tables', async () => {
    const file = new RecordingFile(patternedFile(8));
    const cache = makeCache(file, { nbSlots: 8 });
    const dirty = await cache.get(0);
    dirty.buf.fill(1);
    cache.markDirty(dirty);
    await cache.put(dirty);
    cache.discard(0);
    expect(cache.dirtyCount).toBe(0);
    await cache.flush();
    expect(file.events.filter((e) => e.op === 'pwrite')).toEqual([]);
    const kept = await cache.get(TABLE);
    cache.markDirty(kept);
    await cache.put(kept);
    const pinned = await cache.get(2 * TABLE);
    cache.release(await cache.get(3 * TABLE));
    cache.invalidateClean();
    const misses = cache.stats.misses;
    for (const k of [1, 2]) cache.release(await cache.get(k * TABLE));
    expect(cache.stats.misses).toBe(misses);
    cache.release(await cache.get(3 * TABLE));
    expect(cache.stats.misses).toBe(misses + 1);
    cache.release(pinned);
    // The discarded table reads its old contents from the file again.
    const again = await cache.get(0);
    expect(again.buf.equals(patternBuffer(TABLE, 0, 0))).toBe(true);
    cache.release(again);
  });

  it('beforeWrite can refuse a writeback (overlap check): nothing is written and the table stays dirty', async () => {
    const file = new RecordingFile(new MemoryHostFile());
    const cache = makeCache(file, { beforeWrite: (offset) => { if (offset === TABLE) throw new Error('overlaps metadata'); } });
    const h = await cache.get(TABLE);
    cache.markDirty(h);
    await cache.put(h);
    await expect(cache.flush()).rejects.toThrow(/overlaps metadata/);
    expect(file.events.filter((e) => e.op === 'pwrite')).toEqual([]);
    expect(cache.dirtyCount).toBe(1);
  });
});

describe('TableCache: I/O errors', () => {
  it('a failed eviction writeback fails the get, keeps the table dirty and cached, and leaks no pin', async () => {
    const faulty = await FaultyHostFile.wrap(patternedFile(8));
    const cache = makeCache(faulty, { nbSlots: 1 });
    const h = await cache.get(0);
    h.buf.fill(0x42);
    cache.markDirty(h);
    await cache.put(h);
    faulty.failWrite({ nth: 1, code: 'ENOSPC' });
    await expect(cache.get(TABLE)).rejects.toMatchObject({ code: 'ENOSPC' });
    expect(cache.pinnedCount()).toBe(0);
    expect(cache.dirtyCount).toBe(1);
    const again = await cache.get(0);
    expect(again.buf.equals(Buffer.alloc(TABLE, 0x42))).toBe(true);
    cache.release(again);
    await cache.flush();
    const back = Buffer.alloc(TABLE);
    await faulty.pread(back, 0);
    expect(back.equals(Buffer.alloc(TABLE, 0x42))).toBe(true);
  });

  it('a failed read fails the get, leaks no pin, and a retry reads the table', async () => {
    const file = new RecordingFile(patternedFile(8));
    file.failReads = 1;
    const cache = makeCache(file);
    await expect(cache.get(TABLE)).rejects.toMatchObject({ code: 'EIO' });
    expect(cache.pinnedCount()).toBe(0);
    const h = await cache.get(TABLE);
    expect(h.buf.equals(patternBuffer(TABLE, 1, 0))).toBe(true);
    cache.release(h);
  });

  it('a failed flush keeps every unwritten table dirty for the next flush', async () => {
    const faulty = await FaultyHostFile.wrap(new MemoryHostFile());
    const cache = makeCache(faulty, { nbSlots: 8 });
    for (let k = 0; k < 4; k++) {
      const h = await cache.get(k * TABLE);
      h.buf.fill(k + 1);
      cache.markDirty(h);
      await cache.put(h);
    }
    faulty.failWrite({ nth: 3, code: 'EIO' });
    await expect(cache.flush()).rejects.toMatchObject({ code: 'EIO' });
    expect(cache.dirtyCount).toBe(2);
    await cache.flush();
    expect(cache.dirtyCount).toBe(0);
    for (let k = 0; k < 4; k++) {
      const back = Buffer.alloc(TABLE);
      await faulty.pread(back, k * TABLE);
      expect(back.equals(Buffer.alloc(TABLE, k + 1))).toBe(true);
    }
  });
});

/**
 * Replays an image's I/O log against two copies of the file: `current` (every write applied) and
 * `durable` (writes applied only at the fdatasync after them). At each L2 table write, every entry
 * that changed must point at a host cluster whose refcount is already durable (≥ 1) and whose data
 * has no unsynced write: DESIGN §4 rules 1 and 2, checked on what the disk would hold at that moment.
 */
async function checkL2WriteOrdering(initial: Buffer, events: readonly IoEvent[]): Promise<{ checkedEntries: number }> {
  const current = MemoryHostFile.from(initial);
  const durable = MemoryHostFile.from(initial);
  const clusterBits = initial.readUInt32BE(20);
  const geometry = new Geometry(clusterBits, initial.readUInt32BE(96), false);
  const cs = geometry.clusterSize;
  let pending: Extract<IoEvent, { op: 'pwrite' }>[] = [];
  let checkedEntries = 0;
  const durableRefcount = async (hostOffset: number): Promise<number> => {
    const header = Buffer.alloc(72);
    await durable.pread(header, 0);
    const reftable = Number(header.readBigUInt64BE(48));
    const cluster = geometry.clusterIndex(hostOffset);
    const entry = Buffer.alloc(8);
    await durable.pread(entry, reftable + geometry.reftableIndex(cluster) * 8);
    const { refblockOffset } = decodeReftableEntry(entry, 0);
    if (refblockOffset === 0) return 0;
    const block = Buffer.alloc(cs);
    await durable.pread(block, refblockOffset);
    return getRefcount(block, geometry.refblockIndex(cluster), geometry.refcountOrder);
  };
  for (const [i, e] of events.entries()) {
    if (e.op === 'fdatasync') {
      for (const w of pending) await durable.pwrite(w.data, w.offset);
      pending = [];
      continue;
    }
    if (e.op !== 'pwrite') continue;
    if (e.point === 'l2') {
      const before = Buffer.alloc(e.data.length);
      await current.pread(before, e.offset);
      for (let k = 0; k < e.data.length / 8; k++) {
        const entry = readL2Entry(e.data, k, geometry);
        if (before.readBigUInt64BE(k * 8) === e.data.readBigUInt64BE(k * 8) || clusterKind(entry, geometry, false) !== 'normal') continue;
        const host = l2HostOffset(entry);
        checkedEntries++;
        expect(await durableRefcount(host), `I/O #${i}: L2 entry at ${e.offset + k * 8} links host cluster ${host} before its refcount is durable`).toBeGreaterThan(0);
        const unsynced = pending.find((w) => w.point === 'data' && w.offset < host + cs && host < w.offset + w.data.length);
        expect(unsynced, `I/O #${i}: L2 entry at ${e.offset + k * 8} links host cluster ${host} before its data write is synced`).toBeUndefined();
      }
    }
    await current.pwrite(e.data, e.offset);
    pending.push(e);
  }
  return { checkedEntries };
}

const hasQemu = requireTool('qemu-img');

describe.skipIf(!hasQemu)('TableCache ordering inside an image', () => {
  const tmp = useTempDir('cache-order');
  const seed = seedFromEnv();

  for (const options of [{ name: '4 KiB clusters', clusterSize: 4096, refcountBits: 16 }, { name: '512 B clusters, refcount_bits 64', clusterSize: 512, refcountBits: 64 }]) {
    it(`L2 entries reach the disk only after their refcounts and data are durable (${options.name})`, async () => {
      const path = tmp.file('image.qcow2');
      const size = 4 * 1024 * 1024;
      await qemuImgCreate(path, size, { cluster_size: options.clusterSize, refcount_bits: options.refcountBits });
      const initial = await readFile(path);
      const file = new RecordingFile(MemoryHostFile.from(initial));
      const image = await openImage(path, {
        readOnly: false, file, lock: false, l2CacheBytes: 16 * Math.min(options.clusterSize, 4096), refcountCacheBytes: 4 * options.clusterSize,
      });
      const rng = new Prng(seed);
      for (let i = 0; i < 300; i++) {
        const offset = rng.int(size - 8192);
        await image.write(offset, patternBuffer(1 + rng.int(8192), i, offset));
        if (rng.chance(0.05)) await image.flush();
      }
      await image.close();
      const { checkedEntries } = await checkL2WriteOrdering(initial, file.events);
      expect(checkedEntries).toBeGreaterThan(100);
    });
  }
});
