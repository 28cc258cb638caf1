/**
 * Compressed writes (seeds 000, 001; DESIGN §4 "Compressed writes"): every full guest cluster written
 * is stored compressed, with the small unaligned chunk writes gathered into whole host clusters that go
 * out with one aligned O_DIRECT write each.
 *
 * Pipeline per guest cluster:
 *   gather   partial writes collect in a cluster buffer (`pending`) until it is covered, or until it is
 *            evicted / flushed — then the gaps are filled from the cluster's current contents;
 *   compress on the threadpool (zlib raw deflate w=12 or zstd); all-zero clusters become zero or
 *            unallocated clusters, incompressible ones are written as normal clusters;
 *   place    chunks are packed byte-granular, in completion order, into an "area" of contiguous host
 *            clusters (a chunk may straddle two of them); a host cluster is written once it is full
 *            (or, padded, on flush — and rewritten whole when more chunks land in it later);
 *   link     only when every host cluster a chunk touches is written: refcounts first (each host
 *            cluster gets +1 for every chunk whose 512-byte sector range overlaps it, as `qemu-img
 *            check` counts them), then the L2 entry (the L2 cache depends on the refcount cache and on
 *            an fdatasync of the data), then the old entry's storage is released.
 * Refcounts: a host cluster's allocation reference (1) is kept as the writer's own reference while
 * the cluster can still receive chunks or has chunks not yet linked, and dropped after — so a cluster
 * whose chunks are all rewritten meanwhile can never reach 0 and be reused under the writer. A crash
 * therefore leaks at most the clusters of the open area, never corrupts.
 * At most one operation per guest cluster is in flight; a newer version waits for it, so an older
 * chunk can never be linked over a newer one. Reads of clusters still pending are served from memory
 * (`overlay`). Memory is bounded: writers wait while pending + in-flight clusters exceed the budget.
 */
import debugFactory from 'debug';
import type { HostFile } from '../../io/host-file.js';
import { compressCluster, type CompressionType } from './compression.js';
import type { Geometry } from '../format/geometry.js';
import { compressedClusterRange, decodeCompressed, makeCompressedEntry, type RawL2Entry } from '../format/l2-entry.js';
import { allocAligned, DEFAULT_ALIGNMENT_BYTES } from '../../io/aligned-buffer.js';
import { zeroBlock } from './zeros.js';

const trace = debugFactory('qcow2fuse:compress');

/** What the writer needs from its image. */
export interface CompressedWriterHost {
  readonly geometry: Geometry;
  readonly compressionType: CompressionType;
  /** Where compressed host clusters are written (an O_DIRECT handle when the host allows it). */
  readonly directFile: HostFile;
  /** Run `fn` under the image's metadata lock. */
  locked<T>(fn: () => Promise<T>): Promise<T>;
  /** Read guest bytes through the current mapping (no overlay of pending data). */
  readCurrent(guestOffset: number, buf: Buffer): Promise<void>;
  /** Write a cluster uncompressed through the normal write path. */
  writeUncompressed(guestOffset: number, data: Buffer): Promise<void>;
  /** Make a whole cluster read as zeros (unallocated when nothing shows through). Not under the lock. */
  zeroCluster(clusterIndex: number): Promise<void>;
  /** Under the lock: allocate `nbClusters` contiguous host clusters (refcount 1 each). */
  allocClustersLocked(nbClusters: number): Promise<number>;
  /** Under the lock: add `addend` to the refcount of host cluster `clusterIndex`. */
  updateRefcountLocked(hostClusterIndex: number, addend: number): Promise<void>;
  /** Under the lock: link a compressed entry for a guest cluster (refcounts already right). */
  linkCompressedLocked(guestClusterIndex: number, entry: RawL2Entry): Promise<void>;
  /** Largest refcount value an entry can hold. */
  readonly maxRefcount: number;
}

export interface CompressedWriterOptions {
  /** Budget for pending + in-flight plaintext clusters, bytes (default 64 MiB). */
  maxPendingBytes?: number;
  /** Partially covered clusters kept before the oldest is completed and submitted (default 256). */
  maxPartialClusters?: number;
  /**
   * Host clusters allocated at a time for packing chunks (default: 1 MiB worth, at least 2). Smaller
   * areas (or areas growing from 2) were measured worse: freed gaps of a closed area then take the
   * next small area, which breaks contiguity more often, and each break pads a partial cluster
   * (+0.3% allocated on 4 concurrent writers). The price: a closed area's unused clusters stay as a
   * hole inside the file (≈ 1 MiB on a disk of one repeated byte, whose data takes 0.7 MiB).
   */
  areaClusters?: number;
}

/** Byte ranges covered so far in a partially written cluster (sorted, merged). */
class Coverage {
  ranges: [number, number][] = [];

  add(start: number, end: number): void {
    const out: [number, number][] = [];
    let s = start;
    let e = end;
    for (const [a, b] of this.ranges) {
      if (b < s || a > e) out.push([a, b]);
      else { s = Math.min(s, a); e = Math.max(e, b); }
    }
    out.push([s, e]);
    out.sort((x, y) => x[0] - y[0]);
    this.ranges = out;
  }

  covers(bytes: number): boolean {
    return this.ranges.length === 1 && this.ranges[0][0] === 0 && this.ranges[0][1] >= bytes;
  }
}

interface PendingCluster {
  clusterIndex: number;
  plain: Buffer;
  /** Undefined once the cluster is fully covered. */
  coverage: Coverage | undefined;
}

interface HostCluster {
  hostOffset: number;
  buf: Buffer;
  /** Chunks placed in it. */
  nbChunks: number;
  /** Chunks linked so far (each added one reference). */
  nbLinked: number;
  /** Still holds the allocation reference (dropped once closed and every chunk is linked). */
  writerRef: boolean;
  /** No more chunks will be placed in it. */
  closed: boolean;
  /** Bytes of buf that hold data. */
  fillBytes: number;
  /** fillBytes at the last completed write. */
  writtenBytes: number;
  writing: Promise<void> | undefined;
  /** Chunks waiting for this cluster to be written. */
  waiters: Chunk[];
}

interface Chunk {
  op: InflightOp;
  hostOffset: number;
  bytes: number;
  clusters: HostCluster[];
  /** Clusters not yet written up to this chunk's end. */
  unwritten: Set<HostCluster>;
}

interface InflightOp {
  clusterIndex: number;
  /** The cluster's plaintext being stored (immutable once in flight). */
  plain: Buffer;
  /** A read overlay references `plain`: it is not reused for another cluster. */
  shared?: boolean;
}

export class CompressedWriter {
  private readonly host: CompressedWriterHost;
  private readonly g: Geometry;
  private readonly maxPendingBytes: number;
  private readonly maxPartialClusters: number;
  private readonly areaClusters: number;
  /** Host offsets of the clusters whose allocation reference the writer still holds (changed under the lock). */
  private readonly heldClusters = new Set<number>();
  private readonly alignment: number;
  private readonly pending = new Map<number, PendingCluster>();
  private readonly inflight = new Map<number, InflightOp>();
  /** Host clusters still open for chunks (contiguous, host order). */
  private area: HostCluster[] = [];
  /** Host offset where the next chunk goes. */
  private fillOffset = 0;
  private placeChain: Promise<void> = Promise.resolve();
  private spaceWaiters: (() => void)[] = [];
  /** Writes of clusters the fill has passed, started by place() (see there). */
  private readonly closedWrites = new Set<Promise<void>>();
  private changeWaiters: (() => void)[] = [];
  private failure: Error | undefined;
  /**
   * Buffers reused instead of allocated per cluster (allocation and its GC cost more than the
   * compression of a zstd cluster): plaintext clusters whose operation completed, and the aligned
   * buffers of host clusters written for the last time.
   */
  private readonly plainPool: Buffer[] = [];
  private readonly hostPool: Buffer[] = [];

  constructor(host: CompressedWriterHost, options: CompressedWriterOptions = {}) {
    this.host = host;
    this.g = host.geometry;
    this.maxPendingBytes = Math.max(options.maxPendingBytes ?? 64 * 1024 * 1024, 4 * this.g.clusterSize);
    this.maxPartialClusters = Math.min(options.maxPartialClusters ?? 256, Math.floor(this.maxPendingBytes / this.g.clusterSize / 2));
    this.areaClusters = Math.max(2, options.areaClusters ?? Math.floor((1024 * 1024) / this.g.clusterSize));
    this.alignment = Math.max(host.directFile.dioAlignment, DEFAULT_ALIGNMENT_BYTES);
  }

  private get heldBytes(): number {
    return (this.pending.size + this.inflight.size) * this.g.clusterSize;
  }

  private throwIfFailed(): void {
    if (this.failure !== undefined) {
      const err = this.failure;
      this.failure = undefined;
      throw err;
    }
  }

  private notify(): void {
    for (const w of this.spaceWaiters.splice(0)) w();
    for (const w of this.changeWaiters.splice(0)) w();
  }

  private fail(err: unknown): void {
    trace('failure: %o', err);
    this.failure ??= err instanceof Error ? err : new Error(String(err));
  }

  /**
   * Host clusters whose refcount includes the writer's own reference, which no L2 entry holds (under
   * the metadata lock). A check of the live image counts these, or they would look like leaks.
   */
  heldHostClusters(): number[] {
    return [...this.heldClusters];
  }

  /** Accept a guest write. Resolves once the data is held (durable only after flush). */
  async write(guestOffset: number, data: Uint8Array): Promise<void> {
    this.throwIfFailed();
    const cs = this.g.clusterSize;
    let pos = 0;
    while (pos < data.length) {
      await this.waitForSpace();
      const offset = guestOffset + pos;
      const clusterIndex = this.g.clusterIndex(offset);
      const inCluster = offset - clusterIndex * cs;
      const n = Math.min(cs - inCluster, data.length - pos);
      let p = this.pending.get(clusterIndex);
      if (!p) {
        const base = this.inflight.get(clusterIndex);
        p = { clusterIndex, plain: base ? Buffer.from(base.plain) : this.takePlain(n === cs), coverage: base || n === cs ? undefined : new Coverage() };
      } else {
        this.pending.delete(clusterIndex); // re-inserted below: Map order = least recently written first
      }
      this.pending.set(clusterIndex, p);
      p.plain.set(data.subarray(pos, pos + n), inCluster);
      p.coverage?.add(inCluster, inCluster + n);
      if (p.coverage?.covers(cs)) p.coverage = undefined;
      if (p.coverage === undefined) this.startIfIdle(clusterIndex);
      pos += n;
    }
    await this.evictPartials(this.maxPartialClusters);
  }

  /**
   * Back-pressure: wait while held clusters exceed the budget. Partial clusters only leave by being
   * completed, so the oldest one is completed first when nothing else is moving.
   */
  private async waitForSpace(): Promise<void> {
    while (this.heldBytes >= this.maxPendingBytes) {
      // (Searched only when nothing is in flight: a scan of every pending cluster per cluster written was a hot spot.)
      const oldestPartial = this.inflight.size === 0 ? [...this.pending.values()].find((p) => p.coverage) : undefined;
      if (oldestPartial) {
        await this.completePartial(oldestPartial);
        continue;
      }
      // Chunks placed in a host cluster that is not full yet hold their plaintext until it is
      // written: write it now (padded; it is rewritten whole when it fills) so they link and go.
      const waiting = this.area.filter((c) => c.fillBytes > c.writtenBytes && c.waiters.length > 0);
      if (waiting.length > 0) {
        await Promise.all(waiting.map((c) => this.writeHostCluster(c)));
        continue;
      }
      await new Promise<void>((r) => this.spaceWaiters.push(r));
    }
  }

  /** Complete and submit the least recently written partial clusters beyond `keep`. */
  private async evictPartials(keep: number): Promise<void> {
    const partials = [...this.pending.values()].filter((p) => p.coverage);
    if (partials.length <= keep) return;
    await Promise.all(partials.slice(0, partials.length - keep).map((p) => this.completePartial(p)));
  }

  /** Fill the gaps of a partial cluster from its current contents and submit it. */
  private async completePartial(p: PendingCluster): Promise<void> {
    if (!p.coverage) return;
    const cs = this.g.clusterSize;
    const current = Buffer.alloc(cs);
    await this.host.readCurrent(p.clusterIndex * cs, current);
    if (!p.coverage || this.pending.get(p.clusterIndex) !== p) return; // completed meanwhile
    for (const [a, b] of p.coverage.ranges) p.plain.copy(current, a, a, b);
    current.copy(p.plain);
    p.coverage = undefined;
    this.startIfIdle(p.clusterIndex);
  }

  private startIfIdle(clusterIndex: number): void {
    if (this.inflight.has(clusterIndex)) return;
    const p = this.pending.get(clusterIndex);
    if (!p || p.coverage) return;
    this.pending.delete(clusterIndex);
    const op: InflightOp = { clusterIndex, plain: p.plain };
    this.inflight.set(clusterIndex, op);
    this.process(op).catch((err: unknown) => {
      this.fail(err);
      this.finish(op);
    });
  }

  /** A plaintext cluster buffer: zeroed unless the caller overwrites all of it. */
  private takePlain(overwritten: boolean): Buffer {
    const buf = this.plainPool.pop();
    if (!buf) return overwritten ? Buffer.allocUnsafe(this.g.clusterSize) : Buffer.alloc(this.g.clusterSize);
    if (!overwritten) buf.fill(0);
    return buf;
  }

  /** An operation stored its cluster: finish it and keep its plaintext buffer for reuse. */
  private completed(op: InflightOp): void {
    this.finish(op);
    if (!op.shared && this.plainPool.length * this.g.clusterSize < this.maxPendingBytes) this.plainPool.push(op.plain);
  }

  private finish(op: InflightOp): void {
    if (this.inflight.get(op.clusterIndex) === op) this.inflight.delete(op.clusterIndex);
    this.startIfIdle(op.clusterIndex);
    this.notify();
  }

  private async process(op: InflightOp): Promise<void> {
    const cs = this.g.clusterSize;
    if (op.plain.equals(zeroBlock(cs))) {
      await this.host.zeroCluster(op.clusterIndex);
      this.completed(op);
      return;
    }
    const compressed = await compressCluster(this.host.compressionType, op.plain, cs - 1);
    if (!compressed) {
      await this.host.writeUncompressed(op.clusterIndex * cs, op.plain);
      this.completed(op);
      return;
    }
    // Placement is serialised: chunks are packed in the order their compression completes.
    const placed = this.placeChain.then(() => this.place(op, compressed));
    this.placeChain = placed.catch(() => undefined);
    await placed;
  }

  private newHostCluster(hostOffset: number): HostCluster {
    const buf = this.hostPool.pop() ?? allocAligned(this.g.clusterSize, this.alignment);
    buf.fill(0);
    return { hostOffset, buf, nbChunks: 0, nbLinked: 0, writerRef: true, closed: false, fillBytes: 0, writtenBytes: 0, writing: undefined, waiters: [] };
  }

  private clusterAt(hostOffset: number): HostCluster | undefined {
    if (this.area.length === 0) return undefined;
    const i = Math.floor((hostOffset - this.area[0].hostOffset) / this.g.clusterSize);
    return i >= 0 && i < this.area.length ? this.area[i] : undefined;
  }

  private get areaEnd(): number {
    return this.area.length === 0 ? 0 : this.area[this.area.length - 1].hostOffset + this.g.clusterSize;
  }

  /** Make sure [fillOffset, +bytes) lies inside the area, allocating (and extending) as needed. */
  private async reserve(bytes: number): Promise<void> {
    const cs = this.g.clusterSize;
    const current = this.clusterAt(this.fillOffset);
    // A cluster whose refcount (writer reference + chunks) could not take another chunk is skipped.
    if (current && current.nbChunks + 2 > this.host.maxRefcount) this.fillOffset = current.hostOffset + cs;
    if (this.area.length > 0 && this.fillOffset >= this.area[0].hostOffset && this.fillOffset + bytes <= this.areaEnd) return;
    const need = Math.max(this.areaClusters, Math.ceil(bytes / cs) + 1);
    const hostOffset = await this.host.locked(async () => {
      const allocated = await this.host.allocClustersLocked(need);
      for (let i = 0; i < need; i++) this.heldClusters.add(allocated + i * cs);
      return allocated;
    });
    const fresh = Array.from({ length: need }, (_, i) => this.newHostCluster(hostOffset + i * cs));
    if (this.area.length > 0 && hostOffset === this.areaEnd && this.fillOffset >= this.area[0].hostOffset) {
      this.area.push(...fresh);
      return;
    }
    // Not contiguous: the old area is closed (its partly filled cluster written, its empty ones released).
    await this.closeArea();
    this.area = fresh;
    this.fillOffset = hostOffset;
  }

  /** Close every cluster of the area: write partly filled ones, release the writer's references. */
  private async closeArea(): Promise<void> {
    const clusters = this.area;
    this.area = [];
    for (const c of clusters) c.closed = true;
    await Promise.all(clusters.filter((c) => c.fillBytes > c.writtenBytes).map((c) => this.writeHostCluster(c)));
    await this.host.locked(async () => {
      for (const c of clusters) await this.dropWriterRefLocked(c);
    });
  }

  /** Drop the allocation reference of a closed cluster whose chunks are all linked. */
  private async dropWriterRefLocked(c: HostCluster): Promise<void> {
    if (!c.writerRef || !c.closed || c.nbLinked < c.nbChunks) return;
    c.writerRef = false;
    this.heldClusters.delete(c.hostOffset);
    await this.host.updateRefcountLocked(c.hostOffset / this.g.clusterSize, -1);
  }

  private async place(op: InflightOp, data: Buffer): Promise<void> {
    const cs = this.g.clusterSize;
    await this.reserve(data.length);
    const hostOffset = this.fillOffset;
    const chunk: Chunk = { op, hostOffset, bytes: data.length, clusters: [], unwritten: new Set() };
    const { firstHostCluster, lastHostCluster } = compressedClusterRange(decodeCompressed(makeCompressedEntry(hostOffset, data.length, this.g), this.g), this.g);
    for (let ci = firstHostCluster; ci <= lastHostCluster; ci++) {
      const c = this.clusterAt(ci * cs)!;
      const start = Math.max(hostOffset, c.hostOffset);
      const end = Math.min(hostOffset + data.length, c.hostOffset + cs);
      data.copy(c.buf, start - c.hostOffset, start - hostOffset, end - hostOffset);
      c.fillBytes = Math.max(c.fillBytes, end - c.hostOffset);
      c.nbChunks++;
      chunk.clusters.push(c);
      chunk.unwritten.add(c);
      c.waiters.push(chunk);
    }
    this.fillOffset = hostOffset + data.length;
    // Clusters the fill has passed are complete: close them, write each once, and let them go. The
    // write (and the writer reference it drops) is tracked: flush and close wait for it, or it could
    // land after the image's last flush — a refcount one too high, a leak on disk.
    while (this.area.length > 0 && this.area[0].hostOffset + cs <= this.fillOffset) {
      const c = this.area.shift()!;
      c.closed = true;
      c.fillBytes = cs;
      const write = this.writeHostCluster(c).then(() => {
        // Its last write: nothing refers to the buffer any more.
        if (this.hostPool.length < this.areaClusters * 4) this.hostPool.push(c.buf);
      }).catch((err: unknown) => this.fail(err));
      this.closedWrites.add(write);
      void write.finally(() => this.closedWrites.delete(write));
    }
    this.notify();
  }

  /**
   * Write a host cluster as it is now (aligned, up to its fill) with the direct handle,
   * then link the chunks that were waiting for it. Writes of one cluster are chained.
   */
  private writeHostCluster(c: HostCluster): Promise<void> {
    const next = (c.writing ?? Promise.resolve()).then(async () => {
      const fill = c.fillBytes;
      if (c.writtenBytes >= fill) return;
      try {
        // Up to the fill only (aligned): a cluster left partly filled at the end then allocates on
        // the host no more than its data, as qemu-img's compressed writes (matters for 2 MiB clusters).
        const bytes = Math.min(this.g.clusterSize, Math.ceil(fill / this.alignment) * this.alignment);
        await this.host.directFile.pwrite(c.buf.subarray(0, bytes), c.hostOffset, 'compressed');
      } catch (err) {
        // The waiting chunks are lost: their clusters stay unlinked (a leak at worst).
        for (const chunk of c.waiters.splice(0)) this.finish(chunk.op);
        throw err;
      }
      c.writtenBytes = fill;
      const ready: Chunk[] = [];
      c.waiters = c.waiters.filter((chunk) => {
        // Written when this cluster's part of the chunk lies inside what was written.
        if (Math.min(chunk.hostOffset + chunk.bytes, c.hostOffset + this.g.clusterSize) > c.hostOffset + fill) return true;
        chunk.unwritten.delete(c);
        if (chunk.unwritten.size === 0) ready.push(chunk);
        return false;
      });
      if (ready.length > 0) await this.link(ready);
      else if (c.closed) await this.host.locked(() => this.dropWriterRefLocked(c));
    });
    c.writing = next.catch(() => undefined);
    return next;
  }

  /** Link chunks whose host clusters are all written: one reference per overlapped cluster, then the L2 entry. */
  private async link(chunks: Chunk[]): Promise<void> {
    const cs = this.g.clusterSize;
    await this.host.locked(async () => {
      for (const chunk of chunks) {
        for (const c of chunk.clusters) {
          await this.host.updateRefcountLocked(c.hostOffset / cs, 1);
          c.nbLinked++;
        }
        await this.host.linkCompressedLocked(chunk.op.clusterIndex, makeCompressedEntry(chunk.hostOffset, chunk.bytes, this.g));
      }
      for (const chunk of chunks) for (const c of chunk.clusters) await this.dropWriterRefLocked(c);
    });
    for (const chunk of chunks) this.completed(chunk.op);
  }

  /**
   * What a read of [guestOffset, +bytes) must see of clusters still pending or in flight: returns a
   * function that copies it over the mapped data, or undefined. Call it under the metadata lock:
   * links happen under it, so the snapshot agrees with the mapping read at the same time.
   */
  overlayFor(guestOffset: number, bytes: number): ((buf: Buffer) => void) | undefined {
    if (this.pending.size === 0 && this.inflight.size === 0) return undefined;
    const cs = this.g.clusterSize;
    const copies: { at: number; data: Buffer }[] = [];
    const add = (clusterIndex: number, plain: Buffer, a: number, b: number, snapshot: boolean): void => {
      const base = clusterIndex * cs;
      const start = Math.max(base + a, guestOffset);
      const end = Math.min(base + b, guestOffset + bytes);
      if (start >= end) return;
      const slice = plain.subarray(start - base, end - base);
      copies.push({ at: start - guestOffset, data: snapshot ? Buffer.from(slice) : slice });
    };
    const last = this.g.clusterIndex(guestOffset + bytes - 1);
    for (let c = this.g.clusterIndex(guestOffset); c <= last; c++) {
      const op = this.inflight.get(c);
      if (op) {
        op.shared = true;
        add(c, op.plain, 0, cs, false);
      }
      const p = this.pending.get(c);
      if (!p) continue;
      if (!p.coverage) add(c, p.plain, 0, cs, true);
      else for (const [a, b] of p.coverage.ranges) add(c, p.plain, a, b, true);
    }
    if (copies.length === 0) return undefined;
    return (buf: Buffer) => { for (const cp of copies) cp.data.copy(buf, cp.at); };
  }

  /** Whether anything is held (pending or in flight). */
  get busy(): boolean {
    return this.pending.size > 0 || this.inflight.size > 0;
  }

  /**
   * Push everything written so far into the image: complete partial clusters, wait for compression,
   * write partly filled host clusters (padded — they are rewritten whole if more chunks land in them
   * later), link, and release area clusters that hold nothing yet. An image flush then makes it durable.
   */
  async flush(): Promise<void> {
    for (;;) {
      await Promise.all([...this.pending.values()].filter((p) => p.coverage).map((p) => this.completePartial(p)));
      for (const c of [...this.pending.keys()]) this.startIfIdle(c);
      await this.placeChain;
      await Promise.all([...this.area.filter((c) => c.fillBytes > c.writtenBytes).map((c) => this.writeHostCluster(c)), ...this.closedWrites]);
      if (this.inflight.size === 0 && this.pending.size === 0 && this.closedWrites.size === 0) break;
      // Chunks placed or clusters written while we were writing: go round again rather than wait for
      // a change that came. A cluster whose newer version waits behind its in-flight older one starts
      // only when that one finishes: wait for it (going round would spin without ever yielding).
      const startable = [...this.pending.values()].some((p) => p.coverage !== undefined || !this.inflight.has(p.clusterIndex));
      if (startable || this.closedWrites.size > 0 || this.area.some((c) => c.fillBytes > c.writtenBytes)) continue;
      await new Promise<void>((r) => this.changeWaiters.push(r));
    }
    await this.releaseEmpty();
    this.throwIfFailed();
  }

  /** Release the open area's clusters that hold no chunk yet (they are reallocated when needed). */
  private async releaseEmpty(): Promise<void> {
    const empty = this.area.filter((c) => c.nbChunks === 0);
    if (empty.length === 0) return;
    this.area = this.area.filter((c) => c.nbChunks > 0);
    if (this.area.length === 0) this.fillOffset = 0;
    for (const c of empty) c.closed = true;
    await this.host.locked(async () => {
      for (const c of empty) await this.dropWriterRefLocked(c);
    });
  }

  /** Flush, then close the area (close of the image). */
  async close(): Promise<void> {
    await this.flush();
    await this.closeArea();
    this.throwIfFailed();
  }
}
