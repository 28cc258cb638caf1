/**
 * Concurrency stress of the write path (DESIGN §4 "Concurrency", issue 4): requests run
 * concurrently as FUSE delivers them, every await being an interleaving point.
 *
 * - Batches of hundreds of concurrent writes / writeZeroes / discards / reads on byte-disjoint
 *   ranges that share clusters (so allocations, COW fills and L2 updates race) must leave exactly
 *   the model's contents; reads in a batch see the model's bytes.
 * - Many concurrent writes to the same new cluster(s): the cluster is allocated once (allocated
 *   bytes grow by exactly its size, `qemu-img check` finds no leak), each cluster holds the writes
 *   applied in some serial order, and concurrent reads only ever see bytes some write (or the old
 *   contents) had.
 * - Small groups of overlapping writes, zero writes and discards on the same clusters: each cluster
 *   equals one of the serial orders of the group (checked against every permutation on the model).
 * A request spanning clusters is atomic per guest cluster only (it runs as one plan per run of
 * clusters, and runs wait for busy clusters separately), so serial orders are checked per cluster.
 *
 * A JitterFile delays each host read and write by a random number of event-loop turns (seeded), so
 * completions reorder as on a real disk; one case runs on a real file through the threadpool.
 * Replay with TEST_SEED=…; CONCURRENCY_ROUNDS scales the rounds (default 1).
 */
import { describe, expect, it, onTestFailed } from 'vitest';
import { readFile, writeFile } from 'node:fs/promises';
import { ForwardingHostFile, type HostFile, type WritePoint } from '../../../../src/io/host-file.js';
import { MemoryHostFile } from '../../../../src/io/memory-host-file.js';
import { imageState, Qcow2Image } from '../../../../src/qcow2/engine/image.js';
import { checkSerializable, describeDifference, GuestModel, randomGuestRange, RangeSet, type GuestOp } from '../../../helpers/model.js';
import { patternBuffer, Prng, seedFromEnv } from '../../../helpers/patterns.js';
import { qemuImgCheck, qemuImgCompare, qemuImgCreate, type QemuOptionValue } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTool } from '../../../helpers/tools.js';
import { openImage } from '../../../../src/node.js';

const hasQemu = requireTool('qemu-img');
const MiB = 1024 * 1024;
const ROUNDS = Math.max(1, Number(process.env.CONCURRENCY_ROUNDS ?? '1'));

const turn = () => new Promise<void>((resolve) => setImmediate(resolve));

/**
 * A HostFile whose reads, writes, hole punches and zeroing land and complete after random numbers of
 * event-loop turns (at most `maxTurns` - 1 each way), as requests on a real disk do.
 */
class JitterFile extends ForwardingHostFile {
  constructor(inner: HostFile, private readonly rng: Prng, private readonly maxTurns = 4) { super(inner); }
  private async jitter(): Promise<void> {
    for (let i = this.rng.int(this.maxTurns); i > 0; i--) await turn();
  }
  override async pread(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<number> {
    await this.jitter();
    const n = await this.inner.pread(buf, hostOffset, point);
    await this.jitter();
    return n;
  }
  override async pwrite(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<void> {
    await this.jitter();
    await this.inner.pwrite(buf, hostOffset, point);
    await this.jitter();
  }
  override async fdatasync(): Promise<void> {
    await this.jitter();
    await this.inner.fdatasync();
  }
  override async zeroRange(offset: number, length: number, keepSize?: boolean): Promise<boolean> {
    await this.jitter();
    const done = await this.inner.zeroRange(offset, length, keepSize);
    await this.jitter();
    return done;
  }
  override async punchHole(offset: number, length: number): Promise<boolean> {
    await this.jitter();
    const done = await this.inner.punchHole(offset, length);
    await this.jitter();
    return done;
  }
}

/** Defers every hole punch on `file` until settle(): a host whose fallocate completes late. */
class LatePunches {
  private readonly pending: (() => Promise<void>)[] = [];
  count = 0;
  constructor(file: MemoryHostFile) {
    const punch = file.punchHole.bind(file);
    file.punchHole = (offset, length) => {
      this.count++;
      return new Promise<boolean>((resolve, reject) => this.pending.push(() => punch(offset, length).then(resolve, reject)));
    };
  }
  async settle(): Promise<void> {
    for (const run of this.pending.splice(0)) await run();
  }

  /** Flush `image`, letting held punches complete only while the flush waits for them. */
  async flush(image: Qcow2Image): Promise<void> {
    let done = false;
    const flushed = image.flush().finally(() => { done = true; });
    while (!done) {
      await this.settle();
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    await flushed;
  }
}

interface Setup {
  name: string;
  options: Record<string, QemuOptionValue>;
  size: number;
  backing?: 'raw';
  /** Run on the real file (threadpool I/O) instead of a jittered memory file. */
  realFile?: boolean;
  smallCaches?: boolean;
}

interface Opened {
  image: Qcow2Image;
  model: GuestModel;
  path: string;
  clusterSize: number;
  /** The memory file (memory setups), to hand to qemu-img after close. */
  memory?: MemoryHostFile;
}

async function openSetup(dir: string, setup: Setup, rng: Prng): Promise<Opened> {
  const path = `${dir}/image.qcow2`;
  const clusterSize = Number(setup.options.cluster_size ?? 65536);
  let backing: Buffer | undefined;
  if (setup.backing === 'raw') {
    backing = patternBuffer(Math.floor(setup.size * 0.75 / 512) * 512, rng.u32(), 0);
    await writeFile(`${dir}/backing.raw`, backing);
  }
  await qemuImgCreate(path, setup.size, setup.options, backing === undefined ? {} : { backing: `${dir}/backing.raw`, backingFormat: 'raw' });
  const model = new GuestModel({ virtualSize: setup.size, clusterSize, version: setup.options.compat === '0.10' ? 2 : 3, backing });
  const caches = setup.smallCaches === true ? { l2CacheBytes: 16 * Math.min(clusterSize, 4096), refcountCacheBytes: 4 * clusterSize } : {};
  if (setup.realFile === true) {
    return { image: await openImage(path, { readOnly: false, ...caches }), model, path, clusterSize };
  }
  const memory = MemoryHostFile.from(await readFile(path));
  const image = await openImage(path, { readOnly: false, file: new JitterFile(memory, new Prng(rng.u32())), lock: false, ...caches });
  return { image, model, path, clusterSize, memory };
}

/** Close, put the bytes where qemu-img can see them, and require check clean + compare identical. */
async function closeAndCheck(dir: string, o: Opened): Promise<void> {
  await o.image.close();
  if (o.memory !== undefined) await writeFile(o.path, o.memory.snapshot());
  const check = await qemuImgCheck(o.path);
  expect({ code: check.code, errors: check.report?.['check-errors'], corruptions: check.report?.corruptions ?? 0, leaks: check.report?.leaks ?? 0 },
    `qemu-img check: ${JSON.stringify(check.report)} ${check.stderr}`).toEqual({ code: 0, errors: 0, corruptions: 0, leaks: 0 });
  await o.model.saveRaw(`${dir}/model.raw`);
  expect(await qemuImgCompare(o.path, `${dir}/model.raw`, { formatA: 'qcow2', formatB: 'raw' })).toBe(true);
}

async function expectEqualsModel(image: Qcow2Image, model: GuestModel, where: string): Promise<void> {
  const got = await image.read(0, model.virtualSize);
  expect(describeDifference(got, model.bytes, 0, model.clusterSize), where).toBeUndefined();
}

async function runOp(image: Qcow2Image, op: GuestOp): Promise<void> {
  switch (op.op) {
    case 'write': return image.write(op.offset, op.data);
    case 'writeZeroes': return image.writeZeroes(op.offset, op.bytes);
    case 'discard': return image.discard(op.offset, op.bytes);
  }
}

function opRange(op: GuestOp): { start: number; end: number } {
  return { start: op.offset, end: op.offset + (op.op === 'write' ? op.data.length : op.bytes) };
}

const SETUPS: Setup[] = [
  { name: '64 KiB clusters', options: {}, size: 8 * MiB },
  { name: '4 KiB clusters, refcount_bits 2, small caches', options: { cluster_size: 4096, refcount_bits: 2 }, size: 3 * MiB, smallCaches: true },
  { name: 'extended L2, 32 KiB clusters, raw backing', options: { cluster_size: 32768, extended_l2: true }, size: 4 * MiB, backing: 'raw' },
  { name: 'compat 0.10, 8 KiB clusters, raw backing', options: { compat: '0.10', cluster_size: 8192 }, size: 2 * MiB, backing: 'raw' },
  { name: '16 KiB clusters, real file', options: { cluster_size: 16384 }, size: 4 * MiB, realFile: true },
];

describe.skipIf(!hasQemu)('concurrent disjoint requests vs the model', () => {
  const tmp = useTempDir('concurrency');
  const seed = seedFromEnv();
  for (const setup of SETUPS) {
    it(`hundreds of concurrent writes, zero writes, discards and reads (${setup.name})`, async () => {
      const rng = new Prng(seed);
      const o = await openSetup(tmp.path, setup, rng);
      const { image, model, clusterSize } = o;
      const log: string[] = [];
      onTestFailed(() => console.error(`last batch:\n  ${log.join('\n  ')}`));
      const batches = 12 * ROUNDS;
      try {
        for (let b = 0; b < batches; b++) {
          log.length = 0;
          const taken = new RangeSet();
          const ops: GuestOp[] = [];
          const reads: { offset: number; bytes: number }[] = [];
          for (let attempts = 0; ops.length + reads.length < 40 && attempts < 400; attempts++) {
            const { offset, bytes } = randomGuestRange(rng, model.virtualSize, clusterSize, 2 * clusterSize + 777);
            if (taken.overlaps(offset, offset + bytes)) continue;
            taken.add(offset, offset + bytes);
            const roll = rng.float();
            if (roll < 0.55) ops.push({ op: 'write', offset, data: patternBuffer(bytes, seed + b * 1000 + ops.length, offset) });
            else if (roll < 0.65) ops.push({ op: 'writeZeroes', offset, bytes });
            else if (roll < 0.8) ops.push({ op: 'discard', offset, bytes });
            else reads.push({ offset, bytes });
          }
          for (const op of ops) log.push(`${op.op} ${op.offset} +${opRange(op).end - op.offset}`);
          for (const r of reads) log.push(`read ${r.offset} +${r.bytes}`);
          // Reads see the bytes as they are before and after the batch (nothing in the batch touches them).
          const expectedReads = reads.map((r) => Buffer.from(model.read(r.offset, r.bytes)));
          const results = await Promise.allSettled([...ops.map((op) => runOp(image, op)), ...reads.map((r) => image.read(r.offset, r.bytes))]);
          const failed = results.find((r) => r.status === 'rejected');
          if (failed !== undefined) throw (failed).reason;
          for (const op of ops) model.apply(op);
          results.slice(ops.length).forEach((r, i) => {
            const got = (r as PromiseFulfilledResult<Buffer>).value;
            expect(describeDifference(got, expectedReads[i], reads[i].offset, clusterSize), `batch ${b}: concurrent read ${i}`).toBeUndefined();
          });
          expect({ l2: imageState(image).l2Cache.pinnedCount(), refcount: imageState(image).refcountCache.pinnedCount() }).toEqual({ l2: 0, refcount: 0 });
          await expectEqualsModel(image, model, `after batch ${b}`);
          if (rng.chance(0.2)) await image.flush();
        }
      } catch (err) {
        await image.close().catch(() => undefined);
        throw err;
      }
      await closeAndCheck(tmp.path, o);
    });
  }
});

/** Bytes of `actual` each hold `before`'s value or the value of some write covering them; else a description. */
function checkPerByte(before: Uint8Array, writes: readonly { offset: number; data: Uint8Array }[], actual: Uint8Array, baseOffset: number): string | undefined {
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] === before[i]) continue;
    const pos = baseOffset + i;
    if (!writes.some((w) => pos >= w.offset && pos < w.offset + w.data.length && w.data[pos - w.offset] === actual[i])) {
      return `byte at ${pos} is 0x${actual[i].toString(16)}: neither the old value 0x${before[i].toString(16)} nor written by any write covering it`;
    }
  }
  return undefined;
}

describe.skipIf(!hasQemu)('concurrent writes to the same new cluster', () => {
  const tmp = useTempDir('same-cluster');
  const seed = seedFromEnv();
  const setups: Setup[] = [
    { name: '64 KiB clusters', options: {}, size: 4 * MiB },
    { name: 'extended L2, 64 KiB clusters', options: { extended_l2: true }, size: 4 * MiB },
    { name: '4 KiB clusters, raw backing', options: { cluster_size: 4096 }, size: 2 * MiB, backing: 'raw' },
    { name: 'compat 0.10, 4 KiB clusters, real file', options: { compat: '0.10', cluster_size: 4096 }, size: 2 * MiB, realFile: true },
  ];
  for (const setup of setups) {
    it(`allocates once and serializes the writes (${setup.name})`, async () => {
      const rng = new Prng(seed);
      const rounds = 8 * ROUNDS;
      // Each round takes two fresh clusters.
      const size = Math.max(setup.size, (2 * rounds + 2) * Number(setup.options.cluster_size ?? 65536));
      const o = await openSetup(tmp.path, { ...setup, size }, rng);
      const { image, model, clusterSize: cs } = o;
      try {
        // The L2 table exists beforehand, so each round allocates exactly its data clusters.
        await image.write(0, Buffer.alloc(1, 1));
        model.write(0, Buffer.alloc(1, 1));
        for (let round = 0; round < rounds; round++) {
          const span = round % 2 === 0 ? 1 : 2; // every other round: writes across two new clusters
          const first = 1 + round * 2;
          const start = first * cs;
          const bytes = span * cs;
          const before = Buffer.from(model.read(start, bytes));
          const allocatedBefore = await image.allocatedBytes();
          const writes: { offset: number; data: Buffer }[] = [];
          for (let i = 0; i < 64; i++) {
            const offset = start + rng.int(bytes);
            const length = 1 + rng.int(Math.min(bytes - (offset - start), rng.chance(0.2) ? bytes : cs / 4));
            writes.push({ offset, data: Buffer.alloc(length, 1 + (i % 255)) });
          }
          const readPromises: Promise<Buffer>[] = [];
          const writePromises = writes.map((w, i) => {
            if (i % 8 === 0) readPromises.push(image.read(start, bytes));
            return image.write(w.offset, w.data);
          });
          await Promise.all(writePromises);
          const reads = await Promise.all(readPromises);
          const actual = await image.read(start, bytes);
          // A request is atomic per guest cluster (requests spanning clusters run per cluster).
          for (let c = 0; c < span; c++) {
            const clusterStart = start + c * cs;
            const clipped = clipWrites(writes, clusterStart, clusterStart + cs);
            const slice = (buf: Buffer) => buf.subarray(c * cs, (c + 1) * cs);
            expect(checkSerializable(slice(before), clipped, slice(actual), clusterStart), `round ${round}, cluster ${c}: final contents`).toBeUndefined();
            reads.forEach((r, i) => expect(checkPerByte(slice(before), clipped, slice(r), clusterStart), `round ${round}, cluster ${c}: concurrent read ${i}`).toBeUndefined());
          }
          expect(await image.allocatedBytes() - allocatedBefore, `round ${round}: host bytes allocated`).toBe(span * cs);
          model.write(start, actual);
        }
        await expectEqualsModel(image, model, 'after all rounds');
      } catch (err) {
        await image.close().catch(() => undefined);
        throw err;
      }
      await closeAndCheck(tmp.path, o);
    });
  }
});

/** The parts of `writes` inside [start, end), dropping writes that miss it. */
function clipWrites(writes: readonly { offset: number; data: Buffer }[], start: number, end: number): { offset: number; data: Buffer }[] {
  const out: { offset: number; data: Buffer }[] = [];
  for (const w of writes) {
    const s = Math.max(start, w.offset);
    const e = Math.min(end, w.offset + w.data.length);
    if (s < e) out.push({ offset: s, data: w.data.subarray(s - w.offset, e - w.offset) });
  }
  return out;
}

function* permutations<T>(items: readonly T[]): Generator<T[]> {
  if (items.length <= 1) {
    yield [...items];
    return;
  }
  for (let i = 0; i < items.length; i++) {
    const rest = [...items.slice(0, i), ...items.slice(i + 1)];
    for (const p of permutations(rest)) yield [items[i], ...p];
  }
}

describe.skipIf(!hasQemu)('overlapping concurrent writes, zero writes and discards', () => {
  const tmp = useTempDir('overlap');
  const seed = seedFromEnv();
  const setups: Setup[] = [
    { name: '16 KiB clusters', options: { cluster_size: 16384 }, size: MiB },
    { name: 'extended L2, 32 KiB clusters, raw backing', options: { cluster_size: 32768, extended_l2: true }, size: 2 * MiB, backing: 'raw' },
    { name: 'compat 0.10, 4 KiB clusters, raw backing', options: { compat: '0.10', cluster_size: 4096 }, size: MiB, backing: 'raw' },
  ];
  for (const setup of setups) {
    it(`the result is one of the serial orders (${setup.name})`, async () => {
      const rng = new Prng(seed);
      const o = await openSetup(tmp.path, setup, rng);
      const { image, model, clusterSize: cs } = o;
      const clusters = model.virtualSize / cs;
      try {
        const rounds = 40 * ROUNDS;
        for (let round = 0; round < rounds; round++) {
          // 2–5 operations on the same one or two clusters, racing.
          const base = rng.int(clusters - 1) * cs;
          const window = (1 + rng.int(2)) * cs;
          const ops: GuestOp[] = [];
          const nbOps = 2 + rng.int(4);
          for (let i = 0; i < nbOps; i++) {
            const offset = base + rng.int(window);
            const bytes = 1 + rng.int(base + window - offset);
            const roll = rng.float();
            if (roll < 0.6) ops.push({ op: 'write', offset, data: Buffer.alloc(bytes, 1 + ((round * 7 + i) % 255)) });
            else if (roll < 0.8) ops.push({ op: 'writeZeroes', offset, bytes });
            else ops.push(rng.chance(0.5) ? { op: 'discard', offset: base, bytes: window } : { op: 'discard', offset, bytes });
          }
          await Promise.all(ops.map((op) => runOp(image, op)));
          const actual = await image.read(base, window);
          const described = ops.map((op) => `${op.op} ${op.offset} +${opRange(op).end - op.offset}`).join('; ');
          // Requests are atomic per guest cluster: each cluster must match some serial order.
          for (let c = base; c < base + window; c += cs) {
            let matched: GuestModel | undefined;
            for (const order of permutations(ops)) {
              const candidate = model.clone();
              for (const op of order) candidate.apply(op);
              if (candidate.read(c, cs).equals(actual.subarray(c - base, c - base + cs))) {
                matched = candidate;
                break;
              }
            }
            expect(matched, `round ${round}: no serial order of [${described}] gives the contents of the cluster at ${c}`).toBeDefined();
            matched!.bytes.copy(model.bytes, c, c, c + cs);
          }
          expect({ l2: imageState(image).l2Cache.pinnedCount(), refcount: imageState(image).refcountCache.pinnedCount() }).toEqual({ l2: 0, refcount: 0 });
        }
        await expectEqualsModel(image, model, 'after all rounds');
      } catch (err) {
        await image.close().catch(() => undefined);
        throw err;
      }
      await closeAndCheck(tmp.path, o);
    });
  }
});

describe.skipIf(!hasQemu)('freeing and reusing host clusters', () => {
  const tmp = useTempDir('punch');

  it('a freed cluster reused at once keeps the new data when the hole punch completes late', async () => {
    // Discard frees host cluster X; the next allocating write gets X at once. The hole punch for X
    // (queued until the free is durable) must never land on the new data; a free that is not
    // reused is punched at the next flush.
    const path = tmp.file('image.qcow2');
    const cs = 65536;
    await qemuImgCreate(path, 4 * MiB, {});
    const memory = MemoryHostFile.from(await readFile(path));
    const image = await openImage(path, { readOnly: false, file: new JitterFile(memory, new Prng(1), 1), lock: false });
    const model = new GuestModel({ virtualSize: 4 * MiB, clusterSize: cs, version: 3 });
    const late = new LatePunches(memory);
    try {
      for (const op of [
        { op: 'write', offset: 5 * cs, data: patternBuffer(cs, 1, 5 * cs) },
        { op: 'discard', offset: 5 * cs, bytes: cs },
        { op: 'write', offset: 9 * cs, data: patternBuffer(cs, 2, 9 * cs) },
      ] satisfies GuestOp[]) {
        await runOp(image, op);
        model.apply(op);
      }
      await late.flush(image);
      await expectEqualsModel(image, model, 'after the late hole punch');
      const discard = { op: 'discard', offset: 9 * cs, bytes: cs } satisfies GuestOp;
      await runOp(image, discard);
      model.apply(discard);
      await late.flush(image);
      expect(late.count, 'the unreused free was punched at flush').toBeGreaterThan(0);
      await expectEqualsModel(image, model, 'after the punch of an unreused cluster');
    } catch (err) {
      await image.close().catch(() => undefined);
      throw err;
    }
    await closeAndCheck(tmp.path, { image, model, path, clusterSize: cs, memory });
  });
});
