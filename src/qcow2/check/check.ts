/**
 * Consistency check and repair with `qemu-img check` semantics (QEMU 7.2 block/qcow2-refcount.c:
 * qcow2_check_refcounts with calculate_refcounts, check_refcounts_l1/l2, check_refblocks,
 * compare_refcounts, check_oflag_copied, rebuild_refcount_structure; qcow2-snapshot.c: the snapshot
 * table check; qcow2-bitmap.c: bitmap refcounts; qcow2.c qcow2_co_check_locked; qemu-img.c img_check).
 *
 * The check counts, in memory, every reference to every host cluster (header, L1 tables, L2 tables,
 * data and compressed clusters — a compressed chunk holds every host cluster its 512-byte-sector
 * range overlaps —, refcount table and blocks, snapshot table, snapshot L1s, bitmaps) and compares
 * that with the refcounts on disk: lower on disk is a corruption, higher a leak. Entries that point
 * outside the file or are unaligned, reserved bits, wrong COPIED flags, bad compressed descriptors
 * and a broken snapshot table are corruptions too. `-r leaks` frees leaks; `-r all` also fixes
 * corruptions and rebuilds the refcount structure when it cannot be trusted.
 *
 * Tables are read from the file (the image's caches are written back first), so a check of a live
 * image sees what is on disk; it runs under the image's metadata lock.
 */
import type { CheckReport } from '../engine/block-device.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, QCOW_MAX_L1_SIZE_BYTES, QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOT_EXTRA_DATA, SNAPSHOT_HEADER_BYTES } from '../format/constants.js';
import { CodedError } from '../format/errors.js';
import { withBit } from '../format/header.js';
import { imageState, type Qcow2Image } from '../engine/image.js';
import type { ImageState } from '../engine/state.js';
import { clusterKind, decodeCompressed, entryOffset, l2HostOffset, readL2Entry, writeL2Entry, type RawL2Entry } from '../format/l2-entry.js';
import { getRefcount } from '../format/refcount-block.js';
import {
  CheckAbortError, ERRNO_TEXT, RefcountArray, overlapsMetadata, rebuildRefcountStructure, writeSnapshotTable,
  type CheckAbortCode,
} from './repair.js';
import { readU64, toSafeNumber } from '../format/safe-int.js';
import type { SnapshotEntry } from '../format/snapshot-table.js';

export type RepairMode = 'leaks' | 'all';

export interface CheckOptions {
  /** 'leaks' frees leaked clusters; 'all' also fixes corruptions (qemu-img check -r). */
  repair?: RepairMode;
  /** Progress in work units (L1 entries walked, refcount blocks compared). */
  onProgress?: (done: number, total: number) => void;
  /** qemu-img's diagnostic lines ("ERROR cluster 3 refcount=0 reference=1", "Leaked cluster …"). */
  onMessage?: (line: string) => void;
}

/** The result, with exactly the keys of `qemu-img check --output=json` (zero counts omitted as qemu does). */
export type CheckResult = CheckReport;

/** Which repairs a pass may do (QEMU's BDRV_FIX_LEAKS / BDRV_FIX_ERRORS). */
export interface FixMode {
  leaks: boolean;
  errors: boolean;
  /**
   * Also compare the refcounts of clusters past the end of the file that existing refcount blocks
   * describe (leaks there are fixed with `leaks`). qemu-img check compares only clusters inside the
   * file; the repair of a dirty image uses this, because with lazy refcounts a crash can leave a
   * refcount block written for a cluster whose write never extended the file — a leak no check
   * sees until the file grows over it.
   */
  beyondEnd?: boolean;
}

/** QEMU's BdrvCheckResult. */
export interface CheckCounters {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

/** The check could not run to its end (qemu-img: "Check failed: …", exit 1); `counters` as far as it got. */
export class CheckFailedError extends CodedError {
  readonly counters: CheckCounters;
  readonly reason: string;
  constructor(code: CheckAbortCode, reason: string, counters: CheckCounters) {
    super(code, `Check failed: ${reason}`, { counters });
    this.counters = counters;
    this.reason = reason;
  }
}

const NO_FIX: FixMode = { leaks: false, errors: false };
const MAX_CHECK_CLUSTERS = 0x7fffffff;
/** How far past its end the repair extends the file for a refcount block (QEMU: any distance). */
const MAX_REFBLOCK_GROWTH_BYTES = 64 * 1024 * 1024;
/** QEMU's QCOW_MAX_SNAPSHOTS_SIZE: the snapshot table may not exceed 64 MiB. */
const MAX_SNAPSHOT_TABLE_BYTES = 1024 * QCOW_MAX_SNAPSHOTS;
const INT_MAX = 0x7fffffff;
const INT64_MAX = 0x7fffffffffffffffn;
/** Bitmap extension limits (qcow2-bitmap.c). */
const BME_MAX_TABLE_SIZE = 0x8000000;
const BME_MAX_PHYS_SIZE = 0x20000000;
const BME_MAX_NAME_SIZE = 1023;
const BME_DIR_ENTRY_BYTES = 24;
const MAX_BITMAP_DIRECTORY_BYTES = 1024 * 65535;

function zeroCounters(): CheckCounters {
  return {
    checkErrors: 0, corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, imageEndOffset: 0,
    totalClusters: 0, allocatedClusters: 0, fragmentedClusters: 0, compressedClusters: 0,
  };
}

/** QEMU's qcow2_add_check_result. */
function addCounters(out: CheckCounters, src: CheckCounters, allocationInfo: boolean): void {
  out.corruptions += src.corruptions;
  out.leaks += src.leaks;
  out.checkErrors += src.checkErrors;
  out.corruptionsFixed += src.corruptionsFixed;
  out.leaksFixed += src.leaksFixed;
  if (allocationInfo) {
    out.imageEndOffset = src.imageEndOffset;
    out.totalClusters = src.totalClusters;
    out.allocatedClusters = src.allocatedClusters;
    out.fragmentedClusters = src.fragmentedClusters;
    out.compressedClusters = src.compressedClusters;
  }
}

function hex(value: number | bigint): string {
  return value.toString(16);
}

function rawHex(hi: number, lo: number): string {
  return ((BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)).toString(16);
}

/** A snapshot table entry as the check reads it (raw L1 offset: it may be anything). */
interface CheckSnapshot {
  entry: SnapshotEntry;
  l1OffsetRaw: bigint;
  extraDataBytes: number;
}

type RefblockRead = Buffer | undefined | 'error';

/** Sequential reads of a table through a 1 MiB window: one host read per window, not per field (views into it). */
class WindowReader {
  private windowOffset = 0;
  private window: Buffer = Buffer.alloc(0);
  private readonly load: (offset: number, bytes: number) => Promise<Buffer>;

  constructor(load: (offset: number, bytes: number) => Promise<Buffer>) {
    this.load = load;
  }

  async read(offset: number, bytes: number): Promise<Buffer> {
    if (offset < this.windowOffset || offset + bytes > this.windowOffset + this.window.length) {
      this.windowOffset = offset;
      this.window = await this.load(offset, Math.max(bytes, 1024 * 1024));
    }
    return this.window.subarray(offset - this.windowOffset, offset - this.windowOffset + bytes);
  }
}

/** Entries of one L2 table fix_l2_entry_by_zero changed (index range, count), written after the walk. */
interface ZeroedEntries {
  count: number;
  first: number;
  last: number;
}

/** What walking one L2 table did, recorded while it runs. */
interface L2WalkRecording {
  messages: string[];
  /** (host offset, bytes) pairs passed to incRefcounts. */
  incs: number[];
  /** Corruptions incRefcounts counted (they come back on replay). */
  incCorruptions: number;
}

/** The replayable effect of walking one L2 table. */
interface L2WalkEffect {
  messages: string[];
  incs: number[];
  corruptions: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

/** L2 table offsets an L1 table lists more than once, or undefined when none is repeated. */
function repeatedTables(l1: Buffer, entries: number): Set<number> | undefined {
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

/** One pass of QEMU's qcow2_co_check_locked over an image. */
class Checker {
  private readonly image: ImageState;
  private readonly fix: FixMode;
  private readonly log: (line: string) => void;
  /** Whether anyone listens to the diagnostics (they are not even formatted otherwise). */
  private readonly verbose: boolean;
  private readonly onProgress: ((done: number, total: number) => void) | undefined;
  private readonly clusterSize: number;
  private refs!: RefcountArray;
  private fileBytes = 0;
  private snapshots: CheckSnapshot[] = [];
  private snapshotsOffset = 0;
  private snapshotsBytes = 0;
  private snapshotsRead = false;
  private progressDone = 0;
  private progressTotal = 0;
  /** Structures moved or rewritten: the metadata map must be rebuilt. */
  changedLayout = false;
  /** Set while the walk of an L2 table is recorded for replay. */
  private recording: L2WalkRecording | undefined;

  constructor(image: ImageState, fix: FixMode, log: ((line: string) => void) | undefined, onProgress?: (done: number, total: number) => void) {
    this.image = image;
    this.fix = fix;
    this.verbose = log !== undefined;
    this.log = log ?? (() => undefined);
    this.onProgress = onProgress;
    this.clusterSize = image.geometry.clusterSize;
  }

  // ------------------------------------------------------------------ I/O helpers

  /** Bytes at `hostOffset` of the image file; zeros past its end, as QEMU's block layer reads them. */
  private async read(hostOffset: number, bytes: number): Promise<Buffer> {
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

  private async refreshFileBytes(): Promise<void> {
    this.fileBytes = await this.image.file.size();
  }

  /** A diagnostic of an L2 walk (recorded for replay when the walk is). */
  private note(line: string): void {
    this.recording?.messages.push(line);
    if (this.verbose) this.log(line);
  }

  private progress(units: number): void {
    this.progressDone += units;
    this.onProgress?.(Math.min(this.progressDone, this.progressTotal), this.progressTotal);
  }

  /**
   * The refcount block covering reftable index `ri` as on disk (through the image's refcount cache):
   * undefined when there is none, 'error' when it cannot be read (QEMU's qcow2_get_refcount failing).
   */
  private async readRefblock(ri: number): Promise<RefblockRead> {
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
  private refcountReader(): (clusterIndex: number) => Promise<number | 'error'> {
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

  // ------------------------------------------------------------------ snapshot table

  /** QEMU's qcow2_check_read_snapshot_table. Throws CheckAbortError when the table cannot be read. */
  async readSnapshotTable(res: CheckCounters): Promise<void> {
    await this.refreshFileBytes();
    const pointer = await this.read(60, 12);
    let nbSnapshots = pointer.readUInt32BE(0);
    const offsetRaw = readU64(pointer, 4);
    let reduced = 0;
    let dropped = 0;
    if (nbSnapshots > QCOW_MAX_SNAPSHOTS && this.fix.errors) {
      if (this.verbose) this.log(`Discarding ${nbSnapshots - QCOW_MAX_SNAPSHOTS} overhanging snapshots`);
      reduced += nbSnapshots - QCOW_MAX_SNAPSHOTS;
      nbSnapshots = QCOW_MAX_SNAPSHOTS;
    }
    let invalid: [CheckAbortCode, string] | undefined;
    if (nbSnapshots > QCOW_MAX_SNAPSHOTS) invalid = ['EFBIG', 'snapshot table too large'];
    else if (INT64_MAX - BigInt(nbSnapshots * SNAPSHOT_HEADER_BYTES) < offsetRaw || offsetRaw % BigInt(this.clusterSize) !== 0n) invalid = ['EINVAL', 'snapshot table offset invalid'];
    if (invalid) {
      res.checkErrors++;
      if (this.verbose) this.log(`ERROR ${invalid[1]}`);
      if (nbSnapshots > QCOW_MAX_SNAPSHOTS) this.log(`You can force-remove all ${nbSnapshots - QCOW_MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all`);
      throw new CheckAbortError(invalid[0], invalid[1]);
    }
    const tableOffset = Number(offsetRaw);
    const table = new WindowReader((offset, bytes) => this.read(offset, bytes));
    const snapshots: CheckSnapshot[] = [];
    const repair = this.fix.errors;
    let pos = 0; // relative to the table start
    let tableLength = 0;
    const fail = (code: CheckAbortCode, message: string, hint?: string): never => {
      res.checkErrors++;
      if (this.verbose) this.log(`ERROR failed to read the snapshot table: ${message}`);
      if (hint !== undefined) this.log(hint);
      throw new CheckAbortError(code, message);
    };
    for (let i = 0; i < nbSnapshots; i++) {
      const entryStart = pos;
      tableLength = Math.ceil(tableLength / 8) * 8;
      pos = Math.ceil(pos / 8) * 8;
      const head = await table.read(tableOffset + pos, SNAPSHOT_HEADER_BYTES);
      pos += SNAPSHOT_HEADER_BYTES;
      const l1OffsetRaw = readU64(head, 0);
      let extraDataBytes = head.readUInt32BE(36);
      const idBytes = head.readUInt16BE(12);
      const nameBytes = head.readUInt16BE(14);
      let truncateExtra = false;
      if (extraDataBytes > QCOW_MAX_SNAPSHOT_EXTRA_DATA) {
        if (!repair) fail('EFBIG', `Too much extra metadata in snapshot table entry ${i}`, 'You can force-remove this extra metadata with qemu-img check -r all');
        if (this.verbose) this.log(`Discarding too much extra metadata in snapshot table entry ${i} (${extraDataBytes} > ${QCOW_MAX_SNAPSHOT_EXTRA_DATA})`);
        dropped++;
        truncateExtra = true;
      }
      const knownBytes = Math.min(24, extraDataBytes);
      const known = await table.read(tableOffset + pos, 24);
      pos += knownBytes;
      let unknown: Buffer = Buffer.alloc(0);
      if (extraDataBytes > 24) {
        const extraEnd = pos + extraDataBytes - 24;
        if (truncateExtra) extraDataBytes = QCOW_MAX_SNAPSHOT_EXTRA_DATA;
        unknown = await table.read(tableOffset + pos, extraDataBytes - 24);
        pos = extraEnd;
      }
      const strings = await table.read(tableOffset + pos, idBytes + nameBytes);
      pos += idBytes + nameBytes;
      const vmStateBytes = extraDataBytes >= 8 ? Number(readU64(known, 0)) : head.readUInt32BE(32);
      const sectors = Math.floor(this.image.virtualSize / 512);
      const entry: SnapshotEntry = {
        l1TableOffset: Number(l1OffsetRaw),
        l1Entries: head.readUInt32BE(8),
        id: strings.toString('utf8', 0, idBytes),
        name: strings.toString('utf8', idBytes, idBytes + nameBytes),
        dateSec: head.readUInt32BE(16),
        dateNsec: head.readUInt32BE(20),
        vmClockNsec: Number(readU64(head, 24)),
        vmStateBytes,
        diskSize: extraDataBytes >= 16 ? Number(readU64(known, 8)) : sectors * 512,
        icount: extraDataBytes >= 24 ? (readU64(known, 16) === 0xffffffffffffffffn ? -1 : Number(readU64(known, 16))) : -1,
        extraUnknown: unknown,
      };
      tableLength += SNAPSHOT_HEADER_BYTES + extraDataBytes + idBytes + nameBytes;
      if (tableLength > MAX_SNAPSHOT_TABLE_BYTES || pos > INT_MAX) {
        if (!repair) fail('EFBIG', 'Snapshot table is too big', `You can force-remove all ${nbSnapshots - i} overhanging snapshots with qemu-img check -r all`);
        if (this.verbose) this.log(`Discarding ${nbSnapshots - i} overhanging snapshots (snapshot table is too big)`);
        reduced += nbSnapshots - i;
        nbSnapshots = i;
        pos = entryStart;
        break;
      }
      snapshots.push({ entry, l1OffsetRaw, extraDataBytes });
    }
    this.snapshots = snapshots;
    this.snapshotsOffset = tableOffset;
    this.snapshotsBytes = pos;
    this.snapshotsRead = true;
    res.corruptions += reduced + dropped;
    if (reduced > 0) {
      const count = Buffer.alloc(4);
      count.writeUInt32BE(nbSnapshots, 0);
      try {
        await this.image.file.pwrite(count, 60, 'header');
        await this.image.file.fdatasync();
      } catch (err) {
        res.checkErrors++;
        if (this.verbose) this.log(`ERROR failed to update the snapshot count in the image header: ${err instanceof Error ? err.message : String(err)}`);
        throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
      }
      this.image.setHeader({ ...this.image.header, nbSnapshots });
      res.corruptionsFixed += reduced;
      res.corruptions -= reduced;
    }
    if (this.image.header.version >= 3) {
      snapshots.forEach((s, i) => {
        if (s.extraDataBytes < 16) {
          res.corruptions++;
          if (this.verbose) this.log(`${this.fix.errors ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete`);
        }
      });
    }
  }

  /** QEMU's qcow2_check_fix_snapshot_table: rewrite the table when it had corruptions. */
  async fixSnapshotTable(res: CheckCounters): Promise<void> {
    if (res.corruptions === 0 || !this.fix.errors) return;
    try {
      await writeSnapshotTable(this.image, this.snapshots.map((s) => s.entry), this.snapshotsOffset, this.snapshotsBytes, this.log);
    } catch (err) {
      res.checkErrors++;
      if (this.verbose) this.log(`ERROR failed to update snapshot table: ${err instanceof Error ? err.message : String(err)}`);
      throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
    }
    this.changedLayout = true;
    res.corruptionsFixed += res.corruptions;
    res.corruptions = 0;
  }

  /** The snapshots as read by the check (undefined when the table could not be read), for the image's in-memory list. */
  snapshotEntries(): { entries: SnapshotEntry[]; tableBytes: number } | undefined {
    if (!this.snapshotsRead) return undefined;
    return { entries: this.snapshots.map((s) => s.entry), tableBytes: this.snapshotsBytes };
  }

  // ------------------------------------------------------------------ counting references

  /** QEMU's qcow2_inc_refcounts_imrt. */
  private incRefcounts(res: CheckCounters, hostOffset: number, bytes: number): void {
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

  /**
   * QEMU's fix_l2_entry_by_zero: make an entry read as zeros (in `table`, recorded in `zeroed` for
   * writeZeroedEntries). Returns 'overlap' when the write would land on other metadata (the table
   * is not checked further).
   */
  private fixL2EntryByZero(res: CheckCounters, l2Offset: number, table: Buffer, index: number, active: boolean, zeroed: ZeroedEntries): 'fixed' | 'overlap' {
    const g = this.image.geometry;
    const old = readL2Entry(table, index, g);
    const zero: RawL2Entry = g.extendedL2
      ? { hi: 0, lo: 0, allocBitmap: 0, zeroBitmap: (old.zeroBitmap | old.allocBitmap) >>> 0 }
      : { hi: 0, lo: 1, allocBitmap: 0, zeroBitmap: 0 };
    writeL2Entry(table, index, g, zero);
    const entryOffsetBytes = l2Offset + index * g.l2EntryBytes;
    if (overlapsMetadata(this.image, entryOffsetBytes, g.l2EntryBytes, active ? 'l2' : undefined, 'L2 entry')) {
      if (this.verbose) this.log('ERROR: Overlap check failed');
      res.checkErrors++;
      return 'overlap';
    }
    // QEMU writes and syncs each entry; ours go out together after the walk (writeZeroedEntries).
    zeroed.count++;
    zeroed.first = Math.min(zeroed.first, index);
    zeroed.last = Math.max(zeroed.last, index);
    res.corruptions--;
    res.corruptionsFixed++;
    return 'fixed';
  }

  /** Write the entries fixL2EntryByZero changed in `table` (one write, synced); a failure undoes their count. */
  private async writeZeroedEntries(res: CheckCounters, l2Offset: number, table: Buffer, zeroed: ZeroedEntries): Promise<void> {
    if (zeroed.count === 0) return;
    const bytes = this.image.geometry.l2EntryBytes;
    try {
      await this.image.file.pwrite(table.subarray(zeroed.first * bytes, (zeroed.last + 1) * bytes), l2Offset + zeroed.first * bytes, 'l2');
      await this.image.file.fdatasync();
    } catch (err) {
      if (this.verbose) this.log(`ERROR: Failed to overwrite L2 table entry: ${err instanceof Error ? err.message : String(err)}`);
      res.checkErrors += zeroed.count;
      res.corruptions += zeroed.count;
      res.corruptionsFixed -= zeroed.count;
    }
    this.forgetL2(l2Offset);
  }

  /** Drop the image's cached slices of the L2 table at `l2Offset` (rewritten on disk by the repair). */
  private forgetL2(l2Offset: number): void {
    const g = this.image.geometry;
    const table = l2Offset - (l2Offset % g.clusterSize);
    for (let s = 0; s < g.clusterSize / g.l2SliceBytes; s++) this.image.l2Cache.discard(table + s * g.l2SliceBytes);
  }

  /** QEMU's check_refcounts_l2. */
  /**
   * QEMU's check_refcounts_l2. `memo` holds the effect of tables this L1 table refers to more than
   * once (only a corrupt image does that): a repeated visit replays it instead of walking again,
   * so an L1 table full of pointers to one cluster costs one walk, not one per entry.
   */
  private async checkRefcountsL2(res: CheckCounters, l2Offset: number, fragInfo: boolean, fix: FixMode, active: boolean, memo: Map<number, L2WalkEffect> | undefined): Promise<void> {
    const g = this.image.geometry;
    if (l2Offset >= this.fileBytes) return; // reads as zeros: no entry to count or flag
    const replay = memo?.get(l2Offset);
    if (replay) {
      for (const line of replay.messages) this.log(line);
      res.corruptions += replay.corruptions;
      res.allocatedClusters += replay.allocatedClusters;
      res.fragmentedClusters += replay.fragmentedClusters;
      res.compressedClusters += replay.compressedClusters;
      for (let k = 0; k < replay.incs.length; k += 2) this.incRefcounts(res, replay.incs[k], replay.incs[k + 1]);
      return;
    }
    const table = await this.read(l2Offset, g.clusterSize);
    const before = { ...res };
    const recording: L2WalkRecording | undefined = memo ? { messages: [], incs: [], incCorruptions: 0 } : undefined;
    this.recording = recording;
    const zeroed: ZeroedEntries = { count: 0, first: Number.POSITIVE_INFINITY, last: -1 };
    try {
      await this.countL2Entries(res, l2Offset, table, fragInfo, fix, active, zeroed);
    } finally {
      this.recording = undefined;
      if (zeroed.count > 0) {
        memo?.clear(); // the file changes: recorded walks may be stale
        await this.writeZeroedEntries(res, l2Offset, table, zeroed);
      }
    }
    if (memo && recording && res.corruptionsFixed === before.corruptionsFixed && res.checkErrors === before.checkErrors) {
      memo.set(l2Offset, {
        messages: recording.messages,
        incs: recording.incs,
        corruptions: res.corruptions - before.corruptions - recording.incCorruptions,
        allocatedClusters: res.allocatedClusters - before.allocatedClusters,
        fragmentedClusters: res.fragmentedClusters - before.fragmentedClusters,
        compressedClusters: res.compressedClusters - before.compressedClusters,
      });
    }
  }

  /** The per-entry part of check_refcounts_l2. */
  private async countL2Entries(res: CheckCounters, l2Offset: number, table: Buffer, fragInfo: boolean, fix: FixMode, active: boolean, zeroed: ZeroedEntries): Promise<void> {
    const g = this.image.geometry;
    const hasDataFile = this.image.hasDataFile;
    let nextContiguous = 0;
    for (let i = nextNonZeroEntry(table, 0, g.l2EntryBytes, g.l2Entries); i < g.l2Entries; i = nextNonZeroEntry(table, i + 1, g.l2EntryBytes, g.l2Entries)) {
      const e = readL2Entry(table, i, g);
      const kind = clusterKind(e, g, hasDataFile);
      if (kind !== 'compressed' && ((e.hi & 0x3f000000) !== 0 || (e.lo & 0x1fe) !== 0)) {
        if (this.verbose) this.note(`ERROR found l2 entry with reserved bits set: ${rawHex(e.hi, e.lo)}`);
        res.corruptions++;
      }
      switch (kind) {
        case 'compressed': {
          let entry = e;
          if ((e.hi & 0x80000000) !== 0) {
            const d = decodeCompressed(e, g);
            if (this.verbose) this.note(`ERROR: coffset=0x${hex(d.hostOffset)}: copied flag must never be set for compressed clusters`);
            entry = { ...e, hi: (e.hi & 0x7fffffff) >>> 0 };
            res.corruptions++;
          }
          if (hasDataFile) {
            if (this.verbose) this.note(`ERROR compressed cluster ${i} with data file, entry=0x${rawHex(entry.hi, entry.lo)}`);
            res.corruptions++;
            break;
          }
          if (e.allocBitmap !== 0 || e.zeroBitmap !== 0) {
            if (this.verbose) this.note(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${rawHex(entry.hi, entry.lo)}`);
            res.corruptions++;
            break;
          }
          const d = decodeCompressed(entry, g);
          this.incRefcounts(res, d.hostOffset, d.compressedBytes);
          if (fragInfo) {
            res.allocatedClusters++;
            res.compressedClusters++;
            res.fragmentedClusters++;
          }
          break;
        }
        case 'zero-alloc':
        case 'normal': {
          const offset = l2HostOffset(e);
          if ((e.zeroBitmap & e.allocBitmap) !== 0) {
            res.corruptions++;
            if (this.verbose) this.note(`ERROR offset=${hex(offset)}: Allocated cluster has corrupted subcluster allocation bitmap`);
          }
          if (offset % g.clusterSize !== 0) {
            res.corruptions++;
            const containsData = g.extendedL2 ? e.allocBitmap !== 0 : (e.lo & 1) === 0;
            if (!containsData) {
              if (this.verbose) this.note(`${fix.errors ? 'Repairing' : 'ERROR'} offset=${hex(offset)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
              if (fix.errors) {
                if (this.fixL2EntryByZero(res, l2Offset, table, i, active, zeroed) === 'overlap') throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
                continue;
              }
            } else {
              if (this.verbose) this.note(`ERROR offset=${hex(offset)}: Data cluster is not properly aligned; L2 entry corrupted.`);
            }
          }
          if (fragInfo) {
            res.allocatedClusters++;
            if (nextContiguous !== 0 && offset !== nextContiguous) res.fragmentedClusters++;
            nextContiguous = offset + g.clusterSize;
          }
          if (!hasDataFile) this.incRefcounts(res, offset, g.clusterSize);
          break;
        }
        case 'zero-plain':
          break;
        case 'unallocated':
          if (e.allocBitmap !== 0) {
            res.corruptions++;
            if (this.verbose) this.note('ERROR: Unallocated cluster has non-zero subcluster allocation map');
          }
          break;
      }
    }
  }

  /** QEMU's check_refcounts_l1. */
  private async checkRefcountsL1(res: CheckCounters, l1Offset: number, l1Entries: number, fragInfo: boolean, fix: FixMode, active: boolean): Promise<void> {
    if (l1Entries === 0) return;
    const cs = this.clusterSize;
    this.incRefcounts(res, l1Offset, l1Entries * 8);
    // Entries past the end of the file read as zeros: only the part inside it needs a walk.
    const inFile = l1Offset >= this.fileBytes ? 0 : Math.min(l1Entries, Math.ceil((this.fileBytes - l1Offset) / 8));
    const l1 = await this.read(l1Offset, inFile * 8);
    const repeated = repeatedTables(l1, inFile);
    const memo = repeated ? new Map<number, L2WalkEffect>() : undefined;
    this.progress(l1Entries - inFile);
    for (let i = 0; i < inFile; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const lo = l1.readUInt32BE(i * 8 + 4);
      if (i % 64 === 63) this.progress(64);
      if (hi === 0 && lo === 0) continue;
      if ((hi & 0x7f000000) !== 0 || (lo & 0x1ff) !== 0) {
        if (this.verbose) this.log(`ERROR found L1 entry with reserved bits set: ${rawHex(hi, lo)}`);
        res.corruptions++;
      }
      const l2Offset = entryOffset(hi, lo);
      this.incRefcounts(res, l2Offset, cs);
      if (l2Offset % cs !== 0) {
        if (this.verbose) this.log(`ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
        res.corruptions++;
      }
      await this.checkRefcountsL2(res, l2Offset, fragInfo, fix, active, memo !== undefined && repeated!.has(l2Offset) ? memo : undefined);
    }
    this.progress(inFile % 64);
  }

  /** QEMU's check_refblocks: count the refcount blocks, flag bad reftable entries. */
  private async checkRefblocks(res: CheckCounters, fix: FixMode, rebuild: { needed: boolean }): Promise<void> {
    const cs = this.clusterSize;
    const refcounts = this.image.refcounts;
    const table = await this.read(refcounts.reftableOffset, refcounts.reftableClusters * cs);
    const entries = table.length / 8;
    for (let i = nextNonZeroEntry(table, 0, 8, entries); i < entries; i = nextNonZeroEntry(table, i + 1, 8, entries)) {
      const raw = readU64(table, i * 8);
      const offsetRaw = raw & ~0x1ffn;
      if ((raw & 0x1ffn) !== 0n) {
        if (this.verbose) this.log(`ERROR refcount table entry ${i} has reserved bits set`);
        res.corruptions++;
        rebuild.needed = true;
        continue;
      }
      if (offsetRaw % BigInt(cs) !== 0n) {
        if (this.verbose) this.log(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        res.corruptions++;
        rebuild.needed = true;
        continue;
      }
      const cluster = offsetRaw / BigInt(cs);
      if (cluster >= BigInt(this.refs.size)) {
        res.corruptions++;
        if (this.verbose) this.log(`${fix.errors ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
        if (fix.errors) {
          const failure = await this.growFileForRefblock(res, offsetRaw);
          if (failure === undefined) continue;
          rebuild.needed = true;
          if (this.verbose) this.log(`ERROR could not resize image: ${failure}`);
        }
        continue;
      }
      const offset = Number(offsetRaw);
      if (offset !== 0) {
        this.incRefcounts(res, offset, cs);
        const refcount = this.refs.get(Number(cluster));
        if (refcount !== 1) {
          if (this.verbose) this.log(`ERROR refcount block ${i} refcount=${refcount}`);
          res.corruptions++;
          rebuild.needed = true;
        }
      }
    }
  }

  /**
   * Extend the file so a refcount block past its end lies inside (check_refblocks' repair); the
   * failure text, or undefined. Unlike QEMU, a block more than MAX_REFBLOCK_GROWTH_BYTES past the end
   * is not grown into (a hostile entry would make a huge sparse file): the rebuild handles it.
   */
  private async growFileForRefblock(res: CheckCounters, offsetRaw: bigint): Promise<string | undefined> {
    const cs = this.clusterSize;
    const end = toSafeNumber(offsetRaw + BigInt(cs));
    if (end === undefined || end > this.fileBytes + MAX_REFBLOCK_GROWTH_BYTES) return ERRNO_TEXT.EFBIG;
    try {
      await this.image.file.truncate(end);
      await this.refreshFileBytes();
    } catch (err) {
      return err instanceof Error ? err.message : String(err);
    }
    this.refs.resize(Math.ceil(this.fileBytes / cs));
    const cluster = Number(offsetRaw) / cs;
    if (cluster >= this.refs.size) return ERRNO_TEXT.EINVAL;
    res.corruptions--;
    res.corruptionsFixed++;
    this.incRefcounts(res, Number(offsetRaw), cs);
    return undefined;
  }

  /** QEMU's qcow2_check_bitmaps_refcounts. */
  private async checkBitmaps(res: CheckCounters): Promise<void> {
    const bitmaps = this.image.header.bitmaps;
    if (!bitmaps || bitmaps.nbBitmaps === 0) return;
    this.incRefcounts(res, bitmaps.directoryOffset, bitmaps.directoryBytes);
    const list = await this.loadBitmapList(bitmaps.directoryOffset, bitmaps.directoryBytes, bitmaps.nbBitmaps);
    if (list === undefined) {
      res.corruptions++;
      throw new CheckAbortError('EINVAL', ERRNO_TEXT.EINVAL);
    }
    const cs = this.clusterSize;
    for (const bm of list) {
      this.incRefcounts(res, bm.tableOffset, bm.tableEntries * 8);
      const table = await this.read(bm.tableOffset, bm.tableEntries * 8);
      const entries: bigint[] = [];
      for (let i = 0; i < bm.tableEntries; i++) {
        const entry = readU64(table, i * 8);
        if (!bitmapTableEntryValid(entry, cs)) {
          res.corruptions++;
          throw new CheckAbortError('EINVAL', ERRNO_TEXT.EINVAL);
        }
        entries.push(entry);
      }
      for (const entry of entries) {
        const offset = Number(entry & 0x00fffffffffffe00n);
        if (offset !== 0) this.incRefcounts(res, offset, cs);
      }
    }
  }

  /** QEMU's bitmap_list_load: the bitmap directory's entries, or undefined when it is broken. */
  private async loadBitmapList(offset: number, bytes: number, nbBitmaps: number): Promise<{ tableOffset: number; tableEntries: number }[] | undefined> {
    if (bytes === 0 || bytes > MAX_BITMAP_DIRECTORY_BYTES) return undefined;
    const dir = await this.read(offset, bytes);
    const cs = this.clusterSize;
    const list: { tableOffset: number; tableEntries: number }[] = [];
    let pos = 0;
    while (pos < bytes) {
      if (pos + BME_DIR_ENTRY_BYTES > bytes) return undefined;
      if (list.length + 1 > nbBitmaps) return undefined;
      const tableOffset = readU64(dir, pos);
      const tableEntries = dir.readUInt32BE(pos + 8);
      const flags = dir.readUInt32BE(pos + 12);
      const type = dir.readUInt8(pos + 16);
      const granularityBits = dir.readUInt8(pos + 17);
      const nameBytes = dir.readUInt16BE(pos + 18);
      const extraBytes = dir.readUInt32BE(pos + 20);
      const next = pos + Math.ceil((BME_DIR_ENTRY_BYTES + nameBytes + extraBytes) / 8) * 8;
      if (next > bytes) return undefined;
      if (extraBytes !== 0) return undefined;
      const bad = tableEntries === 0 || tableOffset === 0n || tableOffset % BigInt(cs) !== 0n || tableEntries > BME_MAX_TABLE_SIZE
        || granularityBits > 31 || granularityBits < 9 || (flags & 0xfffffffc) !== 0 || nameBytes > BME_MAX_NAME_SIZE || type !== 1;
      if (bad) return undefined;
      const physBytes = tableEntries * cs;
      if (physBytes > BME_MAX_PHYS_SIZE) return undefined;
      if ((flags & 1) === 0 && this.image.virtualSize > physBytes * 8 * 2 ** granularityBits) return undefined;
      list.push({ tableOffset: Number(tableOffset), tableEntries });
      pos = next;
    }
    if (list.length !== nbBitmaps || pos !== bytes) return undefined;
    return list;
  }

  /** QEMU's calculate_refcounts: count every reference into `this.refs`. */
  private async calculateRefcounts(res: CheckCounters, fix: FixMode, rebuild: { needed: boolean }): Promise<void> {
    const image = this.image;
    const cs = this.clusterSize;
    this.incRefcounts(res, 0, cs);
    // A live image's compressed writer holds one reference on each host cluster it is still filling;
    // no table holds it (QEMU has no such state). Counted, it is neither a leak nor something to "fix".
    for (const hostOffset of image.heldHostClustersLocked()) this.incRefcounts(res, hostOffset, cs);
    await this.checkRefcountsL1(res, image.activeMap.l1.offset, image.activeMap.l1.entries, true, fix, true);
    if (image.hasDataFile && this.snapshots.length > 0) {
      if (this.verbose) this.log(`ERROR ${this.snapshots.length} snapshots in image with data file`);
      res.corruptions++;
    }
    for (const s of this.snapshots) {
      if (s.l1OffsetRaw % BigInt(cs) !== 0n) {
        if (this.verbose) this.log(`ERROR snapshot ${s.entry.id} (${s.entry.name}) l1_offset=0x${hex(s.l1OffsetRaw)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
        res.corruptions++;
        continue;
      }
      if (s.entry.l1Entries > QCOW_MAX_L1_SIZE_BYTES / 8) {
        if (this.verbose) this.log(`ERROR snapshot ${s.entry.id} (${s.entry.name}) l1_size=0x${hex(s.entry.l1Entries)}: L1 table is too large; snapshot table entry corrupted`);
        res.corruptions++;
        continue;
      }
      await this.checkRefcountsL1(res, Number(s.l1OffsetRaw), s.entry.l1Entries, false, fix, false);
    }
    this.incRefcounts(res, this.snapshotsOffset, this.snapshotsBytes);
    this.incRefcounts(res, image.refcounts.reftableOffset, image.refcounts.reftableClusters * cs);
    await this.checkBitmaps(res);
    await this.checkRefblocks(res, fix, rebuild);
  }

  /** QEMU's compare_refcounts; returns the highest cluster index in use (on disk or by reference). */
  private async compareRefcounts(res: CheckCounters, fix: FixMode, rebuild: { needed: boolean }): Promise<number> {
    const g = this.image.geometry;
    const cs = this.clusterSize;
    let highest = 0;
    const nbClusters = this.refs.size;
    for (let ri = 0; ri * g.refblockEntries < nbClusters; ri++) {
      const block = await this.readRefblock(ri);
      const end = Math.min(nbClusters, (ri + 1) * g.refblockEntries);
      for (let i = ri * g.refblockEntries; i < end; i++) {
        if (block === 'error') {
          if (this.verbose) this.log(`Can't get refcount for cluster ${i}: ${ERRNO_TEXT.EIO}`);
          res.checkErrors++;
          continue;
        }
        const onDisk = block === undefined ? 0 : getRefcount(block, g.refblockIndex(i), g.refcountOrder);
        const counted = this.refs.get(i);
        if (onDisk > 0 || counted > 0) highest = i;
        if (onDisk === counted) continue;
        let fixKind: 'leak' | 'corruption' | undefined;
        if (onDisk === 0) rebuild.needed = true;
        else if (onDisk > counted && fix.leaks) fixKind = 'leak';
        else if (onDisk < counted && fix.errors) fixKind = 'corruption';
        if (this.verbose) this.log(`${fixKind !== undefined ? 'Repairing' : onDisk < counted ? 'ERROR' : 'Leaked'} cluster ${i} refcount=${onDisk} reference=${counted}`);
        if (fixKind !== undefined) {
          try {
            await this.image.refcounts.updateRefcount(i * cs, cs, counted - onDisk);
            if (fixKind === 'leak') res.leaksFixed++;
            else res.corruptionsFixed++;
            continue;
          } catch {
            // counted below as not fixed
          }
        }
        if (onDisk < counted) {
          res.corruptions++;
        } else {
          res.leaks++;
        }
      }
      this.progress(1);
    }
    if (fix.beyondEnd === true) highest = Math.max(highest, await this.compareBeyondEnd(res, fix, nbClusters));
    return highest;
  }

  /**
   * FixMode.beyondEnd: clusters from `fromCluster` on (past the file and every reference) that a
   * refcount block still counts are leaks. Only blocks that are sound — inside the file and counted
   * exactly once, as the refcount block they are — are read: a damaged table entry must not make the
   * repair read (or fix) arbitrary clusters as refcounts, nor scan terabytes of them.
   */
  private async compareBeyondEnd(res: CheckCounters, fix: FixMode, fromCluster: number): Promise<number> {
    const g = this.image.geometry;
    const cs = this.clusterSize;
    const table = this.image.refcounts.reftable;
    const fileClusters = Math.ceil(this.fileBytes / cs);
    let highest = 0;
    for (let ri = Math.floor(fromCluster / g.refblockEntries); ri < table.length; ri++) {
      const offset = table[ri];
      if (offset <= 0 || offset % cs !== 0 || offset / cs >= fileClusters || this.refs.get(offset / cs) !== 1) continue;
      const block = await this.readRefblock(ri);
      if (block === undefined || block === 'error') continue;
      for (let i = Math.max(fromCluster, ri * g.refblockEntries); i < (ri + 1) * g.refblockEntries; i++) {
        const onDisk = getRefcount(block, g.refblockIndex(i), g.refcountOrder);
        if (onDisk === 0) continue;
        highest = i;
        if (this.verbose) this.log(`${fix.leaks ? 'Repairing' : 'Leaked'} cluster ${i} refcount=${onDisk} reference=0`);
        if (fix.leaks) {
          try {
            await this.image.refcounts.updateRefcount(i * cs, cs, -onDisk);
            res.leaksFixed++;
            continue;
          } catch {
            // counted below as not fixed
          }
        }
        res.leaks++;
      }
    }
    return highest;
  }

  /** QEMU's check_oflag_copied: COPIED must be set exactly where the refcount is 1 (active L1 and L2). */
  private async checkOflagCopied(res: CheckCounters, fix: FixMode): Promise<void> {
    const image = this.image;
    const g = image.geometry;
    const repair = fix.errors ? true : fix.leaks ? res.checkErrors === 0 && res.corruptions === 0 && res.leaks === 0 : false;
    const refcountOf = this.refcountReader();
    const l1 = image.activeMap.l1;
    const repeated = repeatedTables(l1.buf, l1.entries);
    /** Mismatches found in tables listed more than once (replayed, not re-walked, while nothing was rewritten). */
    const memo = new Map<number, { messages: string[]; mismatches: number }>();
    for (let i = 0; i < l1.entries; i++) {
      const hi = l1.buf.readUInt32BE(i * 8);
      const lo = l1.buf.readUInt32BE(i * 8 + 4);
      const l2Offset = entryOffset(hi, lo);
      if (l2Offset === 0) continue;
      const refcount = await refcountOf(g.clusterIndex(l2Offset));
      if (refcount === 'error') continue;
      const copied = (hi & 0x80000000) !== 0;
      if ((refcount === 1) !== copied) {
        res.corruptions++;
        if (this.verbose) this.log(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${rawHex(hi, lo)} refcount=${refcount}`);
        if (repair) {
          l1.buf.writeUInt32BE(refcount === 1 ? (hi | 0x80000000) >>> 0 : (hi & 0x7fffffff) >>> 0, i * 8);
          await this.writeL1Entry(res, i);
          res.corruptions--;
          res.corruptionsFixed++;
        }
      }
      const replay = memo.get(l2Offset);
      if (replay) {
        for (const line of replay.messages) this.log(line);
        res.corruptions += replay.mismatches;
        continue;
      }
      const table = await this.read(l2Offset, g.clusterSize);
      const messages: string[] = [];
      let dirty = 0;
      let mismatches = 0;
      for (let j = nextNonZeroEntry(table, 0, g.l2EntryBytes, g.l2Entries); j < g.l2Entries; j = nextNonZeroEntry(table, j + 1, g.l2EntryBytes, g.l2Entries)) {
        const e = readL2Entry(table, j, g);
        const kind = clusterKind(e, g, image.hasDataFile);
        if (kind !== 'normal' && kind !== 'zero-alloc') continue;
        const dataRefcount = image.hasDataFile ? 1 : await refcountOf(g.clusterIndex(l2HostOffset(e)));
        if (dataRefcount === 'error') continue;
        const dataCopied = (e.hi & 0x80000000) !== 0;
        if ((dataRefcount === 1) !== dataCopied) {
          res.corruptions++;
          mismatches++;
          const line = `${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${rawHex(e.hi, e.lo)} refcount=${dataRefcount}`;
          messages.push(line);
          if (this.verbose) this.log(line);
          if (repair) {
            writeL2Entry(table, j, g, { ...e, hi: dataRefcount === 1 ? (e.hi | 0x80000000) >>> 0 : (e.hi & 0x7fffffff) >>> 0 });
            dirty++;
          }
        }
      }
      if (dirty > 0) {
        if (overlapsMetadata(image, l2Offset, g.clusterSize, 'l2', 'L2 table')) {
          if (this.verbose) this.log(`ERROR: Could not write L2 table; metadata overlap check failed: ${ERRNO_TEXT.EIO}`);
          res.checkErrors++;
          throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
        }
        try {
          await image.file.pwrite(table, l2Offset, 'l2');
        } catch (err) {
          if (this.verbose) this.log(`ERROR: Could not write L2 table: ${err instanceof Error ? err.message : String(err)}`);
          res.checkErrors++;
          throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
        }
        this.forgetL2(l2Offset);
        res.corruptions -= dirty;
        res.corruptionsFixed += dirty;
        memo.clear(); // the file changed: recorded tables may be stale
      } else if (repeated?.has(l2Offset) === true) {
        memo.set(l2Offset, { messages, mismatches });
      }
    }
  }

  /** QEMU's qcow2_write_l1_entry: the 512-byte group of entries around `index`, synced. */
  private async writeL1Entry(res: CheckCounters, index: number): Promise<void> {
    const l1 = this.image.activeMap.l1;
    const first = index - (index % 64);
    const count = Math.min(64, l1.entries - first);
    const offset = l1.offset + first * 8;
    try {
      if (overlapsMetadata(this.image, offset, count * 8, 'l1', 'L1 table')) throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
      await this.image.file.pwrite(l1.buf.subarray(first * 8, (first + count) * 8), offset, 'l1');
      await this.image.file.fdatasync();
    } catch {
      res.checkErrors++;
      throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
    }
  }

  /** QEMU's qcow2_check_refcounts. */
  async checkRefcounts(res: CheckCounters): Promise<void> {
    const image = this.image;
    const g = image.geometry;
    const cs = this.clusterSize;
    await this.refreshFileBytes();
    const nbClusters = Math.ceil(this.fileBytes / cs);
    if (nbClusters > MAX_CHECK_CLUSTERS) {
      res.checkErrors++;
      throw new CheckAbortError('EFBIG', ERRNO_TEXT.EFBIG);
    }
    res.totalClusters = Math.ceil((Math.floor(image.virtualSize / 512) * 512) / cs);
    try {
      this.refs = new RefcountArray(g.refcountOrder, g.maxRefcount, nbClusters);
    } catch (err) {
      res.checkErrors++;
      throw err;
    }
    this.progressTotal = image.activeMap.l1.entries + this.snapshots.reduce((n, s) => n + Math.min(s.entry.l1Entries, QCOW_MAX_L1_SIZE_BYTES / 8), 0)
      + Math.ceil(nbClusters / g.refblockEntries);
    const rebuild = { needed: false };
    await this.calculateRefcounts(res, this.fix, rebuild);
    const preCompare = { ...res };
    let highest = await this.compareRefcounts(res, { ...NO_FIX, beyondEnd: this.fix.beyondEnd }, rebuild);
    if (rebuild.needed && this.fix.errors) {
      const old = { ...res };
      let freshLeaks = 0;
      if (this.verbose) this.log('Rebuilding refcount structure');
      try {
        await rebuildRefcountStructure(image, this.refs);
      } catch (err) {
        res.checkErrors++;
        throw err;
      }
      this.changedLayout = true;
      await this.refreshFileBytes();
      res.corruptions = 0;
      res.leaks = 0;
      rebuild.needed = false;
      this.refs.clear();
      await this.calculateRefcounts(res, NO_FIX, rebuild);
      if (this.fix.leaks) {
        const saved = { ...res };
        Object.assign(res, zeroCounters());
        highest = await this.compareRefcounts(res, { leaks: true, errors: false, beyondEnd: this.fix.beyondEnd }, rebuild);
        if (rebuild.needed) this.log('ERROR rebuilt refcount structure is still broken');
        freshLeaks = res.leaks;
        Object.assign(res, saved);
      }
      if (res.corruptions < old.corruptions) res.corruptionsFixed += old.corruptions - res.corruptions;
      if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
      res.leaks += freshLeaks;
    } else if (this.fix.leaks || this.fix.errors) {
      if (rebuild.needed) {
        if (this.verbose) this.log('ERROR need to rebuild refcount structures');
        res.checkErrors++;
        throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
      }
      if (res.leaks > 0 || res.corruptions > 0) {
        Object.assign(res, preCompare);
        highest = await this.compareRefcounts(res, this.fix, rebuild);
      }
    }
    await this.checkOflagCopied(res, this.fix);
    res.imageEndOffset = (highest + 1) * cs;
  }
}

/** Whether L2 entry `index` (with its bitmap) is all zeros: an unallocated cluster with nothing to check. */
function isZeroEntry(table: Buffer, index: number, entryBytes: number): boolean {
  const pos = index * entryBytes;
  for (let k = 0; k < entryBytes; k += 4) if (table.readUInt32BE(pos + k) !== 0) return false;
  return true;
}

const ZERO_RUN = Buffer.alloc(512);

/**
 * The first entry at or after `index` (before `limit`) that is not all zeros, or `limit`: empty
 * stretches of a table are skipped 512 bytes at a time with a native compare.
 */
export function nextNonZeroEntry(table: Buffer, index: number, entryBytes: number, limit: number): number {
  let i = index;
  const perRun = ZERO_RUN.length / entryBytes;
  while (i < limit) {
    if (i % perRun === 0 && i + perRun <= limit && table.compare(ZERO_RUN, 0, ZERO_RUN.length, i * entryBytes, (i + perRun) * entryBytes) === 0) {
      i += perRun;
      continue;
    }
    if (!isZeroEntry(table, i, entryBytes)) return i;
    i++;
  }
  return limit;
}

function bitmapTableEntryValid(entry: bigint, clusterSize: number): boolean {
  if ((entry & 0xff000000000001fen) !== 0n) return false;
  const offset = entry & 0x00fffffffffffe00n;
  if (offset !== 0n && ((entry & 1n) !== 0n || offset % BigInt(clusterSize) !== 0n)) return false;
  return true;
}

/** Write back the image's table caches so the check reads from the file what the image holds. */
async function writeBackCaches(image: ImageState): Promise<void> {
  if (image.file.readOnly) return;
  await image.l2Cache.flush();
  await image.refcountCache.flush();
  await image.file.fdatasync();
}

/**
 * One check pass with QEMU's qcow2_co_check_locked semantics: the snapshot table, the refcounts, the
 * snapshot table repair; with repairs and no corruption left, the dirty and corrupt bits are
 * cleared. The caller holds the image's metadata lock. Throws CheckFailedError when the check could
 * not run to its end.
 */
export async function checkPassLocked(image: ImageState, fix: FixMode, log?: (line: string) => void, onProgress?: (done: number, total: number) => void): Promise<CheckCounters> {
  const result = zeroCounters();
  const snapshotRes = zeroCounters();
  const refcountRes = zeroCounters();
  const checker = new Checker(image, fix, log, onProgress);
  const abort = (err: unknown): never => {
    if (err instanceof CheckAbortError) throw new CheckFailedError(err.errno, ERRNO_TEXT[err.errno], result);
    const message = err instanceof Error ? err.message : String(err);
    result.checkErrors++;
    throw new CheckFailedError('EIO', message, result);
  };
  await writeBackCaches(image);
  try {
    try {
      await checker.readSnapshotTable(snapshotRes);
    } catch (err) {
      addCounters(result, snapshotRes, false);
      return abort(err);
    }
    try {
      await checker.checkRefcounts(refcountRes);
    } catch (err) {
      addCounters(result, refcountRes, true);
      addCounters(result, snapshotRes, false);
      return abort(err);
    }
    addCounters(result, refcountRes, true);
    try {
      await checker.fixSnapshotTable(snapshotRes);
    } finally {
      addCounters(result, snapshotRes, false);
    }
    if (fix.leaks || fix.errors) {
      await writeBackCaches(image);
      if (result.checkErrors === 0 && result.corruptions === 0) await markCleanAndConsistent(image);
    }
  } catch (err) {
    if (err instanceof CheckFailedError) throw err;
    return abort(err);
  } finally {
    // Bring the image's in-memory view in line with what the check read and changed.
    const repairing = fix.leaks || fix.errors;
    const snapshots = checker.snapshotEntries();
    const loaded = snapshots !== undefined && (repairing || (image.snapshots.length === 0 && snapshots.entries.length > 0));
    if (loaded) {
      image.setSnapshotTable(snapshots.entries, snapshots.tableBytes);
    }
    if (repairing) {
      await writeBackCaches(image).catch(() => undefined);
      image.l2Cache.invalidateClean();
      image.refcountCache.invalidateClean();
    }
    if (loaded || repairing || checker.changedLayout) image.registerMetadata();
  }
  return result;
}

/** QEMU's qcow2_mark_clean + qcow2_mark_consistent: clear the dirty and corrupt bits. */
async function markCleanAndConsistent(image: ImageState): Promise<void> {
  const bits = image.header.incompatibleFeatures;
  const cleared = withBit(withBit(bits, INCOMPAT_DIRTY, false), INCOMPAT_CORRUPT, false);
  if (cleared !== bits) await image.updateHeader({ incompatibleFeatures: cleared });
}

/**
 * The report qemu-img prints (collect_image_check): check-errors always, other counts when non-zero;
 * keys in the order qemu-img's JSON lists them (its QDict hash buckets), so JSON.stringify matches.
 */
function toReport(image: ImageState, c: CheckCounters): CheckResult {
  const optional = (value: number): number | undefined => (value !== 0 ? value : undefined);
  const ordered: CheckResult = {
    'image-end-offset': optional(c.imageEndOffset),
    'compressed-clusters': optional(c.compressedClusters),
    'total-clusters': optional(c.totalClusters),
    corruptions: optional(c.corruptions),
    'corruptions-fixed': optional(c.corruptionsFixed),
    'check-errors': c.checkErrors,
    leaks: optional(c.leaks),
    'leaks-fixed': optional(c.leaksFixed),
    'allocated-clusters': optional(c.allocatedClusters),
    filename: image.path,
    format: 'qcow2',
    'fragmented-clusters': optional(c.fragmentedClusters),
  };
  for (const key of Object.keys(ordered) as (keyof CheckResult)[]) if (ordered[key] === undefined) delete ordered[key];
  return ordered;
}

/**
 * Check the image as `qemu-img check [-r leaks|all]` does: one pass with the requested repairs and,
 * when something was fixed, a second read-only pass whose counts are reported together with the
 * numbers fixed. Throws CheckFailedError when the check could not run to its end (qemu-img prints
 * no report then and exits 1), EROFS when a repair is asked of a read-only image.
 */
export async function checkImage(qcow2: Qcow2Image, options: CheckOptions = {}): Promise<CheckResult> {
  const image = imageState(qcow2);
  const fix: FixMode = { leaks: options.repair !== undefined, errors: options.repair === 'all' };
  if ((fix.leaks || fix.errors) && image.readOnly) {
    throw new CodedError('EROFS', `${image.path}: cannot repair an image opened read-only`, { image: image.path });
  }
  const log = options.onMessage;
  return image.lock.run(async () => {
    // A live image may hold overwritten entries whose storage it frees in batches: free them now,
    // or their still-counted references would show as leaks.
    if (!image.readOnly) await image.activeMap.releaseDeferredFrees();
    let counters = await checkPassLocked(image, fix, log, options.onProgress);
    if (counters.corruptionsFixed !== 0 || counters.leaksFixed !== 0) {
      const { corruptionsFixed, leaksFixed } = counters;
      counters = await checkPassLocked(image, NO_FIX, log, options.onProgress);
      counters.corruptionsFixed = corruptionsFixed;
      counters.leaksFixed = leaksFixed;
    }
    return toReport(image, counters);
  });
}
