/**
 * Power cuts (issue 4 acceptance, DESIGN §4 "Write ordering"): the image runs on a FaultyHostFile in
 * journal mode over a MemoryHostFile; at a random pwrite/fdatasync (anywhere inside any operation, or
 * after the last one) the power goes: the surviving file is the durable state plus a random subset
 * of the unflushed writes (optionally torn into 512-byte sectors). Then:
 * - `qemu-img check` on the survivor finds no corruption (leaks are allowed);
 * - every guest byte no operation touched since the last completed flush() reads as it was then;
 * - every byte only plain writes touched since then holds its flushed value or one of those writes'
 *   values (bytes under a discard or whole-cluster zero write may hold anything: the guest gave
 *   them up);
 * - the survivor opens read-write again, takes a write, and closes without corruption (with lazy
 *   refcounts that open repairs the refcounts first, so nothing may leak either).
 * Each run is replayed once without a cut first to learn how many I/O events it has, so the cut point
 * is uniform over the run. Replay with TEST_SEED=…; POWERCUT_RUNS sets runs per configuration (default 6).
 */
import { describe, expect, it, onTestFailed } from 'vitest';
import { readFile, writeFile } from 'node:fs/promises';
import type { HostFile } from '../../../../src/io/host-file.js';
import { MemoryHostFile } from '../../../../src/io/memory-host-file.js';
import { Qcow2Image } from '../../../../src/qcow2/engine/image.js';
import { explainInterrupted, GuestModel, randomGuestRange } from '../../../helpers/model.js';
import { runWithCut, type Step } from '../../../helpers/power-cut-run.js';
import { patternBuffer, Prng, seedFromEnv } from '../../../helpers/patterns.js';
import { qemuImgCheck, qemuImgCreate, type QemuOptionValue } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTool } from '../../../helpers/tools.js';
import { openImage } from '../../../../src/node.js';

const hasQemu = requireTool('qemu-img');
const MiB = 1024 * 1024;
const RUNS = Math.max(1, Number(process.env.POWERCUT_RUNS ?? '6'));
const OPS = 40;

function makeSteps(rng: Prng, model: GuestModel, seed: number): Step[] {
  const cs = model.clusterSize;
  const steps: Step[] = [];
  for (let i = 0; i < OPS; i++) {
    const roll = rng.float();
    const { offset, bytes } = randomGuestRange(rng, model.virtualSize, cs, roll < 0.6 ? Math.max(3 * cs, 65536) : model.virtualSize / 4);
    if (roll < 0.6) steps.push({ op: 'write', offset, data: patternBuffer(bytes, seed + i, offset) });
    else if (roll < 0.7) steps.push({ op: 'writeZeroes', offset, bytes });
    else if (roll < 0.8) steps.push({ op: 'discard', offset, bytes });
    else steps.push({ op: 'flush' });
  }
  return steps;
}

interface Config {
  name: string;
  options: Record<string, QemuOptionValue>;
  size: number;
  backing?: boolean;
  /** lazy_refcounts: refcounts may be stale after a crash; the dirty bit makes the next open repair them. */
  lazy?: boolean;
}

const CONFIGS: Config[] = [
  { name: '4 KiB clusters', options: { cluster_size: 4096 }, size: 2 * MiB },
  { name: '512 B clusters, refcount_bits 8', options: { cluster_size: 512, refcount_bits: 8 }, size: MiB },
  { name: 'compat 0.10, 64 KiB clusters, raw backing', options: { compat: '0.10' }, size: 4 * MiB, backing: true },
  { name: 'extended L2, 32 KiB clusters, raw backing', options: { cluster_size: 32768, extended_l2: true }, size: 4 * MiB, backing: true },
  { name: '16 KiB clusters, refcount_bits 1', options: { cluster_size: 16384, refcount_bits: 1 }, size: 4 * MiB },
  { name: '256 KiB clusters, refcount_bits 32', options: { cluster_size: 262144, refcount_bits: 32 }, size: 4 * MiB },
  { name: 'lazy refcounts, 8 KiB clusters', options: { cluster_size: 8192, lazy_refcounts: true }, size: 2 * MiB, lazy: true },
];

describe.skipIf(!hasQemu)('power cut at a random point', () => {
  const tmp = useTempDir('powercut');
  const masterSeed = seedFromEnv();
  CONFIGS.forEach((config, configIndex) => {
    it(`leaves a consistent image with the flushed data intact (${config.name})`, async () => {
      const path = tmp.file('image.qcow2');
      const clusterSize = Number(config.options.cluster_size ?? 65536);
      let backing: Buffer | undefined;
      if (config.backing === true) {
        backing = patternBuffer(Math.floor(config.size * 0.6 / 512) * 512, masterSeed, 0);
        await writeFile(tmp.file('backing.raw'), backing);
      }
      await qemuImgCreate(path, config.size, config.options, backing === undefined ? {} : { backing: tmp.file('backing.raw'), backingFormat: 'raw' });
      const initial = await readFile(path);
      const model0 = new GuestModel({ virtualSize: config.size, clusterSize, version: config.options.compat === '0.10' ? 2 : 3, backing });
      const open = (file: HostFile): Promise<Qcow2Image> => openImage(path, { readOnly: false, file, lock: false });
      let current: string[] = [];
      onTestFailed(() => console.error(`failing run:\n  ${current.join('\n  ')}`));
      for (let run = 0; run < RUNS; run++) {
        const seed = (masterSeed + configIndex * 7919 + run * 104729) >>> 0;
        const rng = new Prng(seed);
        const steps = makeSteps(rng, model0, seed);
        const dry = await runWithCut({ initial, model0, steps, cutAt: 0, seed, torn: false, open });
        const cutAt = 1 + rng.int(dry.events + 1); // events + 1: after the last step
        const torn = rng.chance(0.5);
        const result = await runWithCut({ initial, model0, steps, cutAt, seed, torn, open });
        current = [`run ${run}, seed ${seed}, cut at event ${cutAt} of ${dry.events}${torn ? ', torn sectors' : ''}`, ...result.log];
        expect(result.cutDone).toBe(true);
        const survivor = result.survivor!;
        const survivorPath = tmp.file(`survivor-${run}.qcow2`);
        await writeFile(survivorPath, survivor.snapshot());
        if (config.lazy !== true) {
          const check = await qemuImgCheck(survivorPath);
          expect(check.report, `run ${run}: qemu-img check could not check: ${check.stderr}`).toBeDefined();
          expect({ errors: check.report?.['check-errors'], corruptions: check.report?.corruptions ?? 0, code: check.code === 3 ? 0 : check.code },
            `run ${run}: qemu-img check ${JSON.stringify(check.report)}`).toEqual({ errors: 0, corruptions: 0, code: 0 });
        }
        const reader = await openImage(survivorPath, { readOnly: true, file: MemoryHostFile.from(survivor.snapshot()), lock: false });
        const actual = await reader.read(0, config.size);
        await reader.close();
        expect(explainInterrupted(actual, result.durable, result.tail), `run ${run}: survivor contents`).toBeUndefined();
        // Life goes on: the survivor takes writes and closes consistent.
        const again = await openImage(survivorPath, { readOnly: false, file: survivor, lock: false });
        await again.write(0, patternBuffer(3 * clusterSize + 1, seed, 0));
        await again.close();
        await writeFile(survivorPath, survivor.snapshot());
        const after = await qemuImgCheck(survivorPath);
        expect({ errors: after.report?.['check-errors'], corruptions: after.report?.corruptions ?? 0 }, `run ${run}: qemu-img check after reuse ${JSON.stringify(after.report)}`)
          .toEqual({ errors: 0, corruptions: 0 });
        // With lazy refcounts the reopen repaired the refcounts: nothing may leak.
        if (config.lazy === true) expect(after.report?.leaks ?? 0, `run ${run}: leaks after the repairing reopen`).toBe(0);
      }
    });
  });
});
