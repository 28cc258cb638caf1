/**
 * TableCache: the metadata cache for L2 tables (or slices) and refcount blocks (seeds 003, 004).
 *
 * - Fixed slots of table-sized buffers; each slot {offset, pins, dirty, lru}.
 * - Lookup starts at a hash slot ((offset / tableBytes) * 4 mod nbSlots, as QEMU spreads it) and probes a
 *   bounded window of `probeSlots`; a table can only live inside its window, so a miss costs the window,
 *   never a scan of all slots (the 2015 profile in seed 004 had get/put at 76% of CPU when they scanned).
 * - `get` returns a handle naming its slot, so `put` and `markDirty` are O(1).
 * - Eviction takes the least recently used unpinned slot of the window, writing it back first if dirty.
 * - Write ordering is data, not call-site discipline: `dependsOn(other)` makes every write of this cache
 *   flush `other` (write + fdatasync) first; `dependsOnFlush()` makes the next write fdatasync first.
 *   The L2 cache depends on the refcount cache after allocations (refcount before L2) and the refcount
 *   cache on the L2 cache after frees (reference removed before refcount dropped).
 *
 * The cache is not thread-safe by itself: callers hold the image's metadata lock around every call.
 */
import type { HostFile, WritePoint } from '../io/host-file.js';
import debugFactory from 'debug';

const trace = debugFactory('qcow2fuse:cache');

export interface TableHandle {
  readonly slot: number;
  readonly offset: number;
  /** The table's bytes; valid while pinned. */
  readonly buf: Buffer;
}

export interface TableCacheOptions {
  name: string;
  file: HostFile;
  tableBytes: number;
  nbSlots: number;
  writePoint: WritePoint;
  /** Allocate one slot buffer (aligned for O_DIRECT where needed). */
  allocBuffer: (bytes: number) => Buffer;
  /** Called before a table is written back; throws to refuse (overlap check). */
  beforeWrite?: (offset: number, bytes: number) => void;
  /** Probe window; default min(nbSlots, 16). */
  probeSlots?: number;
  /** Write every dirty table as soon as it is put (cache=writethrough). */
  writethrough?: boolean;
}

interface Slot {
  offset: number; // -1 when empty
  pins: number;
  dirty: boolean;
  lru: number;
  buf: Buffer;
}

export class TableCache {
  readonly name: string;
  readonly tableBytes: number;
  readonly nbSlots: number;
  private readonly file: HostFile;
  private readonly slots: Slot[];
  private readonly probeSlots: number;
  private readonly writePoint: WritePoint;
  private readonly beforeWrite?: (offset: number, bytes: number) => void;
  private readonly writethrough: boolean;
  private lruCounter = 0;
  private depends: TableCache | undefined;
  private dependsOnFlushFlag = false;
  private nbDirty = 0;
  /** Counters for tests and benchmarks. */
  readonly stats = { hits: 0, misses: 0, writes: 0, evictions: 0 };

  constructor(options: TableCacheOptions) {
    this.name = options.name;
    this.file = options.file;
    this.tableBytes = options.tableBytes;
    this.nbSlots = Math.max(1, Math.floor(options.nbSlots));
    this.probeSlots = Math.min(this.nbSlots, options.probeSlots ?? 16);
    this.writePoint = options.writePoint;
    this.beforeWrite = options.beforeWrite;
    this.writethrough = options.writethrough ?? false;
    this.slots = [];
    for (let i = 0; i < this.nbSlots; i++) {
      this.slots.push({ offset: -1, pins: 0, dirty: false, lru: 0, buf: options.allocBuffer(this.tableBytes) });
    }
  }

  private homeSlot(offset: number): number {
    return ((offset / this.tableBytes) * 4) % this.nbSlots;
  }

  /** Slot holding `offset` within its probe window, or -1. */
  private lookup(offset: number): number {
    const home = this.homeSlot(offset);
    for (let i = 0; i < this.probeSlots; i++) {
      let s = home + i;
      if (s >= this.nbSlots) s -= this.nbSlots;
      if (this.slots[s]!.offset === offset) return s;
    }
    return -1;
  }

  /** Victim slot in the probe window of `offset`: an empty slot, else the least recently used unpinned one. */
  private victim(offset: number): number {
    const home = this.homeSlot(offset);
    let best = -1;
    let bestLru = Number.POSITIVE_INFINITY;
    for (let i = 0; i < this.probeSlots; i++) {
      let s = home + i;
      if (s >= this.nbSlots) s -= this.nbSlots;
      const slot = this.slots[s]!;
      if (slot.offset === -1 && slot.pins === 0) return s;
      if (slot.pins === 0 && slot.lru < bestLru) {
        best = s;
        bestLru = slot.lru;
      }
    }
    if (best === -1) throw new Error(`${this.name} cache: every slot of the probe window is pinned (internal error)`);
    return best;
  }

  private async claim(offset: number, read: boolean): Promise<TableHandle> {
    const s = this.victim(offset);
    const slot = this.slots[s]!;
    if (slot.offset !== -1) {
      this.stats.evictions++;
      if (slot.dirty) await this.writeSlot(slot);
      // writeSlot awaits: the victim may have been pinned or the table loaded by nobody else (we hold the lock).
      slot.offset = -1;
    }
    slot.pins = 1;
    if (read) {
      try {
        const n = await this.file.pread(slot.buf, offset, this.writePoint);
        if (n < this.tableBytes) slot.buf.fill(0, n);
      } catch (err) {
        slot.pins = 0;
        throw err;
      }
    } else {
      slot.buf.fill(0);
    }
    slot.offset = offset;
    slot.lru = ++this.lruCounter;
    trace('%s: load %d into slot %d', this.name, offset, s);
    return { slot: s, offset, buf: slot.buf };
  }

  /** Pin the table at host `offset`, reading it on a miss. */
  async get(offset: number): Promise<TableHandle> {
    const s = this.lookup(offset);
    if (s >= 0) {
      this.stats.hits++;
      const slot = this.slots[s]!;
      slot.pins++;
      return { slot: s, offset, buf: slot.buf };
    }
    this.stats.misses++;
    return this.claim(offset, true);
  }

  /** Pin a zero-filled table for `offset` without reading (a freshly allocated table). */
  async getEmpty(offset: number): Promise<TableHandle> {
    const s = this.lookup(offset);
    if (s >= 0) {
      const slot = this.slots[s]!;
      slot.pins++;
      slot.buf.fill(0);
      return { slot: s, offset, buf: slot.buf };
    }
    return this.claim(offset, false);
  }

  /** Unpin. O(1). In writethrough mode a dirty table is written now. */
  async put(handle: TableHandle): Promise<void> {
    const slot = this.slots[handle.slot]!;
    slot.pins--;
    slot.lru = ++this.lruCounter;
    if (this.writethrough && slot.dirty && slot.pins === 0) await this.writeSlot(slot);
  }

  /** Synchronous unpin without writethrough (for hot read paths that never dirty). */
  release(handle: TableHandle): void {
    const slot = this.slots[handle.slot]!;
    slot.pins--;
    slot.lru = ++this.lruCounter;
  }

  markDirty(handle: TableHandle): void {
    const slot = this.slots[handle.slot]!;
    if (!slot.dirty) {
      slot.dirty = true;
      this.nbDirty++;
    }
  }

  get dirtyCount(): number {
    return this.nbDirty;
  }

  /**
   * Make writes of this cache wait for `dependency` to be flushed first (QEMU's
   * qcow2_cache_set_dependency). A dependency the other way round is resolved now, so no cycle forms.
   */
  async dependsOn(dependency: TableCache): Promise<void> {
    if (dependency.depends) await dependency.flushDependency();
    if (this.depends && this.depends !== dependency) await this.flushDependency();
    this.depends = dependency;
  }

  /** The next write of this cache is preceded by an fdatasync of the file (data before metadata). */
  dependsOnFlush(): void {
    this.dependsOnFlushFlag = true;
  }

  private async flushDependency(): Promise<void> {
    const dependency = this.depends;
    if (dependency) {
      await dependency.flush();
      this.depends = undefined;
    }
    this.dependsOnFlushFlag = false;
  }

  private async writeSlot(slot: Slot): Promise<void> {
    if (this.depends) {
      await this.flushDependency();
    } else if (this.dependsOnFlushFlag) {
      await this.file.fdatasync();
      this.dependsOnFlushFlag = false;
    }
    if (!slot.dirty) return; // written meanwhile
    const offset = slot.offset;
    this.beforeWrite?.(offset, this.tableBytes);
    await this.file.pwrite(slot.buf, offset, this.writePoint);
    this.stats.writes++;
    if (slot.offset === offset && slot.dirty) {
      slot.dirty = false;
      this.nbDirty--;
    }
    trace('%s: wrote %d', this.name, offset);
  }

  /** Write every dirty table (in host order) without syncing. */
  async writeDirty(): Promise<void> {
    if (this.nbDirty === 0) return;
    const dirty = this.slots.filter((s) => s.dirty).sort((a, b) => a.offset - b.offset);
    for (const slot of dirty) await this.writeSlot(slot);
  }

  /** Write every dirty table, then fdatasync: afterwards the cache's state is durable. */
  async flush(): Promise<void> {
    if (this.nbDirty === 0 && !this.depends) return;
    await this.writeDirty();
    if (this.depends) await this.flushDependency();
    await this.file.fdatasync();
  }

  /** Write one table now if it is cached and dirty (used where a table must be on disk before a pointer to it). */
  async writeOne(offset: number): Promise<void> {
    const s = this.lookup(offset);
    if (s >= 0 && this.slots[s]!.dirty) await this.writeSlot(this.slots[s]!);
  }

  /** Forget a table without writing it (its cluster was freed). */
  discard(offset: number): void {
    const s = this.lookup(offset);
    if (s < 0) return;
    const slot = this.slots[s]!;
    if (slot.dirty) this.nbDirty--;
    slot.dirty = false;
    slot.offset = -1;
  }

  /** Drop every clean, unpinned table (e.g. after an external change); dirty ones stay. */
  invalidateClean(): void {
    for (const slot of this.slots) if (!slot.dirty && slot.pins === 0) slot.offset = -1;
  }

  /** Whether any table is still pinned (leak detector for tests). */
  pinnedCount(): number {
    return this.slots.reduce((n, s) => n + (s.pins > 0 ? 1 : 0), 0);
  }
}
