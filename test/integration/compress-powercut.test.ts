/**
 * Power cuts during compressed writes (issue 7, DESIGN §4 "Write ordering" and "Compressed writes").
 * kill -9 of a mount (compress-crash.test.ts) loses no page cache, so it cannot catch a write that
 * reaches the disk in the wrong order; this does. The image is opened with `compress: true` on a
 * FaultyHostFile in journal mode over a MemoryHostFile — both of its handles, the buffered one and
 * the "O_DIRECT" one the compressed writer packs host clusters through, are the same journaled file,
 * so an fdatasync through either makes everything written before it durable, as on Linux. The power
 * goes at a random pwrite/fdatasync (or after the last step); the survivor is the durable state plus
 * a random subset of the unflushed writes, optionally torn into 512-byte sectors. Then:
 * - `qemu-img check` finds no corruption (leaks allowed: the writer's open area, refcounts ahead of L2);
 * - every guest byte no operation touched since the last completed flush reads as it was then, and a
 *   byte only writes touched holds its flushed value or one of those writes' values;
 * - the survivor opens again with `compress: true`, takes writes, and closes without corruption.
 * Steps: writes of compressible and incompressible data (whole clusters, partial, unaligned, rewrites
 * of compressed clusters), zero writes, discards, flushes. Replay with TEST_SEED=…;
 * COMPRESS_POWERCUT_RUNS sets runs per configuration (default 6).
 */
import { readFile, writeFile } from 'node:fs/promises';
import { describe, expect, it, onTestFailed } from 'vitest';
import type { HostFile } from '../../src/io/host-file.js';
import { MemoryHostFile } from '../../src/io/memory-host-file.js';
import { Qcow2Image } from '../../src/qcow2/engine/image.js';
import { explainInterrupted, GuestModel, randomGuestRange } from '../helpers/model.js';
import { runWithCut, type Step } from '../helpers/power-cut-run.js';
import { patternBuffer, Prng, seedFromEnv } from '../helpers/patterns.js';
import { qemuImgCheck, qemuImgCreate, type QemuOptionValue } from '../helpers/qemu.js';
import { useTempDir } from '../helpers/tmp.js';
import { requireTool } from '../helpers/tools.js';
import { openImage } from '../../src/node.js';

const hasQemu = requireTool('qemu-img');
const MiB = 1024 * 1024;
const RUNS = Math.max(1, Number(process.env.COMPRESS_POWERCUT_RUNS ?? '6'));
const OPS = 40;

function makeSteps(rng: Prng, model: GuestModel, seed: number): Step[] {
  const cs = model.clusterSize;
  const steps: Step[] = [];
  for (let i = 0; i < OPS; i++) {
    const roll = rng.float();
    const { offset, bytes } = randomGuestRange(rng, model.virtualSize, cs, roll < 0.7 ? 8 * cs : model.virtualSize / 4);
    if (roll < 0.7) steps.push({ op: 'write', offset, data: patternBuffer(bytes, seed + i, offset, rng.chance(0.8) ? 'compressible' : 'random') });
    else if (roll < 0.77) steps.push({ op: 'writeZeroes', offset, bytes });
    else if (roll < 0.84) steps.push({ op: 'discard', offset, bytes });
    else steps.push({ op: 'flush' });
  }
  return steps;
}

/** Open `path` with compressed writes, both handles on `file`. */
function openCompressed(path: string, file: HostFile): Promise<Qcow2Image> {
  return openImage(path, {
    readOnly: false, file, lock: false, compress: true, openHostFile: async () => file,
    // A small budget and area, so that back-pressure, partial host-cluster writes and area changes happen.
    compressedWriter: { maxPendingBytes: 8 * 65536, maxPartialClusters: 4, areaClusters: 2 },
  });
}

interface Config {
  name: string;
  options: Record<string, QemuOptionValue>;
  size: number;
}

const CONFIGS: Config[] = [
  { name: 'zlib, 64 KiB clusters', options: {}, size: 4 * MiB },
  { name: 'zstd, 64 KiB clusters', options: { compression_type: 'zstd' }, size: 4 * MiB },
  { name: 'zlib, 4 KiB clusters (chunks straddle host clusters)', options: { cluster_size: 4096 }, size: MiB },
  { name: 'zstd, 16 KiB clusters, refcount_bits 2', options: { cluster_size: 16384, refcount_bits: 2, compression_type: 'zstd' }, size: 2 * MiB },
];

describe.skipIf(!hasQemu)('power cut during compressed writes', () => {
  const tmp = useTempDir('compress-powercut');
  const masterSeed = seedFromEnv();
  CONFIGS.forEach((config, configIndex) => {
    it(`leaves a consistent image with the flushed data intact (${config.name})`, async () => {
      const path = tmp.file('image.qcow2');
      const clusterSize = Number(config.options.cluster_size ?? 65536);
      await qemuImgCreate(path, config.size, config.options);
      const initial = await readFile(path);
      const model0 = new GuestModel({ virtualSize: config.size, clusterSize, version: 3 });
      const open = (file: HostFile): Promise<Qcow2Image> => openCompressed(path, file);
      let current: string[] = [];
      onTestFailed(() => console.error(`failing run:\n  ${current.join('\n  ')}`));
      for (let run = 0; run < RUNS; run++) {
        const seed = (masterSeed + configIndex * 7919 + run * 104729) >>> 0;
        const rng = new Prng(seed);
        const steps = makeSteps(rng, model0, seed);
        const dry = await runWithCut({ initial, model0, steps, cutAt: 0, seed, torn: false, open, sharedHandles: true });
        const cutAt = 1 + rng.int(dry.events + 1);
        const torn = rng.chance(0.5);
        const result = await runWithCut({ initial, model0, steps, cutAt, seed, torn, open, sharedHandles: true });
        current = [`run ${run}, seed ${seed}, cut at event ${cutAt} of ${dry.events}${torn ? ', torn sectors' : ''}`, ...result.log];
        expect(result.cutDone).toBe(true);
        const survivor = result.survivor as MemoryHostFile;
        const survivorPath = tmp.file(`survivor-${run}.qcow2`);
        await writeFile(survivorPath, survivor.snapshot());
        const check = await qemuImgCheck(survivorPath);
        expect({ errors: check.report?.['check-errors'], corruptions: check.report?.corruptions ?? 0, code: check.code === 3 ? 0 : check.code },
          `run ${run}: qemu-img check ${JSON.stringify(check.report)} ${check.stderr}`).toEqual({ errors: 0, corruptions: 0, code: 0 });
        const reader = await openImage(survivorPath, { readOnly: true, file: MemoryHostFile.from(survivor.snapshot()), lock: false });
        const actual = await reader.read(0, config.size);
        await reader.close();
        expect(explainInterrupted(actual, result.durable, result.tail), `run ${run}: survivor contents`).toBeUndefined();
        // Life goes on: the survivor takes compressed writes (a rewrite too) and closes consistent.
        const again = await openCompressed(survivorPath, survivor);
        await again.write(0, patternBuffer(3 * clusterSize + 1, seed, 0, 'compressible'));
        await again.write(clusterSize, patternBuffer(clusterSize, seed + 1, clusterSize, 'compressible'));
        await again.close();
        await writeFile(survivorPath, survivor.snapshot());
        const after = await qemuImgCheck(survivorPath);
        expect({ errors: after.report?.['check-errors'], corruptions: after.report?.corruptions ?? 0 }, `run ${run}: qemu-img check after reuse ${JSON.stringify(after.report)}`)
          .toEqual({ errors: 0, corruptions: 0 });
      }
    });
  });
});
