/**
 * FaultyHostFile: a HostFile wrapper that injects the failures real disks produce.
 *
 * Contract:
 * - Every call is forwarded to the wrapped HostFile unless a fault fires.
 * - Write faults: `failWrite({nth, point?, code?, times?})` makes the nth pwrite counted from now
 *   (1-based; only writes at `point` when given, else every pwrite) and the `times - 1` matching
 *   writes after it (default times 1; Infinity = every one from then on, a full or dead disk) fail
 *   with a HostIoError of `code` (EIO default, or ENOSPC). A failed write changes nothing.
 *   Only pwrite counts as a write; fallocate-style calls are never failed.
 * - Sync faults: `failSync({nth, code?, times?})` does the same for fdatasync. A failed fdatasync
 *   makes nothing durable (the journal below is kept; later syncs may still succeed).
 * - Power cut (`journal: true`): the wrapper keeps the durable state — the contents as of the last
 *   successful fdatasync (initially the wrapped file's contents) — and a journal of every change
 *   since (pwrite, truncate, zeroRange, punchHole, allocate). `powerCut()` returns a new
 *   MemoryHostFile holding the durable state plus a random subset of the journal applied in order
 *   (each entry kept with probability `keepProbability`, default 0.5, from a seeded RNG so a seed
 *   reproduces a run). With `tornSectorBytes`, each journaled write is split into sectors of that
 *   size that are kept or lost independently (torn writes). After powerCut() the wrapper is dead:
 *   every call fails with EIO, like a machine that lost power. Power-cut mode copies the whole
 *   file into memory: use it with test-sized images.
 */
import { allocAligned, alignUp, DEFAULT_ALIGNMENT_BYTES } from './aligned-buffer.js';
import { HostIoError } from './errors.js';
import type { HostFile, WritePoint } from './host-file.js';
import { MemoryHostFile } from './memory-host-file.js';

export type InjectedErrorCode = 'EIO' | 'ENOSPC';

export interface WriteFault {
  /** 1-based index, counted from when the fault is armed, of the first matching pwrite to fail. */
  nth: number;
  /** Count only pwrites at this WritePoint (default: every pwrite). */
  point?: WritePoint;
  code?: InjectedErrorCode;
  /** How many consecutive matching pwrites fail (default 1; Infinity for all). */
  times?: number;
}

export interface SyncFault {
  /** 1-based index, counted from when the fault is armed, of the first fdatasync to fail. */
  nth: number;
  code?: InjectedErrorCode;
  /** How many consecutive fdatasyncs fail (default 1; Infinity for all). */
  times?: number;
}

export interface FaultyHostFileOptions {
  writeFault?: WriteFault;
  syncFault?: SyncFault;
  /** Keep the durable state and a journal of unflushed changes for powerCut(). */
  journal?: boolean;
  /** RNG seed for powerCut() (default 1). */
  seed?: number;
  /** Probability that an unflushed change survives a power cut (default 0.5). */
  keepProbability?: number;
  /** Split unflushed writes into sectors of this size that survive independently. */
  tornSectorBytes?: number;
}

type JournalEntry =
  | { kind: 'write'; hostOffset: number; data: Buffer }
  | { kind: 'truncate'; bytes: number }
  | { kind: 'zeroRange'; offset: number; length: number; keepSize: boolean }
  | { kind: 'punchHole'; offset: number; length: number }
  | { kind: 'allocate'; offset: number; length: number; keepSize: boolean };

interface ArmedFault {
  fromCount: number;
  lastCount: number;
  code: InjectedErrorCode;
  point?: WritePoint;
}

/** Counts of forwarded and failed calls. */
export interface FaultyHostFileStats {
  pwrites: number;
  pwritesByPoint: Map<WritePoint, number>;
  fdatasyncs: number;
  injectedWriteFaults: number;
  injectedSyncFaults: number;
}

/** mulberry32: a small deterministic 32-bit PRNG returning floats in [0, 1). */
function makeRng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function arm(nth: number, times: number | undefined, code: InjectedErrorCode | undefined, currentCount: number,
  point?: WritePoint): ArmedFault {
  if (!Number.isInteger(nth) || nth < 1) {
    throw new RangeError(`fault nth must be an integer >= 1, got ${nth}`);
  }
  const count = times ?? 1;
  const fault: ArmedFault = { fromCount: currentCount + nth, lastCount: currentCount + nth + count - 1, code: code ?? 'EIO' };
  if (point !== undefined) {
    fault.point = point;
  }
  return fault;
}

export class FaultyHostFile implements HostFile {
  readonly stats: FaultyHostFileStats = {
    pwrites: 0, pwritesByPoint: new Map(), fdatasyncs: 0, injectedWriteFaults: 0, injectedSyncFaults: 0,
  };
  private writeFault: ArmedFault | undefined;
  private syncFault: ArmedFault | undefined;
  private readonly journal: JournalEntry[] = [];
  private readonly durable: MemoryHostFile | undefined;
  private readonly rng: () => number;
  private readonly keepProbability: number;
  private readonly tornSectorBytes: number | undefined;
  private dead = false;

  private constructor(private readonly inner: HostFile, options: FaultyHostFileOptions, durable: MemoryHostFile | undefined) {
    this.durable = durable;
    this.rng = makeRng(options.seed ?? 1);
    this.keepProbability = options.keepProbability ?? 0.5;
    this.tornSectorBytes = options.tornSectorBytes;
    if (options.writeFault !== undefined) {
      this.failWrite(options.writeFault);
    }
    if (options.syncFault !== undefined) {
      this.failSync(options.syncFault);
    }
  }

  /** Wrap `inner`; in journal mode its current contents become the initial durable state. */
  static async wrap(inner: HostFile, options: FaultyHostFileOptions = {}): Promise<FaultyHostFile> {
    let durable: MemoryHostFile | undefined;
    if (options.journal === true) {
      const sizeBytes = await inner.size();
      const contents = allocAligned(alignUp(sizeBytes, inner.dioAlignment), Math.max(DEFAULT_ALIGNMENT_BYTES, inner.dioAlignment));
      const readBytes = contents.length === 0 ? 0 : await inner.pread(contents, 0);
      durable = MemoryHostFile.from(contents.subarray(0, readBytes), { path: `${inner.path} (durable)` });
      await durable.truncate(sizeBytes);
    }
    return new FaultyHostFile(inner, options, durable);
  }

  get path(): string {
    return this.inner.path;
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  get direct(): boolean {
    return this.inner.direct;
  }

  get dioAlignment(): number {
    return this.inner.dioAlignment;
  }

  /** Number of changes written since the last successful fdatasync (journal mode). */
  get unflushedChanges(): number {
    return this.journal.length;
  }

  /** Arm a write fault (replaces any armed one); counting starts now. */
  failWrite(fault: WriteFault): void {
    const current = fault.point === undefined ? this.stats.pwrites : (this.stats.pwritesByPoint.get(fault.point) ?? 0);
    this.writeFault = arm(fault.nth, fault.times, fault.code, current, fault.point);
  }

  /** Arm an fdatasync fault (replaces any armed one); counting starts now. */
  failSync(fault: SyncFault): void {
    this.syncFault = arm(fault.nth, fault.times, fault.code, this.stats.fdatasyncs);
  }

  /** Disarm every fault. */
  clearFaults(): void {
    this.writeFault = undefined;
    this.syncFault = undefined;
  }

  private checkAlive(operation: string): void {
    if (this.dead) {
      throw new HostIoError('EIO', this.path, operation, undefined, 'device lost power');
    }
  }

  private record(entry: JournalEntry): void {
    if (this.durable !== undefined) {
      this.journal.push(entry);
    }
  }

  async pread(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<number> {
    this.checkAlive('pread');
    return this.inner.pread(buf, hostOffset, point);
  }

  async pwrite(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<void> {
    this.checkAlive('pwrite');
    this.stats.pwrites += 1;
    const pointCount = point === undefined ? 0 : (this.stats.pwritesByPoint.get(point) ?? 0) + 1;
    if (point !== undefined) {
      this.stats.pwritesByPoint.set(point, pointCount);
    }
    const fault = this.writeFault;
    if (fault !== undefined) {
      const count = fault.point === undefined ? this.stats.pwrites : (fault.point === point ? pointCount : -1);
      if (count >= fault.fromCount && count <= fault.lastCount) {
        this.stats.injectedWriteFaults += 1;
        throw new HostIoError(fault.code, this.path, `pwrite${point === undefined ? '' : ` (${point})`}`, hostOffset,
          `${fault.code} (injected)`);
      }
    }
    await this.inner.pwrite(buf, hostOffset, point);
    this.record({ kind: 'write', hostOffset, data: Buffer.from(buf) });
  }

  async fdatasync(): Promise<void> {
    this.checkAlive('fdatasync');
    this.stats.fdatasyncs += 1;
    const fault = this.syncFault;
    if (fault !== undefined && this.stats.fdatasyncs >= fault.fromCount && this.stats.fdatasyncs <= fault.lastCount) {
      this.stats.injectedSyncFaults += 1;
      throw new HostIoError(fault.code, this.path, 'fdatasync', undefined, `${fault.code} (injected)`);
    }
    const flushedEntries = this.journal.length;
    await this.inner.fdatasync();
    if (this.durable !== undefined) {
      for (const entry of this.journal.splice(0, flushedEntries)) {
        await FaultyHostFile.apply(this.durable, entry);
      }
    }
  }

  async size(): Promise<number> {
    this.checkAlive('size');
    return this.inner.size();
  }

  async truncate(bytes: number): Promise<void> {
    this.checkAlive('truncate');
    await this.inner.truncate(bytes);
    this.record({ kind: 'truncate', bytes });
  }

  async zeroRange(offset: number, length: number, keepSize = false): Promise<boolean> {
    this.checkAlive('zeroRange');
    const done = await this.inner.zeroRange(offset, length, keepSize);
    if (done) {
      this.record({ kind: 'zeroRange', offset, length, keepSize });
    }
    return done;
  }

  async punchHole(offset: number, length: number): Promise<boolean> {
    this.checkAlive('punchHole');
    const done = await this.inner.punchHole(offset, length);
    if (done) {
      this.record({ kind: 'punchHole', offset, length });
    }
    return done;
  }

  async allocate(offset: number, length: number, keepSize = false): Promise<boolean> {
    this.checkAlive('allocate');
    const done = await this.inner.allocate(offset, length, keepSize);
    if (done) {
      this.record({ kind: 'allocate', offset, length, keepSize });
    }
    return done;
  }

  async dropCache(offset: number, length: number): Promise<void> {
    this.checkAlive('dropCache');
    return this.inner.dropCache(offset, length);
  }

  async close(): Promise<void> {
    await this.inner.close();
  }

  private static async apply(target: MemoryHostFile, entry: JournalEntry): Promise<void> {
    switch (entry.kind) {
      case 'write':
        await target.pwrite(entry.data, entry.hostOffset);
        break;
      case 'truncate':
        await target.truncate(entry.bytes);
        break;
      case 'zeroRange':
        await target.zeroRange(entry.offset, entry.length, entry.keepSize);
        break;
      case 'punchHole':
        await target.punchHole(entry.offset, entry.length);
        break;
      case 'allocate':
        await target.allocate(entry.offset, entry.length, entry.keepSize);
        break;
    }
  }

  /**
   * Simulate losing power: the durable state plus a seeded random subset of the unflushed changes
   * (whole changes, or sectors of writes with tornSectorBytes), as a new MemoryHostFile. The wrapper
   * fails every later call with EIO. Requires journal mode.
   */
  async powerCut(): Promise<MemoryHostFile> {
    if (this.durable === undefined) {
      throw new Error('FaultyHostFile.powerCut() needs the wrapper created with { journal: true }');
    }
    this.dead = true;
    const survivor = MemoryHostFile.from(this.durable.snapshot(), { path: `${this.path} (after power cut)` });
    for (const entry of this.journal) {
      if (entry.kind === 'write' && this.tornSectorBytes !== undefined) {
        const sectorBytes = this.tornSectorBytes;
        for (let start = 0; start < entry.data.length; start += sectorBytes) {
          if (this.rng() < this.keepProbability) {
            await survivor.pwrite(entry.data.subarray(start, Math.min(entry.data.length, start + sectorBytes)),
              entry.hostOffset + start);
          }
        }
      } else if (this.rng() < this.keepProbability) {
        await FaultyHostFile.apply(survivor, entry);
      }
    }
    this.journal.length = 0;
    return survivor;
  }
}
