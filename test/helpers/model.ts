/**
 * An in-memory model of a guest disk: what a qcow2 image must read back after a sequence of
 * write / writeZeroes / discard, with or without a backing file.
 *
 * Semantics modelled (DESIGN §4, src/qcow2/engine/cluster-map.ts):
 * - write: the bytes are the data; writeZeroes: the bytes read as zeros;
 * - discard acts on whole clusters only: [ceil(start), floor(end)) in clusters, where an end at the
 *   virtual size rounds up (the partial last cluster counts as whole); partial clusters are left as
 *   they are. A discarded cluster reads zeros on v3 (and with extended L2), and the backing file's data
 *   on v2 (zeros without a backing file);
 * - a backing file shorter than the disk reads as zeros past its end.
 *
 * Also: `firstDifference` for precise failure messages, `saveRaw` for `qemu-img compare`, and
 * `checkSerializable` — the assertion for overlapping concurrent writes: the result must equal the
 * writes applied in some serial order.
 */
import { writeFile } from 'node:fs/promises';

export interface GuestModelOptions {
  virtualSize: number;
  clusterSize: number;
  /** qcow2 version: discard reads zeros on 3, backing data on 2. */
  version: 2 | 3;
  /** The backing file's guest contents (any length; missing bytes read as zeros). */
  backing?: Uint8Array;
}

/** A modifying guest operation, for logs and tail analysis. */
export type GuestOp =
  | { op: 'write'; offset: number; data: Buffer }
  | { op: 'writeZeroes'; offset: number; bytes: number }
  | { op: 'discard'; offset: number; bytes: number };

export class GuestModel {
  readonly virtualSize: number;
  readonly clusterSize: number;
  readonly version: 2 | 3;
  /** The guest contents. */
  readonly bytes: Buffer;
  private readonly backing: Buffer;

  constructor(options: GuestModelOptions) {
    this.virtualSize = options.virtualSize;
    this.clusterSize = options.clusterSize;
    this.version = options.version;
    this.backing = Buffer.alloc(options.virtualSize);
    if (options.backing !== undefined) Buffer.from(options.backing.buffer, options.backing.byteOffset, Math.min(options.backing.byteLength, options.virtualSize)).copy(this.backing);
    this.bytes = Buffer.from(this.backing);
  }

  /** A deep copy (same backing). */
  clone(): GuestModel {
    const copy = new GuestModel({ virtualSize: this.virtualSize, clusterSize: this.clusterSize, version: this.version, backing: this.backing });
    this.bytes.copy(copy.bytes);
    return copy;
  }

  private checkRange(offset: number, bytes: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0 || offset + bytes > this.virtualSize) {
      throw new RangeError(`model: [${offset}, +${bytes}) outside the ${this.virtualSize}-byte disk`);
    }
  }

  apply(op: GuestOp): void {
    switch (op.op) {
      case 'write': this.write(op.offset, op.data); return;
      case 'writeZeroes': this.writeZeroes(op.offset, op.bytes); return;
      case 'discard': this.discard(op.offset, op.bytes); return;
    }
  }

  write(offset: number, data: Uint8Array): void {
    this.checkRange(offset, data.length);
    this.bytes.set(data, offset);
  }

  writeZeroes(offset: number, bytes: number): void {
    this.checkRange(offset, bytes);
    this.bytes.fill(0, offset, offset + bytes);
  }

  /** The guest byte range [start, end) a discard of [offset, +bytes) really unmaps (whole clusters). */
  discardedRange(offset: number, bytes: number): { start: number; end: number } {
    this.checkRange(offset, bytes);
    const cs = this.clusterSize;
    const end = offset + bytes;
    const start = Math.ceil(offset / cs) * cs;
    const alignedEnd = end === this.virtualSize ? Math.ceil(end / cs) * cs : end - (end % cs);
    return start >= alignedEnd ? { start, end: start } : { start, end: Math.min(alignedEnd, this.virtualSize) };
  }

  discard(offset: number, bytes: number): void {
    const { start, end } = this.discardedRange(offset, bytes);
    if (start >= end) return;
    if (this.version === 2) this.backing.copy(this.bytes, start, start, end);
    else this.bytes.fill(0, start, end);
  }

  read(offset: number, bytes: number): Buffer {
    this.checkRange(offset, bytes);
    return this.bytes.subarray(offset, offset + bytes);
  }

  /** Write the guest contents as a raw image (for `qemu-img compare`). */
  async saveRaw(path: string): Promise<void> {
    await writeFile(path, this.bytes);
  }
}

/** Offset (relative to `actual`'s start) of the first byte differing from `expected`, or -1. */
export function firstDifference(actual: Uint8Array, expected: Uint8Array): number {
  if (Buffer.compare(actual, expected) === 0) return -1;
  const n = Math.min(actual.length, expected.length);
  for (let i = 0; i < n; i++) if (actual[i] !== expected[i]) return i;
  return n;
}

/** A readable description of the first difference between `actual` and `expected` at guest `offset`, or undefined when equal. */
export function describeDifference(actual: Uint8Array, expected: Uint8Array, offset: number, clusterSize: number): string | undefined {
  const i = firstDifference(actual, expected);
  if (i < 0) return undefined;
  let end = i;
  while (end < Math.min(actual.length, expected.length) && actual[end] !== expected[end]) end++;
  const hex = (b: Uint8Array) => Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex');
  const at = offset + i;
  return `first difference at guest offset ${at} (cluster ${Math.floor(at / clusterSize)}, +${at % clusterSize}), ` +
    `${end - i} differing bytes from there; expected ${hex(expected.subarray(i, i + 16))}, got ${hex(actual.subarray(i, i + 16))}` +
    (actual.length !== expected.length ? `; lengths ${actual.length} vs ${expected.length}` : '');
}

/** A write taking part in a set of concurrent writes. */
export interface ConcurrentWrite {
  offset: number;
  data: Uint8Array;
}

/**
 * Check that `actual` (guest bytes from `baseOffset`) is the result of applying `writes` to `before`
 * in SOME serial order, each write atomic: every byte holds the value of one write covering it (or
 * `before` where none does), and the "wrote after" relation these choices imply has no cycle.
 * Writes must carry distinguishable data where they overlap (e.g. distinct fill bytes). Returns
 * undefined when consistent, else a description of the violation.
 */
export function checkSerializable(before: Uint8Array, writes: readonly ConcurrentWrite[], actual: Uint8Array, baseOffset: number): string | undefined {
  // For each byte: which write's value it shows. Then every other write covering that byte came earlier.
  const after = writes.map(() => new Set<number>());
  for (let i = 0; i < actual.length; i++) {
    const pos = baseOffset + i;
    const covering: number[] = [];
    for (let w = 0; w < writes.length; w++) {
      const wr = writes[w];
      if (pos >= wr.offset && pos < wr.offset + wr.data.length) covering.push(w);
    }
    if (covering.length === 0) {
      if (actual[i] !== before[i]) return `byte at ${pos} was written (0x${actual[i].toString(16)}) though no write covers it (was 0x${before[i].toString(16)})`;
      continue;
    }
    const winners = covering.filter((w) => writes[w].data[pos - writes[w].offset] === actual[i]);
    if (winners.length === 0) {
      return `byte at ${pos} is 0x${actual[i].toString(16)}, which none of the writes covering it (${covering.join(', ')}) wrote`;
    }
    if (winners.length > 1) continue; // ambiguous byte: implies no order
    const winner = winners[0];
    for (const w of covering) if (w !== winner) after[winner].add(w);
  }
  // Cycle detection (iterative DFS): winner must come after every loser.
  const state = new Uint8Array(writes.length); // 0 new, 1 on stack, 2 done
  for (let root = 0; root < writes.length; root++) {
    if (state[root] !== 0) continue;
    const stack: { node: number; edges: number[] }[] = [{ node: root, edges: [...after[root]] }];
    state[root] = 1;
    while (stack.length > 0) {
      const top = stack[stack.length - 1];
      const next = top.edges.pop();
      if (next === undefined) {
        state[top.node] = 2;
        stack.pop();
        continue;
      }
      if (state[next] === 1) {
        return `no serial order explains the result: writes ${stack.map((s) => s.node).join(' > ')} > ${next} form a cycle`;
      }
      if (state[next] === 0) {
        state[next] = 1;
        stack.push({ node: next, edges: [...after[next]] });
      }
    }
  }
  return undefined;
}

/**
 * Check guest contents `actual` after operations `tail` were applied to the state `before` but may
 * have been cut short (power cut, I/O error): every byte no tail operation touched must equal
 * `before`; a byte only plain writes touched must hold its `before` value or one of those writes'
 * values; bytes under a zero write or the whole clusters of a discard are unconstrained (the guest
 * gave them up, and a freed cluster may be reused before its unmapping is durable). Returns a
 * violation or undefined.
 */
export function explainInterrupted(actual: Uint8Array, before: GuestModel, tail: readonly GuestOp[]): string | undefined {
  const gaveUp = new RangeSet();
  const written = new RangeSet();
  for (const op of tail) {
    if (op.op === 'write') written.add(op.offset, op.offset + op.data.length);
    else if (op.op === 'writeZeroes') gaveUp.add(op.offset, op.offset + op.bytes);
    else {
      const { start, end } = before.discardedRange(op.offset, op.bytes);
      gaveUp.add(start, end);
    }
  }
  const expected = before.bytes;
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] === expected[i] || gaveUp.has(i)) continue;
    if (!written.has(i)) {
      return `${describeDifference(actual.subarray(i), expected.subarray(i), i, before.clusterSize)}: a byte no operation touched changed`;
    }
    const explained = tail.some((op) => op.op === 'write' && i >= op.offset && i < op.offset + op.data.length && op.data[i - op.offset] === actual[i]);
    if (!explained) return `byte at ${i} is 0x${actual[i].toString(16)}: neither its earlier value 0x${expected[i].toString(16)} nor written by an interrupted write`;
  }
  return undefined;
}

/** A set of byte ranges [start, end), kept sorted and merged. */
export class RangeSet {
  private ranges: { start: number; end: number }[] = [];

  add(start: number, end: number): void {
    if (end <= start) return;
    const merged: { start: number; end: number }[] = [];
    let s = start;
    let e = end;
    for (const r of this.ranges) {
      if (r.end < s || r.start > e) merged.push(r);
      else {
        s = Math.min(s, r.start);
        e = Math.max(e, r.end);
      }
    }
    merged.push({ start: s, end: e });
    merged.sort((a, b) => a.start - b.start);
    this.ranges = merged;
  }

  overlaps(start: number, end: number): boolean {
    return this.ranges.some((r) => r.start < end && start < r.end);
  }

  has(pos: number): boolean {
    return this.overlaps(pos, pos + 1);
  }

  /** The maximal sub-ranges of [start, end) not in the set. */
  gaps(start: number, end: number): { start: number; end: number }[] {
    const out: { start: number; end: number }[] = [];
    let pos = start;
    for (const r of this.ranges) {
      if (r.end <= pos) continue;
      if (r.start >= end) break;
      if (r.start > pos) out.push({ start: pos, end: r.start });
      pos = Math.max(pos, r.end);
    }
    if (pos < end) out.push({ start: pos, end });
    return out;
  }

  get list(): readonly { start: number; end: number }[] {
    return this.ranges;
  }
}

/** Pseudo-random source the range picker needs (test/helpers/patterns.ts Prng fits). */
export interface RangeRng {
  int(n: number): number;
  range(min: number, max: number): number;
  chance(p: number): boolean;
}

/**
 * A random guest range [offset, +bytes) with 0 < bytes ≤ maxBytes, biased towards the cases a qcow2
 * driver gets wrong: cluster- and subcluster-aligned runs, ranges crossing cluster boundaries, tiny
 * ranges, and ranges ending at the end of the disk.
 */
export function randomGuestRange(rng: RangeRng, virtualSize: number, clusterSize: number, maxBytes: number, subclusterSize = clusterSize): { offset: number; bytes: number } {
  const cap = Math.max(1, Math.floor(Math.min(maxBytes, virtualSize)));
  let offset: number;
  let bytes: number;
  switch (rng.int(6)) {
    case 0: // anywhere, any length
      offset = rng.int(virtualSize);
      bytes = 1 + rng.int(cap);
      break;
    case 1: { // whole clusters
      const clusters = Math.ceil(virtualSize / clusterSize);
      offset = rng.int(clusters) * clusterSize;
      bytes = clusterSize * rng.range(1, Math.max(1, Math.floor(cap / clusterSize)));
      break;
    }
    case 2: { // whole subclusters (512-byte sectors without extended L2 when clusters are big)
      const unit = subclusterSize < clusterSize ? subclusterSize : Math.min(clusterSize, 512 * 2 ** rng.int(4));
      offset = rng.int(Math.ceil(virtualSize / unit)) * unit;
      bytes = unit * rng.range(1, Math.max(1, Math.floor(cap / unit)));
      break;
    }
    case 3: // up to the end of the disk
      bytes = 1 + rng.int(cap);
      offset = Math.max(0, virtualSize - bytes);
      break;
    case 4: // tiny
      offset = rng.int(virtualSize);
      bytes = 1 + rng.int(64);
      break;
    default: { // inside one cluster, crossing into the next
      const cluster = rng.int(Math.ceil(virtualSize / clusterSize));
      offset = cluster * clusterSize + clusterSize - 1 - rng.int(Math.min(clusterSize, cap));
      bytes = 2 + rng.int(Math.max(1, Math.min(cap, 2 * clusterSize)));
    }
  }
  offset = Math.min(Math.max(0, offset), virtualSize - 1);
  bytes = Math.max(1, Math.min(bytes, cap, virtualSize - offset));
  return { offset, bytes };
}
