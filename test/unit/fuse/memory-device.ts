/**
 * MemoryDevice: an InspectableDevice over a Buffer, the test double the FUSE layer is tested with
 * before (and besides) the qcow2 driver. It follows BlockDevice's contract: ranges past the end are
 * ERANGE, writes on a read-only device EROFS, sizes change with resize, allocation is tracked per
 * cluster (so st_blocks, map.json and layout.txt have something real to show). It counts flush/close
 * calls, can fail the next call of any operation with a given code, and can delay operations (to test
 * concurrency) — for assertions about what the FUSE layer did.
 */
import { CodedError } from '../../../src/io/errors.js';
import type { CheckReport, InspectableDevice, LayoutEntry, MapExtent, SeekableDevice, SeekTarget, SnapshotSummary } from '../../../src/qcow2/engine/block-device.js';

export interface MemoryDeviceOptions {
  readOnly?: boolean;
  clusterSize?: number;
  filename?: string;
  snapshots?: { id: string; name: string; data: Buffer }[];
}

type Op = 'read' | 'write' | 'writeZeroes' | 'zeroRange' | 'seek' | 'discard' | 'flush' | 'resize' | 'allocatedBytes' | 'close' | 'infoJson' | 'check' | 'openSnapshot';

export class MemoryDevice implements InspectableDevice {
  /** Backing store; grows geometrically so that growing by many small resizes stays linear. */
  private store: Buffer;
  private size: number;
  readonly readOnly: boolean;
  readonly clusterSize: number;
  readonly filename: string;
  /** Guest cluster indexes that hold data. */
  readonly allocated = new Set<number>();
  readonly calls: Record<Op, number> = {
    read: 0, write: 0, writeZeroes: 0, zeroRange: 0, seek: 0, discard: 0, flush: 0, resize: 0, allocatedBytes: 0, close: 0, infoJson: 0, check: 0, openSnapshot: 0,
  };
  /** Sizes passed to resize(), in order. */
  readonly resizes: number[] = [];
  closed = false;
  private readonly failures = new Map<Op, Error>();
  private readonly gates = new Map<Op, Promise<void>>();
  private readonly snapshotList: { id: string; name: string; data: Buffer }[];
  /** Snapshot views opened and not yet closed. */
  openViews = 0;

  constructor(contents: number | Buffer, options: MemoryDeviceOptions = {}) {
    this.store = typeof contents === 'number' ? Buffer.alloc(contents) : Buffer.from(contents);
    this.size = this.store.length;
    this.readOnly = options.readOnly ?? false;
    this.clusterSize = options.clusterSize ?? 65536;
    this.filename = options.filename ?? 'memory.qcow2';
    this.snapshotList = options.snapshots ?? [];
    if (typeof contents !== 'number') this.markAllocated(0, this.data.length, contents);
  }

  get virtualSize(): number {
    return this.size;
  }

  /** The guest contents (a view: valid until the next resize). */
  get data(): Buffer {
    return this.store.subarray(0, this.size);
  }

  /** Make the next call of `op` throw `err` (or a CodedError with that code). */
  failNext(op: Op, err: Error | string): void {
    this.failures.set(op, typeof err === 'string' ? new CodedError(err, `injected ${err} in ${op}`) : err);
  }

  /** Hold every call of `op` until the returned function is called. */
  hold(op: Op): () => void {
    let release!: () => void;
    this.gates.set(op, new Promise<void>((resolve) => { release = resolve; }));
    return () => {
      this.gates.delete(op);
      release();
    };
  }

  private async enter(op: Op): Promise<void> {
    this.calls[op]++;
    const gate = this.gates.get(op);
    if (gate !== undefined) await gate;
    const failure = this.failures.get(op);
    if (failure !== undefined) {
      this.failures.delete(op);
      throw failure;
    }
    if (this.closed && op !== 'close') throw new CodedError('EIO', `${op} on a closed device`);
  }

  private checkRange(offset: number, bytes: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0 || offset + bytes > this.data.length) {
      throw new CodedError('ERANGE', `request [${offset}, +${bytes}) outside the ${this.data.length}-byte device`);
    }
  }

  private checkWritable(): void {
    if (this.readOnly) throw new CodedError('EROFS', 'device is read-only');
  }

  private markAllocated(offset: number, bytes: number, source?: Buffer): void {
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.ceil((offset + bytes) / this.clusterSize);
    for (let c = first; c < last; c++) {
      if (source !== undefined) {
        const start = c * this.clusterSize;
        if (source.subarray(start, start + this.clusterSize).every((b) => b === 0)) continue;
      }
      this.allocated.add(c);
    }
  }

  async read(guestOffset: number, bytes: number): Promise<Buffer> {
    await this.enter('read');
    this.checkRange(guestOffset, bytes);
    return Buffer.from(this.data.subarray(guestOffset, guestOffset + bytes));
  }

  async write(guestOffset: number, data: Uint8Array): Promise<void> {
    await this.enter('write');
    this.checkWritable();
    this.checkRange(guestOffset, data.length);
    this.data.set(data, guestOffset);
    this.markAllocated(guestOffset, data.length);
  }

  async writeZeroes(guestOffset: number, bytes: number): Promise<void> {
    await this.enter('writeZeroes');
    this.checkWritable();
    this.checkRange(guestOffset, bytes);
    this.data.fill(0, guestOffset, guestOffset + bytes);
  }

  /** Zeros in the range; with `unmap`, the clusters wholly inside it are no longer allocated. */
  async zeroRange(guestOffset: number, bytes: number, unmap: boolean): Promise<void> {
    await this.enter('zeroRange');
    this.checkWritable();
    this.checkRange(guestOffset, bytes);
    this.data.fill(0, guestOffset, guestOffset + bytes);
    if (!unmap) return;
    const end = guestOffset + bytes;
    for (let c = Math.ceil(guestOffset / this.clusterSize); (c + 1) * this.clusterSize <= end || (c * this.clusterSize < end && end === this.size); c++) {
      this.allocated.delete(c);
    }
  }

  /** Data is the allocated clusters, holes the others. */
  async seek(guestOffset: number, target: SeekTarget): Promise<number | undefined> {
    await this.enter('seek');
    for (let c = Math.floor(guestOffset / this.clusterSize); c * this.clusterSize < this.size; c++) {
      if (this.allocated.has(c) === (target === 'data')) return Math.max(guestOffset, c * this.clusterSize);
    }
    return target === 'hole' ? Math.max(guestOffset, this.size) : undefined;
  }

  async discard(guestOffset: number, bytes: number): Promise<void> {
    await this.enter('discard');
    this.checkWritable();
    this.checkRange(guestOffset, bytes);
    this.data.fill(0, guestOffset, guestOffset + bytes);
  }

  async flush(): Promise<void> {
    await this.enter('flush');
  }

  async resize(newVirtualSize: number): Promise<void> {
    await this.enter('resize');
    this.checkWritable();
    if (!Number.isSafeInteger(newVirtualSize) || newVirtualSize < 0 || newVirtualSize % 512 !== 0) {
      throw new CodedError('EINVAL', `invalid size ${newVirtualSize}`);
    }
    this.resizes.push(newVirtualSize);
    if (newVirtualSize > this.store.length) {
      const next = Buffer.alloc(Math.max(newVirtualSize, 2 * this.store.length));
      this.store.copy(next, 0, 0, this.size);
      this.store = next;
    } else if (newVirtualSize > this.size) {
      this.store.fill(0, this.size, newVirtualSize);
    }
    this.size = newVirtualSize;
    for (const c of [...this.allocated]) if (c * this.clusterSize >= newVirtualSize) this.allocated.delete(c);
  }

  async allocatedBytes(): Promise<number> {
    await this.enter('allocatedBytes');
    return (this.allocated.size + 3) * this.clusterSize;
  }

  async close(): Promise<void> {
    await this.enter('close');
    this.closed = true;
  }

  async infoJson(): Promise<Record<string, unknown>> {
    await this.enter('infoJson');
    return {
      'virtual-size': this.virtualSize,
      filename: this.filename,
      'cluster-size': this.clusterSize,
      format: 'qcow2',
      'actual-size': await this.allocatedBytes(),
      'dirty-flag': false,
    };
  }

  async *mapExtents(): AsyncIterable<MapExtent> {
    const clusters = Math.ceil(this.virtualSize / this.clusterSize);
    let run: MapExtent | undefined;
    for (let c = 0; c < clusters; c++) {
      const start = c * this.clusterSize;
      const length = Math.min(this.clusterSize, this.virtualSize - start);
      const data = this.allocated.has(c);
      if (run !== undefined && run.data === data) {
        run.length += length;
        continue;
      }
      if (run !== undefined) yield run;
      run = { start, length, depth: 0, present: data, zero: !data, data, compressed: false, ...(data ? { offset: (c + 3) * this.clusterSize } : {}) };
    }
    if (run !== undefined) yield run;
  }

  async *layout(): AsyncIterable<LayoutEntry> {
    yield { hostOffset: 0, bytes: this.clusterSize, kind: 'header' };
    yield { hostOffset: this.clusterSize, bytes: this.clusterSize, kind: 'l1' };
    yield { hostOffset: 2 * this.clusterSize, bytes: this.clusterSize, kind: 'refblock', note: 'refcount 1' };
    for (const c of [...this.allocated].sort((a, b) => a - b)) {
      yield { hostOffset: (c + 3) * this.clusterSize, bytes: this.clusterSize, kind: 'data', guestOffset: c * this.clusterSize };
    }
  }

  async check(): Promise<CheckReport> {
    await this.enter('check');
    return { filename: this.filename, format: 'qcow2', 'check-errors': 0, 'allocated-clusters': this.allocated.size };
  }

  listSnapshots(): SnapshotSummary[] {
    return this.snapshotList.map((s) => ({ id: s.id, name: s.name, virtualSize: s.data.length }));
  }

  /** `name` is an id or a name, ids first (QEMU's lookup order). */
  async openSnapshot(name: string): Promise<SeekableDevice> {
    await this.enter('openSnapshot');
    const found = this.snapshotList.find((s) => s.id === name) ?? this.snapshotList.find((s) => s.name === name);
    if (found === undefined) throw new CodedError('ENOENT', `no snapshot '${name}'`);
    const view = new MemoryDevice(found.data, { readOnly: true, clusterSize: this.clusterSize });
    this.openViews++;
    const close = view.close.bind(view);
    view.close = async () => {
      if (!view.closed) this.openViews--;
      await close();
    };
    return view;
  }
}
