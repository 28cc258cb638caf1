/**
 * Randomized property tests of the write path (issue 4 acceptance): random sequences of write /
 * writeZeroes / discard / flush / reopen, with and without a backing file (raw or qcow2, equal or
 * shorter), across cluster sizes 512 B–2 MiB, refcount_bits 1–64, compat 0.10 and 1.1, extended L2
 * on and off, cache modes and cache sizes. After every sequence the image reads back equal to the
 * in-memory model (test/helpers/model.ts), `qemu-img check` reports no errors and no leaks, and
 * `qemu-img compare` against the model's raw file says identical. A second group writes fill
 * patterns and has `qemu-io read -P` verify them.
 *
 * Seeds: the master seed is printed on failure; replay with TEST_SEED=… . More cases or longer
 * sequences: PROPERTY_CASES (random cases on top of the fixed matrix, default 6), PROPERTY_OPS
 * (operations per sequence, default 40).
 */
import { describe, expect, it, onTestFailed } from 'vitest';
import { writeFile } from 'node:fs/promises';
import { HostIoError } from '../../../../src/io/errors.js';
import { ForwardingHostFile, type HostFile, type HostFileOpener, type WritePoint } from '../../../../src/io/host-file.js';
import { openNodeHostFile } from '../../../../src/io/node-host-file.js';
import { imageState, Qcow2Image, type CacheMode, type Qcow2OpenOptions } from '../../../../src/qcow2/engine/image.js';
import { describeDifference, GuestModel, randomGuestRange } from '../../../helpers/model.js';
import { patternBuffer, Prng, seedFromEnv } from '../../../helpers/patterns.js';
import { qemuImgCheck, qemuImgCompare, qemuImgCreate, qemuIo, qemuIoOk, type QemuOptionValue } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTools } from '../../../helpers/tools.js';
import { openImage } from '../../../../src/node.js';

const hasQemu = requireTools('qemu-img', 'qemu-io');
const KiB = 1024;
const MiB = 1024 * KiB;

function envInt(name: string, fallback: number): number {
  const text = process.env[name];
  if (text === undefined || text === '') return fallback;
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`${name} must be a non-negative integer, got '${text}'`);
  return value;
}

/**
 * A host file that refuses to grow past `capBytes` (ENOSPC): a runaway allocation fails the test
 * quickly instead of filling the disk until the timeout.
 */
class CappedFile extends ForwardingHostFile {
  constructor(inner: HostFile, private readonly capBytes: number) { super(inner); }
  private check(operation: string, end: number): void {
    if (end > this.capBytes) throw new HostIoError('ENOSPC', this.path, operation, end, `test cap of ${this.capBytes} host bytes exceeded`);
  }
  override async pwrite(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<void> {
    this.check('pwrite', hostOffset + buf.length);
    await this.inner.pwrite(buf, hostOffset, point);
  }
  override async zeroRange(offset: number, length: number, keepSize?: boolean): Promise<boolean> {
    if (keepSize !== true) this.check('zeroRange', offset + length);
    return this.inner.zeroRange(offset, length, keepSize);
  }
  override async allocate(offset: number, length: number, keepSize?: boolean): Promise<boolean> {
    if (keepSize !== true) this.check('allocate', offset + length);
    return this.inner.allocate(offset, length, keepSize);
  }
}

/** Open images on real files, capped at `capBytes`. */
function cappedOpener(capBytes: number): HostFileOpener {
  return async (path, options) => new CappedFile(await openNodeHostFile(path, options), capBytes);
}

type BackingKind = 'none' | 'raw' | 'qcow2';

interface CaseConfig {
  clusterBits: number;
  refcountBits: number;
  compat: '0.10' | '1.1';
  extendedL2: boolean;
  lazyRefcounts: boolean;
  backing: BackingKind;
  /** Backing file shorter than the image. */
  backingShorter: boolean;
  /** Virtual size not a multiple of the cluster size. */
  partialLastCluster: boolean;
  cache: CacheMode;
  smallCaches: boolean;
  preallocate: boolean;
}

function describeCase(c: CaseConfig): string {
  const parts = [`cluster ${2 ** c.clusterBits}`, `refcount_bits ${c.refcountBits}`, `compat ${c.compat}`];
  if (c.extendedL2) parts.push('extended_l2');
  if (c.lazyRefcounts) parts.push('lazy_refcounts');
  if (c.backing !== 'none') parts.push(`${c.backing} backing${c.backingShorter ? ' (shorter)' : ''}`);
  if (c.partialLastCluster) parts.push('partial last cluster');
  if (c.cache !== 'writeback') parts.push(`cache=${c.cache}`);
  if (c.smallCaches) parts.push('small caches');
  if (!c.preallocate) parts.push('no preallocation');
  return parts.join(', ');
}

const BASE: CaseConfig = {
  clusterBits: 16, refcountBits: 16, compat: '1.1', extendedL2: false, lazyRefcounts: false, backing: 'none', backingShorter: false,
  partialLastCluster: false, cache: 'writeback', smallCaches: false, preallocate: true,
};

/** The fixed matrix: every cluster size, refcount width, compat level and extended L2 setting at least once. */
const FIXED_CASES: CaseConfig[] = [
  { ...BASE, clusterBits: 9, refcountBits: 16, compat: '0.10', backing: 'raw' },
  { ...BASE, clusterBits: 9, refcountBits: 1, smallCaches: true },
  { ...BASE, clusterBits: 9, refcountBits: 64, backing: 'qcow2', backingShorter: true, partialLastCluster: true },
  { ...BASE, clusterBits: 10, refcountBits: 2, cache: 'writethrough' },
  { ...BASE, clusterBits: 12, refcountBits: 4, backing: 'raw', backingShorter: true, smallCaches: true },
  { ...BASE, clusterBits: 12, refcountBits: 16, compat: '0.10', backing: 'qcow2', partialLastCluster: true },
  { ...BASE, clusterBits: 14, refcountBits: 8, extendedL2: true, backing: 'qcow2' },
  { ...BASE, clusterBits: 14, refcountBits: 32, extendedL2: true, smallCaches: true, preallocate: false },
  { ...BASE, clusterBits: 16, refcountBits: 16, extendedL2: true, backing: 'raw', backingShorter: true, lazyRefcounts: true },
  { ...BASE, clusterBits: 16, refcountBits: 16, compat: '0.10', backing: 'raw', backingShorter: true },
  { ...BASE, clusterBits: 16, refcountBits: 64, cache: 'none', partialLastCluster: true },
  { ...BASE, clusterBits: 18, refcountBits: 1, backing: 'qcow2', backingShorter: true },
  { ...BASE, clusterBits: 21, refcountBits: 16, extendedL2: true, backing: 'raw' },
  { ...BASE, clusterBits: 21, refcountBits: 8, partialLastCluster: true, preallocate: false },
];

function randomCase(rng: Prng): CaseConfig {
  const compat = rng.chance(0.25) ? '0.10' : '1.1';
  const clusterBits = rng.range(9, 21);
  return {
    clusterBits,
    refcountBits: compat === '0.10' ? 16 : 2 ** rng.int(7),
    compat,
    extendedL2: compat === '1.1' && clusterBits >= 14 && rng.chance(0.4),
    lazyRefcounts: compat === '1.1' && rng.chance(0.2),
    backing: rng.pick(['none', 'raw', 'qcow2'] as const),
    backingShorter: rng.chance(0.5),
    partialLastCluster: rng.chance(0.3),
    cache: rng.pick(['writeback', 'writeback', 'writethrough', 'none'] as const),
    smallCaches: rng.chance(0.3),
    preallocate: rng.chance(0.8),
  };
}

/** Virtual size: a few hundred clusters for small clusters, at least 6 for 2 MiB ones, ≤ 12 MiB. */
function virtualSizeFor(c: CaseConfig, rng: Prng): number {
  const cs = 2 ** c.clusterBits;
  const clusters = Math.max(6, Math.min(300, Math.floor(8 * MiB / cs)));
  let size = clusters * cs;
  if (c.partialLastCluster && cs > 512) size -= 512 * rng.range(1, cs / 512 - 1);
  return size;
}

interface Fixture {
  image: string;
  model: GuestModel;
  subclusterSize: number;
}

/** Create the image (and its backing file) with qemu-img; the model starts as the backing contents. */
async function makeFixture(dir: string, c: CaseConfig, rng: Prng): Promise<Fixture> {
  const cs = 2 ** c.clusterBits;
  const virtualSize = virtualSizeFor(c, rng);
  const image = `${dir}/image.qcow2`;
  let backingContents: Buffer | undefined;
  let backingPath: string | undefined;
  if (c.backing !== 'none') {
    const backingSize = c.backingShorter ? Math.max(512, Math.floor((virtualSize * (0.3 + 0.5 * rng.float())) / 512) * 512) : virtualSize;
    backingContents = Buffer.alloc(backingSize);
    if (c.backing === 'raw') {
      backingPath = `${dir}/backing.raw`;
      backingContents = patternBuffer(backingSize, rng.u32(), 0);
      await writeFile(backingPath, backingContents);
    } else {
      backingPath = `${dir}/backing.qcow2`;
      await qemuImgCreate(backingPath, backingSize, { cluster_size: 2 ** rng.range(12, 17) });
      const commands: string[] = [];
      for (let i = 0; i < 6; i++) {
        const offset = rng.int(backingSize / 512) * 512;
        const bytes = Math.min(backingSize - offset, 512 * rng.range(1, 2 * cs / 512 + 8));
        const fill = 1 + rng.int(255);
        commands.push(`write -P ${fill} ${offset} ${bytes}`);
        backingContents.fill(fill, offset, offset + bytes);
      }
      await qemuIoOk(backingPath, commands);
    }
  }
  const options: Record<string, QemuOptionValue> = { cluster_size: cs, compat: c.compat, refcount_bits: c.refcountBits };
  if (c.extendedL2) options.extended_l2 = true;
  if (c.lazyRefcounts) options.lazy_refcounts = true;
  await qemuImgCreate(image, virtualSize, options, backingPath === undefined ? {} : { backing: backingPath, backingFormat: c.backing });
  const model = new GuestModel({ virtualSize, clusterSize: cs, version: c.compat === '0.10' ? 2 : 3, backing: backingContents });
  return { image, model, subclusterSize: c.extendedL2 ? cs / 32 : cs };
}

function openOptions(c: CaseConfig, rng: Prng, virtualSize: number): Qcow2OpenOptions {
  const cs = 2 ** c.clusterBits;
  // Data, tables and refcount structures of a small disk: far below 4× its size plus 64 clusters.
  const options: Qcow2OpenOptions = { readOnly: false, cache: c.cache, preallocate: c.preallocate, openHostFile: cappedOpener(4 * virtualSize + 64 * cs) };
  if (c.smallCaches || rng.chance(0.15)) {
    options.l2CacheBytes = 16 * Math.min(cs, 4096) * rng.range(1, 2);
    options.refcountCacheBytes = 4 * cs;
  }
  return options;
}

async function expectImageEqualsModel(image: Qcow2Image, model: GuestModel, where: string): Promise<void> {
  const got = await image.read(0, model.virtualSize);
  const diff = describeDifference(got, model.bytes, 0, model.clusterSize);
  expect(diff, `${where}: image differs from the model`).toBeUndefined();
}

/** qemu-img check: no errors, no corruptions, no leaks; qemu-img compare with the model: identical. */
async function expectQemuAgrees(dir: string, imagePath: string, model: GuestModel): Promise<void> {
  const check = await qemuImgCheck(imagePath);
  expect(check.report, `qemu-img check could not check: ${check.stderr}`).toBeDefined();
  expect({ code: check.code, errors: check.report?.['check-errors'], corruptions: check.report?.corruptions ?? 0, leaks: check.report?.leaks ?? 0 },
    `qemu-img check: ${JSON.stringify(check.report)} ${check.stderr}`).toEqual({ code: 0, errors: 0, corruptions: 0, leaks: 0 });
  const raw = `${dir}/model.raw`;
  await model.saveRaw(raw);
  expect(await qemuImgCompare(imagePath, raw, { formatA: 'qcow2', formatB: 'raw' }), 'qemu-img compare image vs model').toBe(true);
}

async function runSequence(dir: string, c: CaseConfig, seed: number, nbOps: number): Promise<void> {
  const rng = new Prng(seed);
  const { image: path, model, subclusterSize } = await makeFixture(dir, c, rng);
  const cs = model.clusterSize;
  const log: string[] = [];
  onTestFailed(() => console.error(`case seed ${seed} (${describeCase(c)}, virtual size ${model.virtualSize}); last operations:\n  ${log.slice(-25).join('\n  ')}`));
  let image = await openImage(path, openOptions(c, rng, model.virtualSize));
  try {
    const writeCap = Math.max(64 * KiB, Math.min(3 * cs, MiB));
    for (let i = 0; i < nbOps; i++) {
      const roll = rng.float();
      if (roll < 0.5) {
        const { offset, bytes } = randomGuestRange(rng, model.virtualSize, cs, writeCap, subclusterSize);
        const kind = rng.int(8);
        const data = kind === 0 ? Buffer.alloc(bytes) : kind === 1 ? Buffer.alloc(bytes, 1 + rng.int(255)) : patternBuffer(bytes, seed + i, offset);
        log.push(`write ${offset} +${bytes}${kind === 0 ? ' (zeros)' : kind === 1 ? ` (fill ${data[0]})` : ''}`);
        await image.write(offset, data);
        model.write(offset, data);
      } else if (roll < 0.65) {
        const { offset, bytes } = randomGuestRange(rng, model.virtualSize, cs, Math.max(writeCap, model.virtualSize / 3), subclusterSize);
        log.push(`writeZeroes ${offset} +${bytes}`);
        await image.writeZeroes(offset, bytes);
        model.writeZeroes(offset, bytes);
      } else if (roll < 0.8) {
        const { offset, bytes } = randomGuestRange(rng, model.virtualSize, cs, Math.max(writeCap, model.virtualSize / 3), subclusterSize);
        log.push(`discard ${offset} +${bytes}`);
        await image.discard(offset, bytes);
        model.discard(offset, bytes);
      } else if (roll < 0.88) {
        log.push('flush');
        await image.flush();
      } else if (roll < 0.93) {
        log.push('reopen');
        await image.close();
        image = await openImage(path, openOptions(c, rng, model.virtualSize));
        await expectImageEqualsModel(image, model, `after reopen (op ${i})`);
      } else {
        const { offset, bytes } = randomGuestRange(rng, model.virtualSize, cs, 2 * writeCap, subclusterSize);
        log.push(`read ${offset} +${bytes}`);
        const got = await image.read(offset, bytes);
        expect(describeDifference(got, model.read(offset, bytes), offset, cs), `read after op ${i}`).toBeUndefined();
      }
      expect({ l2: imageState(image).l2Cache.pinnedCount(), refcount: imageState(image).refcountCache.pinnedCount() }, `pinned tables after op ${i}`).toEqual({ l2: 0, refcount: 0 });
    }
    await expectImageEqualsModel(image, model, 'end of sequence');
  } finally {
    await image.close();
  }
  await expectQemuAgrees(dir, path, model);
  const again = await openImage(path, { readOnly: true });
  try {
    await expectImageEqualsModel(again, model, 'read-only reopen after close');
  } finally {
    await again.close();
  }
}

describe.skipIf(!hasQemu)('write path properties: random sequences vs the model, qemu-img check and compare', () => {
  const tmp = useTempDir('property');
  const masterSeed = seedFromEnv();
  const nbOps = envInt('PROPERTY_OPS', 40);
  const caseRng = new Prng(masterSeed);
  const cases = [...FIXED_CASES, ...Array.from({ length: envInt('PROPERTY_CASES', 6) }, () => randomCase(caseRng))];
  cases.forEach((c, index) => {
    it(`case ${index}: ${describeCase(c)}`, async () => {
      await runSequence(tmp.path, c, (masterSeed + index * 0x9e3779b1) >>> 0, nbOps);
    });
  });
});

describe.skipIf(!hasQemu)('images we write are read correctly by qemu-io', () => {
  const tmp = useTempDir('qemu-io');
  const seed = seedFromEnv();
  const configs: { name: string; options: Record<string, QemuOptionValue>; size: number; backing: boolean }[] = [
    { name: 'compat 0.10, 64 KiB clusters', options: { compat: '0.10' }, size: 8 * MiB, backing: false },
    { name: 'compat 1.1, 4 KiB clusters, refcount_bits 1', options: { cluster_size: 4096, refcount_bits: 1 }, size: 4 * MiB, backing: false },
    { name: '512 B clusters, refcount_bits 64', options: { cluster_size: 512, refcount_bits: 64 }, size: MiB, backing: false },
    { name: 'extended L2, 64 KiB clusters, raw backing', options: { extended_l2: true }, size: 8 * MiB, backing: true },
    { name: 'compat 0.10, 16 KiB clusters, raw backing', options: { compat: '0.10', cluster_size: 16384 }, size: 4 * MiB, backing: true },
  ];
  for (const config of configs) {
    it(config.name, async () => {
      const rng = new Prng(seed);
      const path = tmp.file('image.qcow2');
      let backing: Buffer | undefined;
      if (config.backing) {
        backing = Buffer.alloc(config.size, 0x5a);
        await writeFile(tmp.file('backing.raw'), backing);
      }
      await qemuImgCreate(path, config.size, config.options, config.backing ? { backing: tmp.file('backing.raw'), backingFormat: 'raw' } : {});
      const clusterSize = Number(config.options.cluster_size ?? 65536);
      const model = new GuestModel({ virtualSize: config.size, clusterSize, version: config.options.compat === '0.10' ? 2 : 3, backing });
      // Disjoint ranges, each given one fill byte; some zeroed, some discarded afterwards.
      const ranges: { offset: number; bytes: number; fill: number }[] = [];
      const image = await openImage(path, { readOnly: false });
      try {
        for (let attempts = 0; ranges.length < 24 && attempts < 500; attempts++) {
          const { offset, bytes } = randomGuestRange(rng, config.size, clusterSize, 3 * clusterSize);
          if (ranges.some((r) => r.offset < offset + bytes && offset < r.offset + r.bytes)) continue;
          const fill = 1 + rng.int(255);
          ranges.push({ offset, bytes, fill });
          await image.write(offset, Buffer.alloc(bytes, fill));
          model.write(offset, Buffer.alloc(bytes, fill));
        }
        for (const r of ranges.slice(0, 4)) {
          await image.writeZeroes(r.offset, r.bytes);
          model.writeZeroes(r.offset, r.bytes);
        }
        for (const r of ranges.slice(4, 8)) {
          await image.discard(r.offset, r.bytes);
          model.discard(r.offset, r.bytes);
        }
      } finally {
        await image.close();
      }
      // Every range as qemu-io must see it: a uniform byte run per model contents.
      const commands: string[] = [];
      for (const r of ranges) {
        let start = r.offset;
        const end = r.offset + r.bytes;
        while (start < end) {
          const value = model.bytes[start];
          let stop = start + 1;
          while (stop < end && model.bytes[stop] === value) stop++;
          commands.push(`read -P ${value} ${start} ${stop - start}`);
          start = stop;
        }
      }
      const result = await qemuIo(path, commands, { readOnly: true });
      expect(result.stdout).not.toMatch(/verification failed/i);
      expect(result.code, result.stderr).toBe(0);
      expect(result.stdout.match(/^read \d+\/\d+ bytes/gm)?.length).toBe(commands.length);
      const check = await qemuImgCheck(path);
      expect({ code: check.code, leaks: check.report?.leaks ?? 0, corruptions: check.report?.corruptions ?? 0 }).toEqual({ code: 0, leaks: 0, corruptions: 0 });
      const raw = tmp.file('model.raw');
      await model.saveRaw(raw);
      expect(await qemuImgCompare(path, raw, { formatA: 'qcow2', formatB: 'raw' })).toBe(true);
    });
  }
});

describe.skipIf(!hasQemu)('regressions found by the property tests', () => {
  const tmp = useTempDir('property-regression');

  // Seed 4082245971, case 2 (512 B clusters, refcount_bits 64): the second write never completed.
  // A plan allocates up to a whole L2 slice of contiguous clusters (64 here), but a refcount block
  // covers only 64 clusters and allocClusters places each new block at the first cluster of its own
  // range, so no run of 64 free clusters ever exists past the last block: it creates blocks forever.
  for (const { clusterSize, refcountBits } of [{ clusterSize: 512, refcountBits: 64 }, { clusterSize: 1024, refcountBits: 64 }, { clusterSize: 4096, refcountBits: 64 }]) {
    it(`a write of a whole L2 slice of new clusters completes (${clusterSize} B clusters, refcount_bits ${refcountBits})`, async () => {
      const path = tmp.file('image.qcow2');
      const sliceEntries = Math.min(clusterSize, 4096) / 8;
      const virtualSize = 4 * sliceEntries * clusterSize;
      await qemuImgCreate(path, virtualSize, { cluster_size: clusterSize, refcount_bits: refcountBits });
      const model = new GuestModel({ virtualSize, clusterSize, version: 3 });
      const image = await openImage(path, { readOnly: false, openHostFile: cappedOpener(16 * virtualSize) });
      try {
        for (const [offset, bytes] of [[2 * sliceEntries * clusterSize + 512, 8192], [sliceEntries * clusterSize, sliceEntries * clusterSize]] as const) {
          const data = patternBuffer(bytes, offset, offset);
          await image.write(offset, data);
          model.write(offset, data);
        }
        await expectImageEqualsModel(image, model, 'after the writes');
      } finally {
        await image.close().catch(() => undefined);
      }
      await expectQemuAgrees(tmp.path, path, model);
    }, 30_000);
  }
});
