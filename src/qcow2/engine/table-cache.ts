/**
 * TableCache: the metadata cache for L2 tables (or slices) and refcount blocks (seeds 003, 004).
 *
 * - Fixed slots of table-sized buffers cut from one allocation (no per-slot object or allocation to
 *   chase on a miss: with a constant-cost file, a miss at 65 536 slots costs 1.4× one at 64, 1.6× with a
 *   buffer per slot); each slot {offset, pins, dirty, lru}.
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
import type { HostFile, WritePoint } from '../../io/host-file.js';
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
  /**
   * Allocate the slots' memory: called once for nbSlots × tableBytes (aligned for O_DIRECT where
   * needed); slot i is the i-th tableBytes of it.
   */
  allocBuffer: (bytes: number) => Buffer;
  /** Called before a table is written back; throws to refuse (overlap check). */
  beforeWrite?: (offset: number, bytes: number) => void;
  /** Probe window; default min(nbSlots, 16). */
  probeSlots?: number;
  /** Write every dirty table as soon as it is put (cache=writethrough). */
  writethrough?: boolean;
}


const STATE_STRIDE = 2;
const LRU = 0;
const PINS = 1;

export class TableCache {
  readonly name: string;
  readonly tableBytes: number;
  readonly nbSlots: number;
  private readonly file: HostFile;
  // Slot state in typed arrays, so lookups cost about the same at 64 and 65 536 slots: the probe loop
  // reads contiguous offsets (16 slots = two cache lines), not scattered objects; a slot's LRU stamp
  // and pin count share a cache line (both change on every get/put; a victim scan reads 4 lines).
  /** Host offset of the table in each slot, -1 when empty. */
  private readonly offsets: Float64Array;
  /** Per slot, STATE_STRIDE numbers: [LRU stamp, pins]. */
  private readonly state: Float64Array;
  private readonly dirty: Uint8Array;
  private readonly bufs: Buffer[];
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
    this.offsets = new Float64Array(this.nbSlots).fill(-1);
    this.state = new Float64Array(this.nbSlots * STATE_STRIDE);
    this.dirty = new Uint8Array(this.nbSlots);
    const arena = options.allocBuffer(this.nbSlots * this.tableBytes);
    this.bufs = [];
    for (let i = 0; i < this.nbSlots; i++) this.bufs.push(arena.subarray(i * this.tableBytes, (i + 1) * this.tableBytes));
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
      if (this.offsets[s] === offset) return s;
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
      if (this.state[s * STATE_STRIDE + PINS] !== 0) continue;
      if (this.offsets[s] === -1) return s;
      if (this.state[s * STATE_STRIDE + LRU] < bestLru) {
        best = s;
        bestLru = this.state[s * STATE_STRIDE + LRU];
      }
    }
    if (best === -1) throw new Error(`${this.name} cache: every slot of the probe window is pinned (internal error)`);
    return best;
  }

  private async claim(offset: number, read: boolean): Promise<TableHandle> {
    const s = this.victim(offset);
    if (this.offsets[s] !== -1) {
      this.stats.evictions++;
      if (this.dirty[s]) await this.writeSlot(s);
      // We hold the metadata lock: nobody pinned or reloaded the victim while it was written.
      this.offsets[s] = -1;
    }
    this.state[s * STATE_STRIDE + PINS] = 1;
    const buf = this.bufs[s];
    if (read) {
      try {
        const n = await this.file.pread(buf, offset, this.writePoint);
        if (n < this.tableBytes) buf.fill(0, n);
      } catch (err) {
        this.state[s * STATE_STRIDE + PINS] = 0;
        throw err;
      }
    } else {
      buf.fill(0);
    }
    this.offsets[s] = offset;
    this.state[s * STATE_STRIDE + LRU] = ++this.lruCounter;
    trace('%s: load %d into slot %d', this.name, offset, s);
    return { slot: s, offset, buf };
  }

  /** Pin the table at host `offset`, reading it on a miss. */
  async get(offset: number): Promise<TableHandle> {
    const s = this.lookup(offset);
    if (s >= 0) {
      this.stats.hits++;
      this.state[s * STATE_STRIDE + PINS]++;
      return { slot: s, offset, buf: this.bufs[s] };
    }
    this.stats.misses++;
    return this.claim(offset, true);
  }

  /** Pin a zero-filled table for `offset` without reading (a freshly allocated table). */
  async getEmpty(offset: number): Promise<TableHandle> {
    const s = this.lookup(offset);
    if (s >= 0) {
      this.state[s * STATE_STRIDE + PINS]++;
      const buf = this.bufs[s];
      buf.fill(0);
      return { slot: s, offset, buf };
    }
    return this.claim(offset, false);
  }

  /** Unpin. O(1). In writethrough mode a dirty table is written now. */
  async put(handle: TableHandle): Promise<void> {
    const s = handle.slot;
    this.state[s * STATE_STRIDE + PINS]--;
    this.state[s * STATE_STRIDE + LRU] = ++this.lruCounter;
    if (this.writethrough && this.dirty[s] && this.state[s * STATE_STRIDE + PINS] === 0) await this.writeSlot(s);
  }

  /** Synchronous unpin without writethrough (for hot read paths that never dirty). */
  release(handle: TableHandle): void {
    this.state[handle.slot * STATE_STRIDE + PINS]--;
    this.state[handle.slot * STATE_STRIDE + LRU] = ++this.lruCounter;
  }

  markDirty(handle: TableHandle): void {
    if (!this.dirty[handle.slot]) {
      this.dirty[handle.slot] = 1;
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

  private async writeSlot(s: number): Promise<void> {
    if (this.depends) {
      await this.flushDependency();
    } else if (this.dependsOnFlushFlag) {
      await this.file.fdatasync();
      this.dependsOnFlushFlag = false;
    }
    if (!this.dirty[s]) return; // written meanwhile
    const offset = this.offsets[s];
    this.beforeWrite?.(offset, this.tableBytes);
    await this.file.pwrite(this.bufs[s], offset, this.writePoint);
    this.stats.writes++;
    if (this.offsets[s] === offset && this.dirty[s]) {
      this.dirty[s] = 0;
      this.nbDirty--;
    }
    trace('%s: wrote %d', this.name, offset);
  }

  /** Write every dirty table (in host order) without syncing. */
  async writeDirty(): Promise<void> {
    if (this.nbDirty === 0) return;
    const dirty: number[] = [];
    for (let s = 0; s < this.nbSlots; s++) if (this.dirty[s]) dirty.push(s);
    dirty.sort((a, b) => this.offsets[a] - this.offsets[b]);
    for (const s of dirty) await this.writeSlot(s);
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
    if (s >= 0 && this.dirty[s]) await this.writeSlot(s);
  }

  /** Forget a table without writing it (its cluster was freed). */
  discard(offset: number): void {
    const s = this.lookup(offset);
    if (s < 0) return;
    if (this.dirty[s]) this.nbDirty--;
    this.dirty[s] = 0;
    this.offsets[s] = -1;
  }

  /** Drop every clean, unpinned table (e.g. after an external change); dirty ones stay. */
  invalidateClean(): void {
    for (let s = 0; s < this.nbSlots; s++) if (!this.dirty[s] && this.state[s * STATE_STRIDE + PINS] === 0) this.offsets[s] = -1;
  }

  /** Number of slots still pinned (leak detector for tests). */
  pinnedCount(): number {
    let n = 0;
    for (let s = 0; s < this.nbSlots; s++) if (this.state[s * STATE_STRIDE + PINS] > 0) n++;
    return n;
  }
}
