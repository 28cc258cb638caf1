/**
 * Refcounts: the refcount table (kept in memory), refcount blocks (through the refcount TableCache),
 * the cluster allocator and refcount updates — the counterpart of QEMU's qcow2-refcount.c.
 *
 * Crash safety, enforced here:
 * - a new refcount block is written and fdatasync'ed before the refcount table entry that points to it;
 * - a grown refcount table (with the refcount blocks describing it) is durable before the header
 *   points to it, and the old table is freed only afterwards (a crash leaks, never corrupts);
 * - increments reach the disk through the refcount cache, and the L2 cache depends on it (set by the
 *   caller that links the cluster), so a refcount is durable before any reference to its cluster.
 * All methods are called with the image's metadata lock held.
 */
import type { HostFile } from '../../io/host-file.js';
import type { Geometry } from '../format/geometry.js';
import type { MetadataMap } from './overlap.js';
import { decodeReftableEntry, encodeReftableEntry, getRefcount, setRefcount } from '../format/refcount-block.js';
import { readU64 } from '../format/safe-int.js';
import type { TableCache } from './table-cache.js';
import { QCOW_MAX_REFTABLE_SIZE_BYTES } from '../format/constants.js';
import { Qcow2InvalidError } from '../format/errors.js';
import debugFactory from 'debug';

const trace = debugFactory('qcow2fuse:refcount');

/** 64 empty refcount table entries, to find runs of them with one compare. */
const ZERO_ENTRIES = Buffer.alloc(512);

export interface RefcountContext {
  image: string;
  file: HostFile;
  geometry: Geometry;
  cache: TableCache;
  metadata: MetadataMap;
  /** Throws a Qcow2CorruptError (see corruption.ts). */
  signalCorruption(fatal: boolean, message: string, context: { structure: string; hostOffset?: number; index?: number }): never;
  /** Point the header at a new refcount table (durably). */
  writeReftableLocation(offset: number, clusters: number): Promise<void>;
  /** Size of the image file now: a refcount block past its end is corruption (it is written before it is referenced). */
  fileBytes?: () => number;
  /** Called when clusters drop to refcount 0 (drop caches, queue the hole punch). */
  onClustersFreed(hostOffset: number, nbClusters: number): void;
  /** Called when free clusters are taken again (cancel a queued hole punch on them). */
  onClustersAllocated(hostOffset: number, nbClusters: number): void;
  allocBuffer(bytes: number): Buffer;
}

export class Refcounts {
  private readonly ctx: RefcountContext;
  private readonly geometry: Geometry;
  /** Refcount block offsets by reftable index (0 = none). */
  reftable: number[] = [];
  reftableOffset = 0;
  reftableClusters = 0;
  /** No cluster below this index is free (QEMU's free_cluster_index). */
  private freeClusterIndex = 0;

  constructor(ctx: RefcountContext) {
    this.ctx = ctx;
    this.geometry = ctx.geometry;
  }

  /** Read the refcount table at `offset` (`clusters` long) and register it and its blocks as metadata. */
  async load(offset: number, clusters: number): Promise<void> {
    const bytes = clusters * this.geometry.clusterSize;
    const buf = Buffer.alloc(bytes);
    const n = await this.ctx.file.pread(buf, offset, 'reftable');
    if (n < bytes) buf.fill(0, n);
    this.reftableOffset = offset;
    this.reftableClusters = clusters;
    this.reftable = [];
    this.allocatedClusters = undefined;
    const entries = bytes / 8;
    for (let i = 0; i < entries; i++) {
      // Runs of empty entries (most of a large table) are skipped 64 at a time with a native compare.
      if (i % 64 === 0 && i + 64 <= entries && buf.compare(ZERO_ENTRIES, 0, 512, i * 8, i * 8 + 512) === 0) {
        for (let k = 0; k < 64; k++) this.reftable.push(0);
        i += 63;
        continue;
      }
      // As QEMU: reserved bits are ignored here, a bad offset is corruption where the block is used
      // (-1 stands for one beyond 2^53); check reports both.
      if (buf.readUInt32BE(i * 8) === 0 && buf.readUInt32BE(i * 8 + 4) === 0) {
        this.reftable.push(0);
        continue;
      }
      const e = decodeReftableEntry(buf, i);
      this.reftable.push(e.invalid && e.refblockOffset === 0 && readU64(buf, i * 8) > 0x1ffn ? -1 : e.refblockOffset);
    }
    // Trailing zero entries beyond the last used one are kept: the table's size is what is on disk.
    this.ctx.metadata.add('reftable', offset, bytes);
    for (const block of this.reftable) if (block > 0) this.ctx.metadata.add('refblock', block, this.geometry.clusterSize);
  }

  private checkBlockOffset(reftableIndex: number, blockOffset: number, fileBytes: number | undefined): void {
    if (fileBytes !== undefined && blockOffset + this.geometry.clusterSize > fileBytes) {
      this.ctx.signalCorruption(true, `refcount block at ${blockOffset} lies past the end of the file (reftable index ${reftableIndex})`, { structure: 'refblock', hostOffset: blockOffset, index: reftableIndex });
    }
    if (blockOffset === 0 || blockOffset % this.geometry.clusterSize !== 0) {
      this.ctx.signalCorruption(true, `refcount block offset ${blockOffset} invalid (reftable index ${reftableIndex})`, { structure: 'reftable', hostOffset: this.reftableOffset + reftableIndex * 8, index: reftableIndex });
    }
  }

  /** Refcount of host cluster `clusterIndex` (0 when no refcount block covers it). */
  async getRefcount(clusterIndex: number): Promise<number> {
    const ri = this.geometry.reftableIndex(clusterIndex);
    const block = this.reftable[ri] ?? 0;
    if (block === 0) return 0;
    this.checkBlockOffset(ri, block, this.ctx.fileBytes?.());
    const h = await this.ctx.cache.get(block);
    const value = getRefcount(h.buf, this.geometry.refblockIndex(clusterIndex), this.geometry.refcountOrder);
    this.ctx.cache.release(h);
    return value;
  }

  /**
   * Add `addend` to the refcount of every host cluster overlapping [hostOffset, +bytes). Refcounts that
   * would underflow or overflow are corruption. Clusters that reach 0 are reported to onClustersFreed.
   */
  async updateRefcount(hostOffset: number, bytes: number, addend: number): Promise<void> {
    if (bytes <= 0) return;
    const g = this.geometry;
    const first = g.clusterIndex(hostOffset);
    const last = g.clusterIndex(hostOffset + bytes - 1);
    let c = first;
    while (c <= last) {
      const ri = g.reftableIndex(c);
      const blockOffset = await this.ensureRefblock(ri, addend > 0 ? c : -1);
      const h = await this.ctx.cache.get(blockOffset);
      try {
        const blockEnd = Math.min(last, (ri + 1) * g.refblockEntries - 1);
        let freedStart = -1;
        for (; c <= blockEnd; c++) {
          const index = g.refblockIndex(c);
          const old = getRefcount(h.buf, index, g.refcountOrder);
          const value = old + addend;
          if (value < 0 || value > g.maxRefcount) {
            this.ctx.signalCorruption(true, `refcount of cluster ${c} would become ${value} (was ${old})`, { structure: 'refblock', hostOffset: blockOffset, index });
          }
          setRefcount(h.buf, index, g.refcountOrder, value);
          if (this.allocatedClusters !== undefined && (old === 0) !== (value === 0)) this.allocatedClusters += value === 0 ? -1 : 1;
          if (value === 0) {
            if (freedStart < 0) freedStart = c;
            if (c < this.freeClusterIndex) this.freeClusterIndex = c;
          } else if (freedStart >= 0) {
            this.ctx.onClustersFreed(freedStart * g.clusterSize, c - freedStart);
            freedStart = -1;
          }
        }
        if (freedStart >= 0) this.ctx.onClustersFreed(freedStart * g.clusterSize, c - freedStart);
        this.ctx.cache.markDirty(h);
      } finally {
        await this.ctx.cache.put(h);
      }
    }
    trace('update %d+%d by %d', hostOffset, bytes, addend);
  }

  /**
   * The refcount block for reftable index `ri`, creating it when missing. A new block is placed at
   * `selfCluster` when given (it then describes itself), else at a free cluster found by allocation.
   */
  private async ensureRefblock(ri: number, selfCluster: number): Promise<number> {
    if (ri >= this.reftable.length) await this.growReftable(ri);
    const existing = this.reftable[ri];
    if (existing !== 0) {
      this.checkBlockOffset(ri, existing, this.ctx.fileBytes?.());
      return existing;
    }
    if (selfCluster < 0) {
      this.ctx.signalCorruption(true, `refcount decrement for a cluster without a refcount block (reftable index ${ri})`, { structure: 'reftable', index: ri });
    }
    await this.createRefblock(ri, selfCluster);
    return this.reftable[ri];
  }

  /** Create the block for reftable index `ri` at cluster `atCluster` (inside its own coverage), durably. */
  private async createRefblock(ri: number, atCluster: number): Promise<void> {
    const g = this.geometry;
    const blockOffset = atCluster * g.clusterSize;
    const buf = this.ctx.allocBuffer(g.clusterSize);
    buf.fill(0);
    const selfDescribing = g.reftableIndex(atCluster) === ri;
    this.assertFree(blockOffset, g.clusterSize);
    this.ctx.onClustersAllocated(blockOffset, 1);
    if (selfDescribing) {
      setRefcount(buf, g.refblockIndex(atCluster), g.refcountOrder, 1);
      if (this.allocatedClusters !== undefined) this.allocatedClusters++;
    } else {
      // Counted by the block of its own range, durably, before the refcount table points to it.
      await this.updateRefcount(blockOffset, g.clusterSize, 1);
      await this.ctx.cache.flush();
    }
    await this.ctx.file.pwrite(buf, blockOffset, 'refblock');
    await this.ctx.file.fdatasync();
    this.reftable[ri] = blockOffset;
    const entry = Buffer.alloc(8);
    encodeReftableEntry(entry, 0, blockOffset);
    await this.ctx.file.pwrite(entry, this.reftableOffset + ri * 8, 'reftable');
    this.ctx.metadata.add('refblock', blockOffset, g.clusterSize);
    trace('new refblock %d for reftable index %d', blockOffset, ri);
  }

  private assertFree(hostOffset: number, bytes: number): void {
    const hit = this.ctx.metadata.overlaps(hostOffset, bytes);
    if (hit) {
      this.ctx.signalCorruption(true, `allocation at ${hostOffset} overlaps ${hit.kind} metadata at ${hit.clusterOffset}`, { structure: hit.kind, hostOffset });
    }
  }

  /**
   * Grow the refcount table so index `neededIndex` exists. The new table and the refcount blocks that
   * describe it go in a fresh area past everything the old table covers (all free by definition);
   * they are written and synced, then the header is switched, then the old table is freed.
   */
  private async growReftable(neededIndex: number): Promise<void> {
    const g = this.geometry;
    const oldEntries = this.reftable.length;
    const areaStart = oldEntries * g.refblockEntries; // first cluster no existing block can describe
    let newEntries = Math.max(neededIndex + 1, Math.ceil(oldEntries * 1.5), 1);
    let nbBlocks = 0;
    let tableClusters = 0;
    for (;;) {
      tableClusters = Math.ceil((newEntries * 8) / g.clusterSize);
      let blocks = nbBlocks;
      for (;;) {
        const areaEnd = areaStart + blocks + tableClusters; // exclusive
        const needed = g.reftableIndex(areaEnd - 1) - g.reftableIndex(areaStart) + 1;
        if (needed === blocks) break;
        blocks = needed;
      }
      nbBlocks = blocks;
      const lastIndex = g.reftableIndex(areaStart + nbBlocks + tableClusters - 1);
      if (lastIndex < newEntries) break;
      newEntries = lastIndex + 1;
    }
    newEntries = (tableClusters * g.clusterSize) / 8;
    if (newEntries * 8 > QCOW_MAX_REFTABLE_SIZE_BYTES) {
      throw new Qcow2InvalidError(this.ctx.image, `refcount table would exceed QEMU's limit of ${QCOW_MAX_REFTABLE_SIZE_BYTES} bytes`);
    }
    const firstIndex = g.reftableIndex(areaStart);
    const table = this.ctx.allocBuffer(tableClusters * g.clusterSize);
    table.fill(0);
    const newReftable = this.reftable.slice();
    while (newReftable.length < newEntries) newReftable.push(0);
    const areaEnd = areaStart + nbBlocks + tableClusters;
    for (let b = 0; b < nbBlocks; b++) {
      const blockCluster = areaStart + b;
      const block = this.ctx.allocBuffer(g.clusterSize);
      block.fill(0);
      const ri = firstIndex + b;
      for (let c = Math.max(areaStart, ri * g.refblockEntries); c < Math.min(areaEnd, (ri + 1) * g.refblockEntries); c++) {
        setRefcount(block, g.refblockIndex(c), g.refcountOrder, 1);
        if (this.allocatedClusters !== undefined) this.allocatedClusters++;
      }
      await this.ctx.file.pwrite(block, blockCluster * g.clusterSize, 'refblock');
      newReftable[ri] = blockCluster * g.clusterSize;
    }
    newReftable.forEach((offset, i) => encodeReftableEntry(table, i, offset));
    const tableOffset = (areaStart + nbBlocks) * g.clusterSize;
    await this.ctx.file.pwrite(table, tableOffset, 'reftable');
    await this.ctx.cache.flush(); // dirty blocks of the old table are durable before the switch
    await this.ctx.file.fdatasync();
    await this.ctx.writeReftableLocation(tableOffset, tableClusters);
    const oldOffset = this.reftableOffset;
    const oldClusters = this.reftableClusters;
    this.ctx.metadata.remove(oldOffset, oldClusters * g.clusterSize);
    this.reftable = newReftable;
    this.reftableOffset = tableOffset;
    this.reftableClusters = tableClusters;
    this.ctx.metadata.add('reftable', tableOffset, tableClusters * g.clusterSize);
    for (let b = 0; b < nbBlocks; b++) this.ctx.metadata.add('refblock', (areaStart + b) * g.clusterSize, g.clusterSize);
    trace('reftable grown to %d entries at %d', newEntries, tableOffset);
    await this.updateRefcount(oldOffset, oldClusters * g.clusterSize, -1);
  }

  /**
   * Allocate `nbClusters` contiguous free host clusters with refcount 1 (QEMU's qcow2_alloc_clusters);
   * returns the host offset of the first. Refcount blocks are created on the way as needed.
   */
  async allocClusters(nbClusters: number): Promise<number> {
    const g = this.geometry;
    let runStart = this.freeClusterIndex;
    let c = runStart;
    let sawFree = false;
    while (c - runStart < nbClusters) {
      const ri = g.reftableIndex(c);
      if (ri >= this.reftable.length) {
        await this.growReftable(ri);
        c = runStart;
        continue;
      }
      if (this.reftable[ri] === 0) {
        // The new block goes to the front of the run when there is one (the clusters before c are
        // free and described by existing blocks), else at c, describing itself. Either way the
        // run is rescanned: each missing block costs one cluster in front, so long runs converge
        // (QEMU's alloc_refcount_block + -EAGAIN restart).
        await this.createRefblock(ri, runStart < c ? runStart : c);
        c = runStart;
        continue;
      }
      const blockOffset = this.reftable[ri];
      this.checkBlockOffset(ri, blockOffset, this.ctx.fileBytes?.());
      const h = await this.ctx.cache.get(blockOffset);
      const blockEnd = (ri + 1) * g.refblockEntries;
      for (; c < blockEnd && c - runStart < nbClusters; c++) {
        if (getRefcount(h.buf, g.refblockIndex(c), g.refcountOrder) !== 0 || this.ctx.metadata.kindAt(c) !== undefined) {
          runStart = c + 1;
        } else if (!sawFree && c === runStart) {
          sawFree = true;
          this.freeClusterIndex = c;
        }
      }
      this.ctx.cache.release(h);
    }
    if (this.freeClusterIndex === runStart) this.freeClusterIndex = runStart + nbClusters;
    const hostOffset = runStart * g.clusterSize;
    this.ctx.onClustersAllocated(hostOffset, nbClusters);
    await this.updateRefcount(hostOffset, nbClusters * g.clusterSize, 1);
    trace('alloc %d clusters at %d', nbClusters, hostOffset);
    return hostOffset;
  }

  /** Drop one reference from each cluster overlapping [hostOffset, +bytes). */
  async freeClusters(hostOffset: number, bytes: number): Promise<void> {
    await this.updateRefcount(hostOffset, bytes, -1);
  }

  /**
   * Host clusters with a non-zero refcount, kept up to date by updateRefcount after one scan (so a
   * FUSE getattr asking for st_blocks costs nothing). Undefined until counted.
   */
  private allocatedClusters: number | undefined;

  /** Number of host clusters with a non-zero refcount. */
  async countAllocatedClusters(): Promise<number> {
    this.allocatedClusters ??= await this.scanAllocatedClusters();
    return this.allocatedClusters;
  }

  private async scanAllocatedClusters(): Promise<number> {
    const g = this.geometry;
    let count = 0;
    for (const block of this.reftable) {
      if (block <= 0 || block % g.clusterSize !== 0) continue;
      const h = await this.ctx.cache.get(block);
      for (let i = 0; i < g.refblockEntries; i++) if (getRefcount(h.buf, i, g.refcountOrder) !== 0) count++;
      this.ctx.cache.release(h);
    }
    return count;
  }

  /** Highest host byte offset covered by an allocated cluster + 1, scanning the refcount blocks. */
  async allocatedEnd(): Promise<number> {
    const g = this.geometry;
    for (let ri = this.reftable.length - 1; ri >= 0; ri--) {
      const block = this.reftable[ri];
      if (block <= 0 || block % g.clusterSize !== 0) continue;
      const h = await this.ctx.cache.get(block);
      try {
        for (let i = g.refblockEntries - 1; i >= 0; i--) {
          if (getRefcount(h.buf, i, g.refcountOrder) !== 0) return (ri * g.refblockEntries + i + 1) * g.clusterSize;
        }
      } finally {
        this.ctx.cache.release(h);
      }
    }
    return 0;
  }
}
