/**
 * One run of a power-cut test (powercut.test.ts, compress-powercut.test.ts): a sequence of guest
 * steps on an image opened over a fresh journaled copy of a file, with the power cut before I/O
 * event `cutAt` (0: never). Returns the survivor and what the guest may expect of it: the state at
 * the last completed flush and the operations after it.
 */
import { FaultyHostFile } from '../../src/io/faulty-host-file.js';
import type { HostFile } from '../../src/io/host-file.js';
import { MemoryHostFile } from '../../src/io/memory-host-file.js';
import type { Qcow2Image } from '../../src/qcow2/engine/image.js';
import type { GuestModel, GuestOp } from './model.js';
import { Prng } from './patterns.js';
import { PowerSwitch } from './power-switch.js';

export type Step = GuestOp | { op: 'flush' };

export function describeStep(s: Step): string {
  return s.op === 'flush' ? 'flush' : `${s.op} ${s.offset} +${s.op === 'write' ? s.data.length : s.bytes}`;
}

export async function runStep(image: Qcow2Image, s: Step): Promise<void> {
  switch (s.op) {
    case 'write': return image.write(s.offset, s.data);
    case 'writeZeroes': return image.writeZeroes(s.offset, s.bytes);
    case 'discard': return image.discard(s.offset, s.bytes);
    case 'flush': return image.flush();
  }
}

export interface CutRun {
  initial: Buffer;
  model0: GuestModel;
  steps: Step[];
  cutAt: number;
  seed: number;
  /** Tear unflushed writes into 512-byte sectors. */
  torn: boolean;
  /** Opens the image over the switched file. */
  open: (file: HostFile) => Promise<Qcow2Image>;
  /** The image opens several handles on the one switched file (PowerSwitch's `shared`). */
  sharedHandles?: boolean;
}

export interface RunResult {
  cutDone: boolean;
  events: number;
  survivor: MemoryHostFile | undefined;
  durable: GuestModel;
  /** Tail operations after the last completed flush, the one cut short included. */
  tail: GuestOp[];
  log: string[];
}

/** Run the steps with the power cut before I/O event `cutAt` (0: never), or after the last step. */
export async function runWithCut(run: CutRun): Promise<RunResult> {
  const { seed, cutAt } = run;
  const faulty = await FaultyHostFile.wrap(MemoryHostFile.from(run.initial), { journal: true, seed, keepProbability: new Prng(seed).float(), ...(run.torn ? { tornSectorBytes: 512 } : {}) });
  const power = new PowerSwitch(faulty, cutAt, run.sharedHandles ?? false);
  const image = await run.open(power);
  const model = run.model0.clone();
  let durable = run.model0.clone();
  let tail: GuestOp[] = [];
  const log: string[] = [];
  for (const step of run.steps) {
    log.push(describeStep(step));
    if (step.op !== 'flush') tail.push(step);
    try {
      await runStep(image, step);
    } catch (err) {
      if (power.cut === undefined) throw err;
      log.push(`  ^ power cut at I/O event ${cutAt}`);
      return { cutDone: true, events: power.events, survivor: await power.cut, durable, tail, log };
    }
    if (step.op === 'flush') {
      durable = model.clone();
      tail = [];
    } else {
      model.apply(step);
    }
  }
  if (cutAt === 0) {
    await image.close();
    return { cutDone: false, events: power.events, survivor: undefined, durable, tail, log };
  }
  // The image may still hold data and have I/O under way: the cut lands after the last step returned.
  log.push('  (power cut after the last step)');
  return { cutDone: true, events: power.events, survivor: await (power.cut ?? faulty.powerCut()), durable, tail, log };
}
