/**
 * Issue 7 acceptance: `cp`/`dd` into an empty compressed mount (`qcow2fuse mount -o compress`).
 *
 * SRC is a real ext4 file system built with `mke2fs -d` from files on this machine (shared libraries
 * and docs: compressible clusters, incompressible ones such as .gz files, zero clusters), of
 * QCOW2FUSE_INGEST_BYTES (default 256 MiB; the benchmark copies 2 GiB). For zlib and zstd, each of
 * `cp SRC MNT/disk.raw` (image of size 0: cp's O_TRUNC and writes past the end grow it), `dd bs=4k`,
 * `dd bs=1M` and four `dd bs=64k` writers on disjoint ranges at once (conv=notrunc,fsync, seek=) must
 * leave, after unmount, an image that `qemu-img check` calls clean (no errors, no leaks) and
 * `qemu-img compare` identical with SRC, with about as many compressed clusters as
 * `qemu-img convert -c` makes of SRC, at most 1.02× its size (file size and allocated bytes).
 *
 * While they copy, a reader chases every writer: it follows the writer's file position
 * (/proc/PID/fdinfo) and reads back the 256 KiB just behind it through the mount — clusters that
 * are mostly still pending in the compressed writer — and compares them with SRC.
 *
 * Page cache, right after the copy while still mounted (the mount file's cache vanishes at unmount),
 * in the two places DESIGN §4 names: the image file (`fincore IMAGE`) and the mount file disk.raw,
 * whose cache `fincore` cannot see (a FUSE open without keep_cache drops it) — it is measured with
 * mincore(2) through a descriptor opened before the copy (openResidencyProbe; a direct_io file cannot
 * be mapped, hence has no cache). Every workload: disk.raw caches ≤ 2% of the data. After a cp: the
 * image ≤ 1% of its size resident, and image + disk.raw ≤ 2% of the data. This is the acceptance
 * bound "growth of Cached: minus fincore SRC ≤ 2%" taken per file: `Cached:` itself is machine-wide
 * and moves by tens to hundreds of MiB in half a second on a shared machine (other runs' I/O, their
 * drop_caches, DAMON reclaim), far more than the 5 MiB that 2% of this data set allows, so the
 * `Cached:` measurement is made (and judged) by the compress-ingest benchmark.
 *
 * With `-o writeback_cache` disk.raw is cached by the kernel (not direct_io) and the session drops its
 * pages once written back or read (session-cache.ts): cp and dd bs=4k run again with the option, under
 * the same bounds.
 *
 * The daemon's peak RSS (VmHWM) must stay under 300 MiB. The seed's edge case, a disk full of 0xFF,
 * is copied too (QCOW2FUSE_INGEST_ONES_BYTES, default 256 MiB).
 */
import { mkdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  chaseWriter, checkIngested, createEmptyImage, envByteCount, expectSuccess, IngestMount, MiB, openResidencyProbe, peakRssBytes,
  qemuImgConvertCompressed, residentBytes, start, writeOnesFile, type ChaseResult, type Codec,
} from '../helpers/compress-ingest.js';
import { makeExt4Image } from '../helpers/files.js';
import { qemuImgCheckClean, qemuImgInfo, type QemuImgCheckReport } from '../helpers/qemu.js';
import { makeTempDir, removeTempDir, tempDir } from '../helpers/tmp.js';
import { findTool, requireFuse, requireTools } from '../helpers/tools.js';
import { checkBuild } from './mount-harness.js';

const ready = requireFuse() && requireTools('qemu-img', 'mke2fs', 'cp', 'dd', 'fincore', 'python3');
const SRC_BYTES = envByteCount('QCOW2FUSE_INGEST_BYTES', 256 * MiB);
const ONES_BYTES = envByteCount('QCOW2FUSE_INGEST_ONES_BYTES', 256 * MiB);
const WRITERS = 4;
/** Peak RSS bound of the daemon (DESIGN §3: ≤ 300 MiB, flat in image size). */
const MAX_RSS_BYTES = 300 * MiB;

interface WriterSpec {
  command: string;
  args: string[];
  /** The target range this writer covers (target offset X holds source offset X). */
  start: number;
  end: number;
}

interface Workload {
  name: string;
  /** Virtual size of the empty image mounted. */
  imageBytes(srcBytes: number): number;
  writers(src: string, disk: string, srcBytes: number): WriterSpec[];
}

const dd = (bs: number, src: string, disk: string, first: number, count: number, srcBytes: number): WriterSpec => ({
  command: 'dd',
  args: [`if=${src}`, `of=${disk}`, `bs=${bs}`, `skip=${first}`, `seek=${first}`, `count=${count}`, 'conv=notrunc,fsync', 'status=none'],
  start: first * bs,
  end: Math.min(srcBytes, (first + count) * bs),
});

const WORKLOADS: Workload[] = [
  { name: 'cp SRC MNT/disk.raw (image grows from size 0)', imageBytes: () => 0, writers: (src, disk, n) => [{ command: 'cp', args: [src, disk], start: 0, end: n }] },
  { name: 'dd bs=4k conv=notrunc,fsync', imageBytes: (n) => n, writers: (src, disk, n) => [dd(4096, src, disk, 0, n / 4096, n)] },
  { name: 'dd bs=1M conv=notrunc,fsync', imageBytes: (n) => n, writers: (src, disk, n) => [dd(MiB, src, disk, 0, Math.ceil(n / MiB), n)] },
  {
    name: `${WRITERS} × dd bs=64k at once on disjoint ranges (seek=, conv=notrunc,fsync)`,
    imageBytes: (n) => n,
    writers: (src, disk, n) => {
      const blocks = n / 65536;
      const each = Math.ceil(blocks / WRITERS);
      return Array.from({ length: WRITERS }, (_, i) => dd(65536, src, disk, i * each, Math.min(each, blocks - i * each), n));
    },
  },
];

interface Measured {
  chased: ChaseResult[];
  /** fincore of the image right after the copy (still mounted), and its size then. */
  imageResident: number;
  imageSizeMounted: number;
  /** disk.raw's page cache seen through a descriptor opened before the copy (0 when direct_io). */
  mountFileResident: number;
  rss: number;
}

/** Mount `image` -o compress (and `options`), run the writers at once with a chasing reader each, measure, unmount. */
async function ingest(dir: string, image: string, src: string, specs: WriterSpec[], options: string[] = []): Promise<Measured> {
  const m = new IngestMount(image, join(dir, 'mnt'), join(dir, 'run'));
  try {
    const pid = await m.mount(['compress', ...options]);
    const probe = await openResidencyProbe(m.disk);
    let chased: ChaseResult[];
    let mountFileResident: number | 'direct_io';
    try {
      const writers = specs.map((s) => start(findTool(s.command) ?? s.command, s.args));
      const chases = writers.map((w, i) => chaseWriter(w, { target: m.disk, source: src, start: specs[i].start, end: specs[i].end }));
      const results = await Promise.all(writers.map((w) => w.done));
      results.forEach((r, i) => expectSuccess(`${specs[i].command} ${specs[i].args.join(' ')}`, r));
      chased = await Promise.all(chases);
      mountFileResident = await probe.measure(Math.max(...specs.map((s) => s.end)));
    } finally {
      await probe.close();
    }
    const measured: Measured = {
      chased, imageResident: await residentBytes(image), imageSizeMounted: (await stat(image)).size, rss: await peakRssBytes(pid),
      mountFileResident: mountFileResident === 'direct_io' ? 0 : mountFileResident,
    };
    await m.unmount();
    return measured;
  } finally {
    await m.cleanup();
  }
}

function expectChased(chased: ChaseResult[]): void {
  for (const c of chased) {
    expect(c.mismatches).toEqual([]);
    // Each writer runs for seconds; the reader polls every 20 ms.
    expect(c.reads).toBeGreaterThanOrEqual(1);
  }
}

describe.skipIf(!ready)('cp and dd into an empty compressed mount', () => {
  let dir: string;
  let src: string;
  let ones: string;

  beforeAll(async () => {
    await checkBuild();
    dir = await tempDir('compress-ingest');
    src = join(dir, 'src.raw');
    await makeExt4Image(src, { sizeBytes: SRC_BYTES, stagingDir: join(dir, 'staging') });
    ones = join(dir, 'ones.raw');
    await writeOnesFile(ones, ONES_BYTES);
  });

  describe.each<Codec>(['zlib', 'zstd'])('%s', (codec) => {
    let reference: { bytes: number; allocated: number; check: QemuImgCheckReport };
    let onesReference: { bytes: number; allocated: number };

    beforeAll(async () => {
      const ref = join(dir, `reference-${codec}.qcow2`);
      await qemuImgConvertCompressed(src, ref, codec);
      const info = await stat(ref);
      reference = { bytes: info.size, allocated: info.blocks * 512, check: await qemuImgCheckClean(ref) };
      const onesRef = join(dir, `reference-ones-${codec}.qcow2`);
      await qemuImgConvertCompressed(ones, onesRef, codec);
      const onesInfo = await stat(onesRef);
      onesReference = { bytes: onesInfo.size, allocated: onesInfo.blocks * 512 };
    });

    it.each(WORKLOADS)('$name: clean, identical, compressed, ≤ 1.02× qemu-img convert -c; pending reads see the data; disk.raw not cached', async (workload) => {
      const work = join(dir, `${codec}-work`);
      await mkdir(work);
      try {
        const image = join(work, 'image.qcow2');
        await createEmptyImage(image, workload.imageBytes(SRC_BYTES), codec);
        const measured = await ingest(work, image, src, workload.writers(src, join(work, 'mnt', 'disk.raw'), SRC_BYTES));
        expectChased(measured.chased);
        expect(measured.rss).toBeLessThan(MAX_RSS_BYTES);
        expect(measured.mountFileResident).toBeLessThanOrEqual(0.02 * SRC_BYTES);

        const report = await checkIngested(image, src);
        expect((await qemuImgInfo(image))['format-specific']?.data['compression-type']).toBe(codec);
        // Every full cluster that shrinks is stored compressed, as qemu-img convert -c decides it.
        const refCompressed = reference.check['compressed-clusters'] ?? 0;
        expect(refCompressed).toBeGreaterThan(0);
        expect(report.check['compressed-clusters']).toBeGreaterThanOrEqual(0.99 * refCompressed);
        expect(report.imageBytes).toBeLessThanOrEqual(1.02 * reference.bytes);
        expect(report.allocatedBytes).toBeLessThanOrEqual(1.02 * reference.allocated);
      } finally {
        await rm(work, { recursive: true, force: true });
      }
    });

    it('page cache right after cp, still mounted: image ≤ 1% of itself, image + disk.raw ≤ 2% of the data', async () => {
      const work = join(dir, `${codec}-cache`);
      await mkdir(work);
      try {
        const image = join(work, 'image.qcow2');
        await createEmptyImage(image, 0, codec);
        const measured = await ingest(work, image, src, [{ command: 'cp', args: [src, join(work, 'mnt', 'disk.raw')], start: 0, end: SRC_BYTES }]);
        const report = await checkIngested(image, src);
        const uncompressed = (report.check['allocated-clusters'] ?? 0) - (report.check['compressed-clusters'] ?? 0);
        expect(measured.imageResident, `${measured.imageResident} bytes of the ${measured.imageSizeMounted}-byte image cached; ` +
          `${uncompressed} clusters are stored uncompressed (incompressible data or metadata)`).toBeLessThanOrEqual(0.01 * measured.imageSizeMounted);
        expect(measured.imageResident + measured.mountFileResident).toBeLessThanOrEqual(0.02 * SRC_BYTES);
      } finally {
        await rm(work, { recursive: true, force: true });
      }
    });

    it('a disk full of 0xFF (the seed\'s edge case), cp: clean, identical, every cluster compressed, allocated ≤ 1.02× qemu-img\'s + 1 cluster', async () => {
      const work = join(dir, `${codec}-ones`);
      await mkdir(work);
      try {
        const image = join(work, 'image.qcow2');
        await createEmptyImage(image, 0, codec);
        const measured = await ingest(work, image, ones, [{ command: 'cp', args: [ones, join(work, 'mnt', 'disk.raw')], start: 0, end: ONES_BYTES }]);
        expectChased(measured.chased);
        expect(measured.rss).toBeLessThan(MAX_RSS_BYTES);
        const report = await checkIngested(image, ones);
        expect(report.check['compressed-clusters']).toBe(ONES_BYTES / 65536);
        // The image is nearly all metadata here: allow our open chunk area to end one cluster later.
        expect(report.allocatedBytes).toBeLessThanOrEqual(1.02 * onesReference.allocated + 65536);
      } finally {
        await rm(work, { recursive: true, force: true });
      }
    });
  });
});

describe.skipIf(!ready)('cp and dd into an empty compressed mount with -o writeback_cache', () => {
  let dir: string;
  let src: string;

  // makeTempDir, not tempDir: a beforeAll after another describe's tests would register the directory
  // with the test that ran last, which removes it after the next test.
  beforeAll(async () => {
    await checkBuild();
    dir = await makeTempDir('compress-ingest-wb');
    src = join(dir, 'src.raw');
    await makeExt4Image(src, { sizeBytes: SRC_BYTES, stagingDir: join(dir, 'staging') });
  });
  afterAll(async () => {
    await removeTempDir(dir);
  });

  it.each(WORKLOADS.slice(1, 3))('zstd, $name: clean, identical, compressed; pending reads see the data; disk.raw keeps ≤ 2% of the data cached', async (workload) => {
    const work = join(dir, 'work');
    await mkdir(work);
    try {
      const image = join(work, 'image.qcow2');
      await createEmptyImage(image, workload.imageBytes(SRC_BYTES), 'zstd');
      const measured = await ingest(work, image, src, workload.writers(src, join(work, 'mnt', 'disk.raw'), SRC_BYTES), ['writeback_cache']);
      expectChased(measured.chased);
      expect(measured.rss).toBeLessThan(MAX_RSS_BYTES);
      expect(measured.mountFileResident).toBeLessThanOrEqual(0.02 * SRC_BYTES);
      const report = await checkIngested(image, src);
      expect(report.check['compressed-clusters']).toBeGreaterThan(0);
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  });

  // cp's writes land in the page cache at once and its close writes them back after the descriptor is
  // gone, so no reader can chase it here: this case is about what stays cached.
  it('zstd, page cache right after cp, still mounted: image ≤ 1% of itself, image + disk.raw ≤ 2% of the data', async () => {
    const work = join(dir, 'cache');
    await mkdir(work);
    try {
      const image = join(work, 'image.qcow2');
      await createEmptyImage(image, 0, 'zstd');
      const measured = await ingest(work, image, src, [{ command: 'cp', args: [src, join(work, 'mnt', 'disk.raw')], start: 0, end: SRC_BYTES }],
        ['writeback_cache']);
      expect(measured.rss).toBeLessThan(MAX_RSS_BYTES);
      const report = await checkIngested(image, src);
      expect(report.check['compressed-clusters']).toBeGreaterThan(0);
      expect(measured.imageResident).toBeLessThanOrEqual(0.01 * measured.imageSizeMounted);
      expect(measured.imageResident + measured.mountFileResident).toBeLessThanOrEqual(0.02 * SRC_BYTES);
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  });
});
