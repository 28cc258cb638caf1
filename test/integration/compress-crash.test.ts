/**
 * Issue 7 acceptance: kill -9 of a compressed mount's daemon mid-copy, again and again on the same
 * image. Each round mounts the image (`-o compress`: it must always open), copies one more slice of
 * SRC with `dd conv=fsync` (durable: fsync returned), then starts another copy elsewhere (random
 * offset, length, block size; fsync or not) and kills the daemon at a random moment of it — while
 * chunks are gathering, compressing, packed into host clusters not yet written, being linked, or
 * flushed. After every kill `qemu-img check` must find no corruption and no check errors (leaked
 * clusters are allowed: DESIGN §4 "a crash may leak clusters, never corrupt"), and every slice
 * fsync'ed so far must read back exactly (through qemu-img convert, the oracle).
 *
 * SRC: an ext4 image built with `mke2fs -d` (QCOW2FUSE_CRASH_BYTES, default 128 MiB). Kills per
 * codec: QCOW2FUSE_CRASH_KILLS (default 5; the acceptance run uses 20). Randomness: TEST_SEED.
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { createEmptyImage, envByteCount, expectSuccess, IngestMount, MiB, start, waitForWriterPosition, type Codec } from '../helpers/compress-ingest.js';
import { run } from '../helpers/exec.js';
import { makeExt4Image } from '../helpers/files.js';
import { Prng, seedFromEnv } from '../helpers/patterns.js';
import { qemuImgCheck, qemuImgConvertToRaw } from '../helpers/qemu.js';
import { tempDir } from '../helpers/tmp.js';
import { findTool, requireFuse, requireTools } from '../helpers/tools.js';
import { checkBuild } from './mount-harness.js';

const ready = requireFuse() && requireTools('qemu-img', 'mke2fs', 'dd', 'cmp');
const SRC_BYTES = envByteCount('QCOW2FUSE_CRASH_BYTES', 128 * MiB);
const KILLS = Number(process.env.QCOW2FUSE_CRASH_KILLS ?? '5');
if (!Number.isInteger(KILLS) || KILLS < 1) throw new Error(`QCOW2FUSE_CRASH_KILLS must be a positive integer, got '${process.env.QCOW2FUSE_CRASH_KILLS}'`);
const CLUSTER = 65536;

/** `cmp -n BYTES A B`: true when the first BYTES bytes are equal. */
async function samePrefix(a: string, b: string, bytes: number): Promise<boolean> {
  const result = await run(findTool('cmp') ?? 'cmp', ['-n', String(bytes), a, b]);
  if (result.code > 1) throw new Error(`cmp failed: ${result.stderr.trim()}`);
  return result.code === 0;
}

describe.skipIf(!ready)('kill -9 of the daemon of a compressed mount mid-copy', () => {
  let dir: string;
  let src: string;

  beforeAll(async () => {
    await checkBuild();
    dir = await tempDir('compress-crash');
    src = join(dir, 'src.raw');
    await makeExt4Image(src, { sizeBytes: SRC_BYTES, stagingDir: join(dir, 'staging') });
  });

  it.each<Codec>(['zlib', 'zstd'])(`%s: ${KILLS} kills at random moments; the image always opens, no corruption, fsync'ed data intact`, async (codec) => {
    const prng = new Prng(seedFromEnv() ^ (codec === 'zstd' ? 0x5a5a5a5a : 0));
    const work = join(dir, codec);
    await mkdir(work);
    const image = join(work, 'image.qcow2');
    await createEmptyImage(image, SRC_BYTES, codec);
    const m = new IngestMount(image, join(work, 'mnt'), join(work, 'run'));
    // Durable slices fill the first half, one per round; the killed copies go to the second half.
    const half = SRC_BYTES / 2;
    const sliceBytes = Math.floor(half / KILLS / CLUSTER) * CLUSTER;
    const raw = join(work, 'image.raw');
    let interrupted = 0;
    try {
      for (let round = 0; round < KILLS; round++) {
        await m.mount(['compress']);
        const slice = sliceBytes / CLUSTER;
        expectSuccess('durable slice', await run('dd', [`if=${src}`, `of=${m.disk}`, `bs=${CLUSTER}`, `skip=${round * slice}`, `seek=${round * slice}`,
          `count=${slice}`, 'conv=notrunc,fsync', 'status=none']));

        const bs = prng.pick([4096, CLUSTER, MiB]);
        const blocks = Math.floor(prng.range(8 * MiB, half / 2) / bs);
        const first = Math.floor((half + prng.int(half - blocks * bs + 1)) / bs);
        const fsync = prng.chance(0.5);
        const copy = start('dd', [`if=${src}`, `of=${m.disk}`, `bs=${bs}`, `skip=${first}`, `seek=${first}`, `count=${blocks}`,
          `conv=notrunc${fsync ? ',fsync' : ''}`, 'status=none']);
        // Mostly at a random point of the copy; sometimes once it has returned (data held, not flushed).
        const afterCopy = round > 0 && prng.chance(0.2);
        const killAt = (first + prng.float() * blocks) * bs;
        const what = `round ${round}: kill -9 ${afterCopy ? 'after' : `at byte ${killAt - first * bs} of`} dd bs=${bs} seek=${first} count=${blocks}` +
          `${fsync ? ' conv=fsync' : ''}`;
        if (afterCopy) await copy.done;
        else if (await waitForWriterPosition(copy, m.disk, killAt)) interrupted++;
        await m.kill();
        const copied = await copy.done;
        // The writer either finished or lost the connection (ENOTCONN / ECONNABORTED), nothing else.
        expect([what, copied.code === 0 || /not connected|connection abort/i.test(copied.stderr) ? 'ok' : copied.stderr]).toEqual([what, 'ok']);

        const check = await qemuImgCheck(image);
        expect([what, check.code === 0 || check.code === 3 ? 'ok' : `exit ${check.code}: ${JSON.stringify(check.report) ?? check.stderr}`]).toEqual([what, 'ok']);
        expect([what, check.report?.corruptions ?? 0, check.report?.['check-errors']]).toEqual([what, 0, 0]);
        await qemuImgConvertToRaw(image, raw, { format: 'qcow2' });
        expect([what, await samePrefix(raw, src, (round + 1) * sliceBytes)]).toEqual([what, true]);
      }
      // Kills did land mid-copy (round 0 always aims there): the writer had not finished yet.
      expect(interrupted).toBeGreaterThanOrEqual(1);
    } finally {
      await m.cleanup();
    }
  }, 60_000 + KILLS * 30_000);
});
