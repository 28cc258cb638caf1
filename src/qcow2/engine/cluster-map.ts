/**
 * Guest → host mapping and its updates (QEMU's qcow2-cluster.c): getHostOffset-style lookups for
 * reads, allocation + COW + linkL2 for writes, L1 growth; zero writes, discard and shrink are
 * cluster-discard.ts.
 *
 * Write ordering enforced here (DESIGN §4):
 * 1. guest data reaches the file before the L2 entry that points at it: after data is written to new
 *    clusters the L2 cache `dependsOnFlush()`, so the next L2 writeback fdatasyncs first. The one
 *    exception is `linkZeroedBeforeData` (see there): clusters that read as zero on disk may be
 *    linked first in place of entries that read as zero, since that exposes nothing but zeros;
 * 2. refcount increments are durable before L2/L1 references: the L2 cache `dependsOn(refcount cache)`
 *    whenever an entry referencing a newly allocated cluster is dirtied (skipped with lazy refcounts,
 *    where the dirty bit makes a crash trigger a repair instead); new L2 tables are flushed (with their
 *    refcounts) before the L1 entry pointing at them is written;
 * 3. on free, the reference is removed first: the refcount cache `dependsOn(L2 cache)` before any
 *    decrement, and a freed cluster's refcount drops only after in-flight I/O on it has drained.
 * Every method that touches tables runs under the image's metadata lock (the caller takes it).
 */
import type { HostFile } from '../../io/host-file.js';
import type { Geometry } from '../format/geometry.js';
import type { MetadataKind, MetadataMap } from './overlap.js';
import type { Refcounts } from './refcount.js';
import type { TableCache, TableHandle } from './table-cache.js';
import {
  clusterKind, compressedClusterRange, decodeCompressed, decodeL1Entry, encodeL1Entry, entryHex, hasReservedBits, isCompressed,
  isCopied, l2HostOffset, makeNormalEntry, readL2Entry, subclusterKind, writeL2Entry,
  type CompressedDescriptor, type RawL2Entry,
} from '../format/l2-entry.js';

/** The in-memory L1 table (active or a snapshot's). */
export interface L1Table {
  offset: number;
  entries: number;
  buf: Buffer;
}

/** One piece of a read, as mapped. */
export type ReadSegment =
  | { kind: 'data'; guestOffset: number; bytes: number; hostOffset: number }
  | { kind: 'zero'; guestOffset: number; bytes: number }
  | { kind: 'backing'; guestOffset: number; bytes: number }
  | { kind: 'compressed'; guestOffset: number; bytes: number; descriptor: CompressedDescriptor; offsetInCluster: number };

export interface ClusterMapContext {
  image: string;
  file: HostFile;
  /** Where guest data lives: the image file, or the external data file. */
  dataFile: HostFile;
  hasDataFile: boolean;
  geometry: Geometry;
  version: 2 | 3;
  l2Cache: TableCache;
  refcountCache: TableCache;
  refcounts: Refcounts;
  metadata: MetadataMap;
  hasBacking: () => boolean;
  lazyRefcounts: () => boolean;
  signalCorruption(fatal: boolean, message: string, context: { structure: string; hostOffset?: number; index?: number; rawEntry?: string }): never;
  /** Wait until no in-flight data I/O touches [hostOffset, +bytes) of the image file. */
  waitHostIdle(hostOffset: number, bytes: number): Promise<void>;
  /** Persist a changed L1 location/size in the header. */
  writeL1Location(offset: number, entries: number): Promise<void>;
  fileBytes: () => number;
  allocBuffer(bytes: number): Buffer;
}

/** What a write must do for one run of clusters, decided under the lock. */
export interface ClusterWritePlan {
  /** First guest cluster index of the run and number of clusters. */
  firstCluster: number;
  nbClusters: number;
  /** Guest byte range of the request inside the run. */
  guestOffset: number;
  bytes: number;
  /**
   * 'direct': write in place, no metadata change; 'alloc': new host clusters then link; 'update': in
   * place then link (subcluster bits); 'linked': new host clusters already linked under the lock
   * (they read as zero, like the entries they replaced), only the data is left to write.
   */
  mode: 'direct' | 'alloc' | 'update' | 'linked';
  /** Host offset of the run's first cluster (contiguous run). */
  hostOffset: number;
  /** Old entries of the run (to free after linking, and COW sources). */
  oldEntries: RawL2Entry[];
  /** Host clusters of the run known to read as zero already (fresh, past anything ever written). */
  hostKnownZero: boolean;
}

/** Overwritten entries collected before their storage is freed in one batch (see deferFree). */
const MAX_DEFERRED_FREES = 512;

export class ClusterMap {
  readonly ctx: ClusterMapContext;
  readonly l1: L1Table;
  private readonly g: Geometry;
  /** Only an image's active map may change tables. */
  readonly writable: boolean;

  constructor(ctx: ClusterMapContext, l1: L1Table, writable: boolean) {
    this.ctx = ctx;
    this.l1 = l1;
    this.g = ctx.geometry;
    this.writable = writable;
  }

  /** Register the L1 table and every L2 table it points to in the metadata map. */
  registerMetadata(kind: 'l1' | 'snapshot-l1'): void {
    if (this.l1.entries === 0) return; // an empty L1 (size 0 image) occupies nothing
    this.ctx.metadata.add(kind, this.l1.offset, this.l1.entries * 8);
    if (kind !== 'l1') return;
    for (let i = 0; i < this.l1.entries; i++) {
      const e = decodeL1Entry(this.l1.buf, i);
      if (e.l2Offset !== 0) this.ctx.metadata.add('l2', e.l2Offset, this.g.clusterSize);
    }
  }

  /** L2 table offset for L1 index `l1Index` (0 = none), validated. */
  l2TableOffset(l1Index: number): { l2Offset: number; copied: boolean } {
    if (l1Index >= this.l1.entries) return { l2Offset: 0, copied: false };
    const e = decodeL1Entry(this.l1.buf, l1Index);
    if (e.l2Offset !== 0) {
      if (e.l2Offset % this.g.clusterSize !== 0) {
        this.ctx.signalCorruption(true, `L2 table offset ${e.l2Offset} unaligned (L1 index ${l1Index})`, { structure: 'l1', hostOffset: this.l1.offset + l1Index * 8, index: l1Index });
      }
      if (e.l2Offset + this.g.clusterSize > this.ctx.fileBytes()) {
        this.ctx.signalCorruption(true, `L2 table at ${e.l2Offset} lies past the end of the file (L1 index ${l1Index})`, { structure: 'l1', hostOffset: this.l1.offset + l1Index * 8, index: l1Index });
      }
    }
    return { l2Offset: e.l2Offset, copied: e.copied };
  }

  private sliceOffset(l2Offset: number, guestOffset: number): number {
    return l2Offset + this.g.l2SliceIndex(guestOffset) * this.g.l2SliceBytes;
  }

  /** Validate an entry read from an L2 table as QEMU does on access. */
  checkEntry(e: RawL2Entry, l2Offset: number, index: number): void {
    const kind = clusterKind(e, this.g, this.ctx.hasDataFile);
    // Built only when reporting: checkEntry runs for every entry of every request.
    const at = () => ({ structure: 'l2', hostOffset: l2Offset + index * this.g.l2EntryBytes, index, rawEntry: entryHex(e.hi, e.lo) });
    if (kind === 'compressed') {
      if (this.ctx.hasDataFile) this.ctx.signalCorruption(true, 'compressed cluster in an image with an external data file', at());
      const d = decodeCompressed(e, this.g);
      if (d.hostOffset + 1 > this.ctx.fileBytes()) {
        this.ctx.signalCorruption(true, `compressed cluster at ${d.hostOffset} lies past the end of the file`, at());
      }
      return;
    }
    if (kind === 'zero-plain' || kind === 'zero-alloc') {
      if (this.ctx.version < 3) this.ctx.signalCorruption(true, 'zero cluster entry in a pre-v3 image', at());
    }
    if (kind === 'normal' || kind === 'zero-alloc') {
      const host = l2HostOffset(e);
      if (host % this.g.clusterSize !== 0) {
        this.ctx.signalCorruption(true, `cluster allocation offset ${host} unaligned (L2 offset ${l2Offset}, index ${index})`, at());
      }
      if (!this.ctx.hasDataFile && host + 1 > this.ctx.fileBytes() && kind === 'normal') {
        this.ctx.signalCorruption(true, `data cluster at ${host} lies past the end of the file`, at());
      }
    }
    if (this.g.extendedL2 && (kind === 'normal' || kind === 'unallocated')) {
      if (subclusterKind(e, 0, this.g, this.ctx.hasDataFile) === 'invalid') {
        this.ctx.signalCorruption(true, 'invalid subcluster allocation bitmap', at());
      }
    }
    if (hasReservedBits(e, this.g) && kind !== 'unallocated') {
      // QEMU tolerates reserved bits on access; check reports them. Nothing to do here.
    }
  }

  /**
   * Map [guestOffset, +bytes) into read segments, stopping at the end of the L2 slice (returns the
   * bytes covered). Adjacent clusters of the same kind and contiguous host offsets are merged.
   */
  async mapForRead(guestOffset: number, bytes: number, out: ReadSegment[]): Promise<number> {
    const g = this.g;
    const sliceCoverage = g.l2SliceEntries * g.clusterSize;
    const sliceEnd = guestOffset - (guestOffset % sliceCoverage) + sliceCoverage;
    const end = Math.min(guestOffset + bytes, sliceEnd);
    const { l2Offset } = this.l2TableOffset(g.l1Index(guestOffset));
    if (l2Offset === 0) {
      push(out, { kind: this.ctx.hasBacking() ? 'backing' : 'zero', guestOffset, bytes: end - guestOffset });
      return end - guestOffset;
    }
    const h = await this.ctx.l2Cache.get(this.sliceOffset(l2Offset, guestOffset));
    try {
      let pos = guestOffset;
      while (pos < end) {
        const indexInSlice = g.l2IndexInSlice(pos);
        const e = readL2Entry(h.buf, indexInSlice, g);
        this.checkEntry(e, h.offset, indexInSlice);
        const clusterStart = g.startOfCluster(pos);
        const stepEnd = Math.min(end, clusterStart + g.clusterSize);
        if (isCompressed(e)) {
          if (g.extendedL2 && (e.allocBitmap !== 0 || e.zeroBitmap !== 0)) {
            this.ctx.signalCorruption(true, 'compressed cluster with a subcluster bitmap', { structure: 'l2', hostOffset: h.offset + indexInSlice * g.l2EntryBytes, index: indexInSlice });
          }
          out.push({ kind: 'compressed', guestOffset: pos, bytes: stepEnd - pos, descriptor: decodeCompressed(e, g), offsetInCluster: pos - clusterStart });
          pos = stepEnd;
          continue;
        }
        // Walk subclusters (one per cluster without extended L2).
        while (pos < stepEnd) {
          const sc = g.extendedL2 ? g.subclusterIndex(pos) : 0;
          const scEnd = g.extendedL2 ? Math.min(stepEnd, clusterStart + (sc + 1) * g.subclusterSize) : stepEnd;
          const kind = subclusterKind(e, sc, g, this.ctx.hasDataFile);
          const n = scEnd - pos;
          if (kind === 'normal') push(out, { kind: 'data', guestOffset: pos, bytes: n, hostOffset: l2HostOffset(e) + (pos - clusterStart) });
          else if (kind === 'zero') push(out, { kind: 'zero', guestOffset: pos, bytes: n });
          else push(out, { kind: this.ctx.hasBacking() ? 'backing' : 'zero', guestOffset: pos, bytes: n });
          pos = scEnd;
        }
      }
      return end - guestOffset;
    } finally {
      this.ctx.l2Cache.release(h);
    }
  }

  // ------------------------------------------------------------------ writes

  /**
   * Get the L2 slice for `guestOffset` ready for modification: allocates the L2 table when the L1
   * entry is empty, copies it when it is shared with a snapshot (L1 COPIED clear). Grows L1 as needed.
   */
  async getL2SliceForWrite(guestOffset: number): Promise<TableHandle> {
    const g = this.g;
    const l1Index = g.l1Index(guestOffset);
    if (l1Index >= this.l1.entries) await this.growL1(l1Index + 1);
    const { l2Offset, copied } = this.l2TableOffset(l1Index);
    if (l2Offset !== 0 && copied) return this.ctx.l2Cache.get(this.sliceOffset(l2Offset, guestOffset));
    const newL2Offset = await this.ctx.refcounts.allocClusters(1);
    this.assertNoOverlap(newL2Offset, g.clusterSize, 'l2');
    const table = this.ctx.allocBuffer(g.clusterSize);
    table.fill(0);
    const nbSlices = g.l2Entries / g.l2SliceEntries;
    if (l2Offset !== 0) {
      // Copy the shared table as it is now: write its dirty slices first, then read it from the file.
      for (let s = 0; s < nbSlices; s++) await this.ctx.l2Cache.writeOne(l2Offset + s * g.l2SliceBytes);
      const n = await this.ctx.file.pread(table, l2Offset, 'l2');
      if (n < g.clusterSize) table.fill(0, n);
    }
    for (let s = 0; s < nbSlices; s++) this.ctx.l2Cache.discard(newL2Offset + s * g.l2SliceBytes);
    await this.ctx.file.pwrite(table, newL2Offset, 'l2');
    this.ctx.metadata.add('l2', newL2Offset, g.clusterSize);
    // The table and its refcount must be durable before the L1 entry points to it.
    await this.ctx.refcountCache.flush();
    await this.ctx.file.fdatasync();
    encodeL1Entry(this.l1.buf, l1Index, newL2Offset, true);
    await this.writeL1Entry(l1Index);
    if (l2Offset !== 0) {
      // The old table stays referenced by the snapshot; drop our reference — only once the L1 entry
      // no longer points to it on disk (QEMU's qcow2_write_l1_entry syncs): the refcount cache's
      // dependency on the L2 cache does not cover this direct L1 write.
      await this.ctx.file.fdatasync();
      await this.freeHostClusters(l2Offset, g.clusterSize);
    }
    return this.ctx.l2Cache.get(this.sliceOffset(newL2Offset, guestOffset));
  }

  async writeL1Entry(l1Index: number): Promise<void> {
    const first = l1Index - (l1Index % 64);
    const last = Math.min(this.l1.entries, first + 64);
    this.assertNoOverlap(this.l1.offset + first * 8, (last - first) * 8, 'l1');
    await this.ctx.file.pwrite(this.l1.buf.subarray(first * 8, last * 8), this.l1.offset + first * 8, 'l1');
  }

  /** Refuse a write onto live metadata of another kind (pre-write overlap check). */
  assertNoOverlap(hostOffset: number, bytes: number, target: 'data' | MetadataKind): void {
    if (target === 'data' && this.ctx.hasDataFile) return; // data goes to the external file
    const hit = this.ctx.metadata.overlaps(hostOffset, bytes, target === 'data' ? undefined : target);
    if (hit) {
      this.ctx.signalCorruption(true, `preventing write of ${bytes} bytes at ${hostOffset}: it overlaps ${hit.kind} metadata at ${hit.clusterOffset}`, { structure: hit.kind, hostOffset });
    }
  }

  /**
   * Grow the active L1 table to at least `minEntries` (QEMU's qcow2_grow_l1_table): the new table is
   * written and synced at a new place, then the header switches to it, then the old one is freed.
   */
  async growL1(minEntries: number): Promise<void> {
    const g = this.g;
    if (minEntries <= this.l1.entries) return;
    if (minEntries > g.maxL1Entries) {
      this.ctx.signalCorruption(false, `L1 table would need ${minEntries} entries (limit ${g.maxL1Entries})`, { structure: 'l1' });
    }
    let newEntries = Math.max(minEntries, Math.ceil(this.l1.entries * 1.5));
    newEntries = Math.min(newEntries, g.maxL1Entries);
    const bytes = newEntries * 8;
    const nbClusters = g.sizeToClusters(bytes);
    const newOffset = await this.ctx.refcounts.allocClusters(nbClusters);
    this.assertNoOverlap(newOffset, nbClusters * g.clusterSize, 'l1');
    const buf = Buffer.alloc(nbClusters * g.clusterSize);
    this.l1.buf.copy(buf, 0, 0, this.l1.entries * 8);
    await this.ctx.refcountCache.flush();
    await this.ctx.file.pwrite(buf.subarray(0, bytes), newOffset, 'l1');
    await this.ctx.file.fdatasync();
    const oldOffset = this.l1.offset;
    const oldBytes = this.l1.entries * 8;
    await this.ctx.writeL1Location(newOffset, newEntries);
    if (oldBytes > 0) this.ctx.metadata.remove(oldOffset, oldBytes);
    this.l1.offset = newOffset;
    this.l1.entries = newEntries;
    this.l1.buf = buf;
    this.ctx.metadata.add('l1', newOffset, bytes);
    if (oldBytes > 0) await this.freeHostClusters(oldOffset, g.sizeToClusters(oldBytes) * g.clusterSize);
  }

  /**
   * Drop one reference from host clusters [hostOffset, +bytes) after their L2/L1 reference is gone:
   * the refcount cache first depends on the L2 cache (reference removal reaches the disk first), and
   * in-flight I/O on those clusters drains before the refcount drops.
   */
  async freeHostClusters(hostOffset: number, bytes: number): Promise<void> {
    await this.ctx.refcountCache.dependsOn(this.ctx.l2Cache);
    await this.ctx.waitHostIdle(hostOffset, bytes);
    await this.ctx.refcounts.freeClusters(hostOffset, bytes);
  }

  /** Overwritten entries whose storage is still referenced by its refcount (see deferFree). */
  private deferredFrees: RawL2Entry[] = [];

  /**
   * Release an overwritten entry's storage later, with a batch of others. Dropping a refcount must
   * wait for the L2 update that removed the reference (refcount cache depends on L2 cache), while the
   * next allocation's L2 update waits for its refcount (L2 depends on refcounts): freeing at once
   * after every overwrite flushes both caches — two fdatasyncs — per rewritten cluster. Until the
   * batch goes, the old storage keeps its refcount: a crash leaks it, nothing can reuse it.
   */
  private async deferFree(e: RawL2Entry): Promise<void> {
    if (isCompressed(e) || l2HostOffset(e) !== 0) this.deferredFrees.push(e);
    if (this.deferredFrees.length >= MAX_DEFERRED_FREES) await this.releaseDeferredFrees();
  }

  /** Free the storage of every deferred entry (under the metadata lock; before a flush completes). */
  async releaseDeferredFrees(): Promise<void> {
    while (this.deferredFrees.length > 0) {
      const batch = this.deferredFrees;
      this.deferredFrees = [];
      for (const e of batch) await this.freeEntry(e);
    }
  }

  /** Release whatever host storage an old L2 entry held (normal, preallocated zero, compressed). */
  async freeEntry(e: RawL2Entry): Promise<void> {
    if (isCompressed(e)) {
      const d = decodeCompressed(e, this.g);
      const { firstHostCluster, lastHostCluster } = compressedClusterRange(d, this.g);
      await this.freeHostClusters(firstHostCluster * this.g.clusterSize, (lastHostCluster - firstHostCluster + 1) * this.g.clusterSize);
      return;
    }
    if (this.ctx.hasDataFile) return; // external data file clusters are not refcounted
    const kind = clusterKind(e, this.g, false);
    if (kind === 'normal' || kind === 'zero-alloc') await this.freeHostClusters(l2HostOffset(e), this.g.clusterSize);
  }

  /**
   * Decide how to write [guestOffset, +bytes) for the clusters of one L2 slice. Returns plans for
   * consecutive runs; new host clusters are allocated here (refcount 1, not yet linked). `busy`
   * tells which guest clusters another request is allocating: planning stops before them.
   */
  async planWrite(guestOffset: number, bytes: number, busy: (clusterIndex: number, exclusive: boolean) => boolean, knownZeroFrom: () => number): Promise<ClusterWritePlan[]> {
    const g = this.g;
    const sliceCoverage = g.l2SliceEntries * g.clusterSize;
    const end = Math.min(guestOffset + bytes, guestOffset - (guestOffset % sliceCoverage) + sliceCoverage);
    const h = await this.getL2SliceForWrite(guestOffset);
    const plans: ClusterWritePlan[] = [];
    try {
      let pos = guestOffset;
      while (pos < end) {
        const cluster = g.clusterIndex(pos);
        const indexInSlice = g.l2IndexInSlice(pos);
        const e = readL2Entry(h.buf, indexInSlice, g);
        this.checkEntry(e, h.offset, indexInSlice);
        const clusterStart = cluster * g.clusterSize;
        const stepEnd = Math.min(end, clusterStart + g.clusterSize);
        const mode = this.writeMode(e, pos - clusterStart, stepEnd - clusterStart);
        if (busy(cluster, mode !== 'direct')) break;
        const last = plans[plans.length - 1];
        const hostOffset = mode === 'alloc' ? -1 : this.ctx.hasDataFile ? clusterStart : l2HostOffset(e);
        if (last && last.mode === mode && last.firstCluster + last.nbClusters === cluster
            && (mode === 'alloc' || last.hostOffset + last.nbClusters * g.clusterSize === hostOffset)) {
          last.nbClusters++;
          last.bytes += stepEnd - pos;
          last.oldEntries.push(e);
        } else {
          plans.push({ firstCluster: cluster, nbClusters: 1, guestOffset: pos, bytes: stepEnd - pos, mode, hostOffset, oldEntries: [e], hostKnownZero: false });
        }
        pos = stepEnd;
      }
    } finally {
      this.ctx.l2Cache.release(h);
    }
    for (const plan of plans) {
      if (plan.mode !== 'alloc') continue;
      if (this.ctx.hasDataFile) {
        plan.hostOffset = plan.firstCluster * g.clusterSize;
        continue;
      }
      const zeroFrom = knownZeroFrom();
      plan.hostOffset = await this.ctx.refcounts.allocClusters(plan.nbClusters);
      plan.hostKnownZero = plan.hostOffset >= zeroFrom;
      this.assertNoOverlap(plan.hostOffset, plan.nbClusters * g.clusterSize, 'data');
    }
    return plans;
  }

  /** How a write of [start, end) (offsets inside the cluster) can go into a cluster with entry `e`. */
  private writeMode(e: RawL2Entry, start: number, end: number): ClusterWritePlan['mode'] {
    const g = this.g;
    const kind = clusterKind(e, g, this.ctx.hasDataFile);
    if (this.ctx.hasDataFile) {
      // Data lives at the guest offset in the external file: only the entry may need to change.
      if (kind !== 'normal') return 'update';
      if (!g.extendedL2) return 'direct';
    } else if (kind !== 'normal' || !isCopied(e)) {
      return 'alloc';
    }
    if (!g.extendedL2) return 'direct';
    const first = Math.floor(start / g.subclusterSize);
    const last = Math.floor((end - 1) / g.subclusterSize);
    for (let sc = first; sc <= last; sc++) {
      if (subclusterKind(e, sc, g, this.ctx.hasDataFile) !== 'normal') return 'update';
    }
    return 'direct';
  }

  /**
   * Link written clusters (QEMU's qcow2_alloc_cluster_link_l2): set their new entries, then release
   * what the old entries held. Data was written before this is called.
   */
  async linkL2(plan: ClusterWritePlan, newEntries: RawL2Entry[]): Promise<void> {
    const g = this.g;
    const firstGuest = plan.firstCluster * g.clusterSize;
    const h = await this.getL2SliceForWrite(firstGuest);
    try {
      if (!this.ctx.lazyRefcounts() && plan.mode === 'alloc') await this.ctx.l2Cache.dependsOn(this.ctx.refcountCache);
      this.ctx.l2Cache.dependsOnFlush();
      for (let i = 0; i < plan.nbClusters; i++) {
        writeL2Entry(h.buf, g.l2IndexInSlice(firstGuest + i * g.clusterSize), g, newEntries[i]);
      }
      this.ctx.l2Cache.markDirty(h);
    } finally {
      await this.ctx.l2Cache.put(h);
    }
    if (plan.mode === 'alloc') {
      for (const old of plan.oldEntries) await this.deferFree(old);
    }
  }

  /**
   * Link a compressed chunk as the entry of guest cluster `clusterIndex` (its refcounts are already
   * counted) and release what the old entry held.
   */
  async linkCompressed(clusterIndex: number, entry: RawL2Entry): Promise<void> {
    const guestOffset = clusterIndex * this.g.clusterSize;
    const h = await this.getL2SliceForWrite(guestOffset);
    let old: RawL2Entry;
    try {
      const index = this.g.l2IndexInSlice(guestOffset);
      old = readL2Entry(h.buf, index, this.g);
      this.checkEntry(old, h.offset, index);
      if (!this.ctx.lazyRefcounts()) await this.ctx.l2Cache.dependsOn(this.ctx.refcountCache);
      this.ctx.l2Cache.dependsOnFlush();
      writeL2Entry(h.buf, index, this.g, entry);
      this.ctx.l2Cache.markDirty(h);
    } finally {
      await this.ctx.l2Cache.put(h);
    }
    await this.deferFree(old);
  }

  /**
   * Link an 'alloc' plan's new clusters before its data is written, when that is as safe as the
   * usual order: the caller guarantees the new host clusters read as zero durably (preallocated
   * with fallocate inside the file, never written since; the fdatasync that precedes any L2
   * writeback persists the preallocation), and every old entry reads as zero (unallocated without a
   * backing file, or a zero cluster), standard L2 only. A crash then shows zeros where the guest saw
   * zeros, and a failed data write leaves the cluster allocated and zero — nothing to undo. The gain:
   * other writes to the cluster go straight to it instead of waiting for the allocation (with 64
   * sequential 4 KiB writes in flight, 15 of every 16 waited a device round trip).
   * Returns whether it linked (the plan is then 'linked').
   */
  async linkZeroedBeforeData(plan: ClusterWritePlan): Promise<boolean> {
    const g = this.g;
    if (plan.mode !== 'alloc' || !plan.hostKnownZero || g.extendedL2 || this.ctx.hasDataFile) return false;
    for (const e of plan.oldEntries) {
      const kind = clusterKind(e, g, false);
      if (kind !== 'zero-plain' && kind !== 'zero-alloc' && (kind !== 'unallocated' || this.ctx.hasBacking())) return false;
    }
    const newEntries = plan.oldEntries.map((_, i) => makeNormalEntry(plan.hostOffset + i * g.clusterSize, true));
    await this.linkL2(plan, newEntries);
    plan.mode = 'linked';
    return true;
  }

  /** Undo an allocation whose data write failed: the clusters were never linked. */
  async abortAlloc(plan: ClusterWritePlan): Promise<void> {
    if (plan.mode === 'alloc' && !this.ctx.hasDataFile) {
      await this.ctx.refcounts.freeClusters(plan.hostOffset, plan.nbClusters * this.g.clusterSize);
    }
  }

  /** Every L2 table offset referenced by this L1 (for layout and check). */
  l2Tables(): { l1Index: number; l2Offset: number }[] {
    const tables: { l1Index: number; l2Offset: number }[] = [];
    for (let i = 0; i < this.l1.entries; i++) {
      const e = decodeL1Entry(this.l1.buf, i);
      if (e.l2Offset !== 0) tables.push({ l1Index: i, l2Offset: e.l2Offset });
    }
    return tables;
  }


}

function push(out: ReadSegment[], seg: ReadSegment): void {
  const last = out[out.length - 1];
  if (last && last.kind === seg.kind && last.guestOffset + last.bytes === seg.guestOffset && seg.kind !== 'compressed') {
    if (seg.kind === 'data' && last.kind === 'data') {
      if (last.hostOffset + last.bytes !== seg.hostOffset) { out.push(seg); return; }
    }
    last.bytes += seg.bytes;
    return;
  }
  out.push(seg);
}

/**
 * The L2 entry a cluster gets after a write of [start, end) (offsets in the cluster) into host
 * cluster `hostOffset`: COPIED set; with extended L2 the touched subclusters become allocated
 * and, when the cluster moved, previously allocated ones stay allocated (their data was copied).
 */
export function newEntryAfterWrite(g: Geometry, hasDataFile: boolean, old: RawL2Entry, hostOffset: number, start: number, end: number): RawL2Entry {
  if (!g.extendedL2) return makeNormalEntry(hostOffset, true);
  let alloc = 0;
  let zero = 0;
  if (!isCompressed(old)) {
    const kind = clusterKind(old, g, hasDataFile);
    alloc = kind === 'normal' ? old.allocBitmap : 0;
    zero = old.zeroBitmap;
  } else {
    alloc = 0xffffffff;
  }
  const first = Math.floor(start / g.subclusterSize);
  const last = Math.floor((end - 1) / g.subclusterSize);
  for (let sc = first; sc <= last; sc++) {
    alloc = (alloc | (1 << sc)) >>> 0;
    zero = (zero & ~(1 << sc)) >>> 0;
  }
  return makeNormalEntry(hostOffset, true, alloc, zero);
}
