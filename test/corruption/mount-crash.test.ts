/**
 * Issue 6 acceptance: kill -9 of the mount daemon at random moments of an uncompressed random-write
 * workload (fio), again and again on the same image. Each round mounts the image, writes one more
 * 1 MiB slice with `dd conv=fsync` (durable once dd returns), starts fio (time-based random 4–64 KiB
 * O_SYNC writes of a per-round pattern into the round's own region; every write fio completes is durable)
 * and, once fio holds the mounted file open, kills the daemon at a random moment. After every kill the image opens (ours, writable, and
 * qemu-io), `qemu-img check` and ours find at most leaks, and every durable write so far — the dd
 * slices and each write fio logged as completed — reads back exactly (through qemu-img convert).
 *
 * The same again with `-o writeback_cache`: dd's fsync and fio's O_SYNC make the kernel write its
 * cached pages back and then ask for our fsync, so the same writes must be durable.
 *
 * Kills: QCOW2FUSE_FIO_KILLS (default 10; the acceptance run uses 50). Randomness: TEST_SEED.
 */
import { readdir, readFile, readlink } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { beforeAll, describe, expect, it } from 'vitest';
import { IngestMount, MiB, start, type Started } from '../helpers/compress-ingest.js';
import { run } from '../helpers/exec.js';
import { writePatternFile } from '../helpers/files.js';
import { Prng, seedFromEnv } from '../helpers/patterns.js';
import { qemuImgCheck, qemuImgConvertToRaw, qemuImgCreate, qemuIo } from '../helpers/qemu.js';
import { tempDir } from '../helpers/tmp.js';
import { requireFuse, requireTools } from '../helpers/tools.js';
import { checkBuild } from '../integration/mount-harness.js';
import { ourCheck } from './our-check.js';
import { peek } from './poke.js';
import { openImage } from '../../src/node.js';

const ready = requireFuse() && requireTools('qemu-img', 'qemu-io', 'fio', 'dd');
const KILLS = Number(process.env.QCOW2FUSE_FIO_KILLS ?? '10');
if (!Number.isInteger(KILLS) || KILLS < 1 || KILLS > 64) throw new Error(`QCOW2FUSE_FIO_KILLS must be 1..64, got '${process.env.QCOW2FUSE_FIO_KILLS}'`);
const VIRTUAL_BYTES = 1024 * MiB;
/** dd slices go to [0, 64 MiB), one per round; fio rounds each get their own region above. */
const SLICE_BYTES = MiB;
const FIO_BASE = 64 * MiB;
const FIO_REGION_BYTES = Math.floor((VIRTUAL_BYTES - FIO_BASE) / 64 / MiB) * MiB;

/** The 4-byte pattern fio writes in round `round` (buffer_pattern, repeated). */
function roundPattern(round: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE((0x5a00a500 | (round << 16) | round) >>> 0);
  return b;
}

/** Writes fio completed, from its completion-latency log with offsets: [offset, bytes][]. */
async function completedWrites(logPath: string): Promise<[number, number][]> {
  const text = await readFile(logPath, 'utf8').catch(() => '');
  return text.split('\n').filter((l) => l.trim() !== '').map((line) => {
    const fields = line.split(',').map((f) => Number(f.trim()));
    return [fields[4], fields[3]];
  });
}

/** Resolves true once `writer` has `path` open (/proc/PID/fd), false when it ends first. */
async function waitForOpen(writer: Started, path: string): Promise<boolean> {
  let finished = false;
  writer.done.then(() => { finished = true; }, () => { finished = true; });
  while (!finished) {
    const fds = await readdir(`/proc/${writer.pid}/fd`).catch(() => [] as string[]);
    for (const fd of fds) if (await readlink(`/proc/${writer.pid}/fd/${fd}`).catch(() => '') === path) return true;
    await sleep(2);
  }
  return false;
}

describe.skipIf(!ready).each([[[] as string[]], [['writeback_cache']]])('kill -9 of the daemon during a random-write workload (-o %j)', (options) => {
  let dir: string;

  beforeAll(async () => {
    await checkBuild();
    dir = await tempDir('mount-crash');
  });

  it(`${KILLS} kills at random moments: the image always opens, at most leaks, every durable write intact`, async () => {
    const prng = new Prng(seedFromEnv());
    const image = join(dir, 'image.qcow2');
    const slices = join(dir, 'slices.bin');
    const raw = join(dir, 'image.raw');
    await qemuImgCreate(image, VIRTUAL_BYTES);
    await writePatternFile(slices, KILLS * SLICE_BYTES, 0x5eed);
    const m = new IngestMount(image, join(dir, 'mnt'), join(dir, 'run'));
    const fioWrites: { round: number; writes: [number, number][] }[] = [];
    let interrupted = 0;
    try {
      for (let round = 0; round < KILLS; round++) {
        await m.mount(options);
        const slice = await run('dd', [`if=${slices}`, `of=${m.disk}`, `bs=${SLICE_BYTES}`, `skip=${round}`, `seek=${round}`, 'count=1', 'conv=notrunc,fsync', 'status=none']);
        expect([round, slice.code, slice.stderr]).toEqual([round, 0, '']);

        const logPrefix = join(dir, `fio-${round}`);
        const fio = start('fio', [
          `--name=round${round}`, `--filename=${m.disk}`, '--rw=randwrite', `--bs=${prng.pick(['4k', '16k', '64k'])}`,
          `--offset=${FIO_BASE + round * FIO_REGION_BYTES}`, `--size=${FIO_REGION_BYTES}`, '--ioengine=psync', '--sync=1',
          `--randseed=${prng.int(0x7fffffff)}`, `--buffer_pattern=0x${roundPattern(round).toString('hex')}`,
          `--write_lat_log=${logPrefix}`, '--log_offset=1', '--output-format=terse', `--output=${logPrefix}.out`,
          '--thread', '--allow_file_create=0', '--time_based', '--runtime=600',
        ]);
        const what = `round ${round}`;
        // The moment is random within the workload: count from when fio holds the mounted file open
        // (a kill before that would leave fio nothing to write to).
        expect([what, await waitForOpen(fio, m.disk)]).toEqual([what, true]);
        // fio is time-based (it rewrites its region until killed), so on any machine speed the kill
        // lands while it writes; a fio that ended first is counted and fails the test below.
        const endedFirst = await Promise.race([sleep(prng.int(2500)).then(() => false), fio.done.then(() => true)]);
        await m.kill();
        const finished = await fio.done;
        if (!endedFirst && finished.code !== 0) interrupted++;
        fioWrites.push({ round, writes: await completedWrites(`${logPrefix}_clat.1.log`) });

        // The image opens (ours writable: the next mount does the same; qemu-io) and checks with at most leaks.
        const qemu = await qemuImgCheck(image);
        expect([what, qemu.code === 0 || qemu.code === 3, qemu.report?.corruptions ?? 0, qemu.report?.['check-errors']]).toEqual([what, true, 0, 0]);
        expect([what, [0, 3].includes((await ourCheck(image)).code)]).toEqual([what, true]);
        await (await openImage(image, { readOnly: false })).close();
        expect([what, (await qemuIo(image, ['read 0 512'])).code]).toEqual([what, 0]);

        // Every durable write so far reads back.
        await qemuImgConvertToRaw(image, raw, { format: 'qcow2' });
        expect([what, (await peek(raw, 0, (round + 1) * SLICE_BYTES)).equals(await peek(slices, 0, (round + 1) * SLICE_BYTES))]).toEqual([what, true]);
        for (const { round: r, writes } of fioWrites) {
          const pattern = roundPattern(r);
          for (const [offset, bytes] of writes) {
            const expected = Buffer.alloc(bytes, pattern);
            expect([what, `fio round ${r} write ${offset}+${bytes}`, (await peek(raw, offset, bytes)).equals(expected)])
              .toEqual([what, `fio round ${r} write ${offset}+${bytes}`, true]);
          }
        }
      }
      // Kills did land while fio was writing (it lost its file mid-run, not after finishing).
      expect(interrupted).toBe(KILLS);
      expect(fioWrites.reduce((n, r) => n + r.writes.length, 0)).toBeGreaterThan(0);
    } finally {
      await m.cleanup();
    }
  }, 60_000 + KILLS * 30_000);
});
