/**
 * CheckContext: the state one check pass shares between its passes (the modules of src/qcow2/check,
 * one per pass of QEMU's qcow2_check_refcounts): the image, the repairs allowed, the in-memory
 * refcount array every reference is counted into, the snapshot table as the check read it, and the
 * I/O helpers (reads past the end of the file give zeros, as QEMU's block layer reads them).
 */
import type { ImageState } from '../engine/state.js';
import { entryOffset } from '../format/l2-entry.js';
import { getRefcount } from '../format/refcount-block.js';
import type { SnapshotEntry } from '../format/snapshot-table.js';
import { hex, type CheckCounters, type FixMode } from './counters.js';
import type { RefcountArray } from './repair.js';

/** A snapshot table entry as the check reads it (raw L1 offset: it may be anything). */
export interface CheckSnapshot {
  entry: SnapshotEntry;
  l1OffsetRaw: bigint;
  extraDataBytes: number;
}

type RefblockRead = Buffer | undefined | 'error';

/** What walking one L2 table did, recorded while it runs. */
export interface L2WalkRecording {
  messages: string[];
  /** (host offset, bytes) pairs passed to incRefcounts. */
  incs: number[];
  /** Corruptions incRefcounts counted (they come back on replay). */
  incCorruptions: number;
}

/** L2 table offsets an L1 table lists more than once, or undefined when none is repeated. */
export function repeatedTables(l1: Buffer, entries: number): Set<number> | undefined {
  const seen = new Set<number>();
  let repeated: Set<number> | undefined;
  for (let i = 0; i < entries; i++) {
    const offset = entryOffset(l1.readUInt32BE(i * 8), l1.readUInt32BE(i * 8 + 4));
    if (offset === 0) continue;
    if (seen.has(offset)) (repeated ??= new Set()).add(offset);
    else seen.add(offset);
  }
  return repeated;
}

/** The state of one pass of QEMU's qcow2_co_check_locked over an image. */
export class CheckContext {
  readonly image: ImageState;
  readonly fix: FixMode;
  readonly log: (line: string) => void;
  /** Whether anyone listens to the diagnostics (they are not even formatted otherwise). */
  readonly verbose: boolean;
  readonly clusterSize: number;
  /** Every reference counted so far, by host cluster index. */
  refs!: RefcountArray;
  fileBytes = 0;
  snapshots: CheckSnapshot[] = [];
  snapshotsOffset = 0;
  snapshotsBytes = 0;
  snapshotsRead = false;
  progressTotal = 0;
  /** Structures moved or rewritten: the metadata map must be rebuilt. */
  changedLayout = false;
  /** Set while the walk of an L2 table is recorded for replay. */
  recording: L2WalkRecording | undefined;
  private readonly onProgress: ((done: number, total: number) => void) | undefined;
  private progressDone = 0;

  constructor(image: ImageState, fix: FixMode, log: ((line: string) => void) | undefined, onProgress?: (done: number, total: number) => void) {
    this.image = image;
    this.fix = fix;
    this.verbose = log !== undefined;
    this.log = log ?? (() => undefined);
    this.onProgress = onProgress;
    this.clusterSize = image.geometry.clusterSize;
  }

  /** Bytes at `hostOffset` of the image file; zeros past its end, as QEMU's block layer reads them. */
  async read(hostOffset: number, bytes: number): Promise<Buffer> {
    const buf = Buffer.alloc(bytes);
    if (hostOffset < 0 || hostOffset >= this.fileBytes || !Number.isSafeInteger(hostOffset)) return buf;
    const inFile = Math.min(bytes, this.fileBytes - hostOffset);
    let done = 0;
    while (done < inFile) {
      const n = await this.image.file.pread(buf.subarray(done, inFile), hostOffset + done);
      if (n <= 0) break;
      done += n;
    }
    return buf;
  }

  async refreshFileBytes(): Promise<void> {
    this.fileBytes = await this.image.file.size();
  }

  /** A diagnostic of an L2 walk (recorded for replay when the walk is). */
  note(line: string): void {
    this.recording?.messages.push(line);
    if (this.verbose) this.log(line);
  }

  progress(units: number): void {
    this.progressDone += units;
    this.onProgress?.(Math.min(this.progressDone, this.progressTotal), this.progressTotal);
  }

  /**
   * The refcount block covering reftable index `ri` as on disk (through the image's refcount cache):
   * undefined when there is none, 'error' when it cannot be read (QEMU's qcow2_get_refcount failing).
   */
  async readRefblock(ri: number): Promise<RefblockRead> {
    const table = this.image.refcounts.reftable;
    if (ri >= table.length) return undefined;
    const offset = table[ri];
    if (offset === 0) return undefined;
    if (offset < 0 || offset % this.clusterSize !== 0) {
      try {
        this.image.signalCorruption(true, `refblock offset ${offset < 0 ? 'beyond 2^53' : `0x${hex(offset)}`} unaligned (reftable index: 0x${hex(ri)})`,
          { structure: 'reftable', index: ri });
      } catch {
        // reported as a check error by the caller
      }
      return 'error';
    }
    try {
      const h = await this.image.refcountCache.get(offset);
      const copy = Buffer.from(h.buf);
      this.image.refcountCache.release(h);
      return copy;
    } catch {
      return 'error';
    }
  }

  /** A one-block memo over readRefblock for per-cluster lookups (valid while no refcount changes). */
  refcountReader(): (clusterIndex: number) => Promise<number | 'error'> {
    const g = this.image.geometry;
    let memoIndex = -1;
    let memo: RefblockRead;
    return async (clusterIndex: number) => {
      const ri = g.reftableIndex(clusterIndex);
      if (ri !== memoIndex) {
        memo = await this.readRefblock(ri);
        memoIndex = ri;
      }
      if (memo === 'error') return 'error';
      return memo === undefined ? 0 : getRefcount(memo, g.refblockIndex(clusterIndex), g.refcountOrder);
    };
  }

  /** QEMU's qcow2_inc_refcounts_imrt. */
  incRefcounts(res: CheckCounters, hostOffset: number, bytes: number): void {
    if (bytes <= 0) return;
    const cs = this.clusterSize;
    const recording = this.recording;
    if (recording) recording.incs.push(hostOffset, bytes);
    if (hostOffset + bytes - this.fileBytes >= cs) {
      if (this.verbose) this.log(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hex(hostOffset)} size 0x${hex(bytes)}`);
      res.corruptions++;
      if (recording) recording.incCorruptions++;
      return;
    }
    const first = Math.floor(hostOffset / cs);
    const last = Math.floor((hostOffset + bytes - 1) / cs);
    for (let k = first; k <= last; k++) {
      if (k >= this.refs.size) this.refs.resize(k + 1);
      const refcount = this.refs.get(k);
      if (refcount === this.refs.max) {
        if (this.verbose) this.log(`ERROR: overflow cluster offset=0x${hex(k * cs)}`);
        if (this.verbose) this.log('Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing');
        res.corruptions++;
        if (recording) recording.incCorruptions++;
        continue;
      }
      this.refs.set(k, refcount + 1);
    }
  }

  /** Drop the image's cached slices of the L2 table at `l2Offset` (rewritten on disk by the repair). */
  forgetL2(l2Offset: number): void {
    const g = this.image.geometry;
    const table = l2Offset - (l2Offset % g.clusterSize);
    for (let s = 0; s < g.clusterSize / g.l2SliceBytes; s++) this.image.l2Cache.discard(table + s * g.l2SliceBytes);
  }
}
