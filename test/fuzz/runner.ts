/**
 * The fuzz runner: builds the seeds, then feeds mutated images to a pool of worker processes
 * (dist/test/fuzz/worker.js), one case at a time each. A case that does not answer within
 * `timeoutMs` is a hang: the worker is killed (SIGKILL) and the case re-run once in a fresh worker
 * so machine load is not mistaken for a hang. A worker that dies is a crash (out-of-memory included:
 * workers run with a bounded heap). Each failure keeps the mutated image and its description.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { cpus } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { mutate, parseSeed, type SeedInfo } from './mutate.js';
import { caseSeed, FuzzRng } from './prng.js';
import { makeSeeds, provideBacking } from './seeds.js';
import type { CaseReply, CaseRequest } from './worker.js';

export interface FuzzOptions {
  cases: number;
  /** Run seed: the same seed and case count give the same cases. */
  seed: number;
  jobs?: number;
  /** Per-case limit (default 2000 ms). */
  timeoutMs?: number;
  /** Scratch directory (seeds, case images, failure repros under failures/). */
  workDir: string;
  /** Run only these case indices (reproduce a failure). */
  only?: number[];
  /** Heap limit of a worker in MiB (default 512). */
  workerHeapMiB?: number;
  onProgress?: (done: number, total: number, failures: number) => void;
}

export interface FuzzFailure {
  caseIndex: number;
  seedImage: string;
  kind: 'invariant' | 'hang' | 'crash';
  details: string[];
  mutations: string[];
  /** The mutated image, kept for reproduction. */
  imagePath: string;
}

export interface FuzzReport {
  cases: number;
  failures: FuzzFailure[];
  seed: number;
}

/** The compiled worker, whether this module runs from dist/ or from source under vitest. */
export function workerPath(): string {
  const here = fileURLToPath(import.meta.url);
  return here.endsWith('.ts') ? fileURLToPath(new URL('../../dist/test/fuzz/worker.js', import.meta.url)) : fileURLToPath(new URL('./worker.js', import.meta.url));
}

interface Prepared {
  index: number;
  seedName: string;
  caseSeed: number;
  image: Buffer;
  mutations: string[];
}

class Slot {
  private child: ChildProcess | undefined;
  /** The case in flight, with the worker running it (an old worker's exit must not settle a newer case). */
  private pending: { id: number; child: ChildProcess; resolve: (r: { failures: string[] } | { dead: string }) => void } | undefined;
  private nextId = 1;
  readonly dir: string;
  private readonly heapMiB: number;

  constructor(dir: string, heapMiB: number) {
    this.dir = dir;
    this.heapMiB = heapMiB;
  }

  private spawn(): ChildProcess {
    const child = fork(workerPath(), [], { execArgv: [`--max-old-space-size=${this.heapMiB}`], stdio: ['ignore', 'ignore', 'pipe', 'ipc'] });
    let stderr = '';
    child.stderr?.on('data', (chunk: Buffer) => { stderr = (stderr + chunk.toString()).slice(-4000); });
    child.on('message', (message: CaseReply) => {
      if (message.type === 'done' && this.pending?.id === message.id) {
        const p = this.pending;
        this.pending = undefined;
        p.resolve({ failures: message.failures });
      }
    });
    child.on('exit', (code, signal) => {
      if (this.child === child) this.child = undefined;
      const p = this.pending;
      if (p?.child !== child) return;
      this.pending = undefined;
      p.resolve({ dead: `worker exited (code ${code}, signal ${signal}): ${stderr.trim()}` });
    });
    return child;
  }

  /** Run one case; resolves with its failures, or with why the worker died or hung. */
  run(path: string, seed: number, timeoutMs: number): Promise<{ failures: string[] } | { dead: string } | { hang: true }> {
    this.child ??= this.spawn();
    const child = this.child;
    const id = this.nextId++;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.pending = undefined;
        this.child = undefined;
        child.kill('SIGKILL');
        resolve({ hang: true });
      }, timeoutMs);
      this.pending = { id, child, resolve: (r) => { clearTimeout(timer); resolve(r); } };
      const request: CaseRequest = { type: 'case', id, path, seed };
      child.send(request);
    });
  }

  close(): void {
    this.child?.kill('SIGKILL');
    this.child = undefined;
  }
}

export async function runFuzz(options: FuzzOptions): Promise<FuzzReport> {
  const timeoutMs = options.timeoutMs ?? 2000;
  const jobs = Math.max(1, options.jobs ?? cpus().length);
  const seedDir = join(options.workDir, 'seeds');
  const failDir = join(options.workDir, 'failures');
  const seeds = await makeSeeds(seedDir);
  const parsed: { name: string; bytes: Buffer; info: SeedInfo }[] = [];
  for (const s of seeds) {
    const bytes = await readFile(s.path);
    parsed.push({ name: s.name, bytes, info: parseSeed(bytes) });
  }
  const indices = options.only ?? Array.from({ length: options.cases }, (_, i) => i);
  const prepare = (index: number): Prepared => {
    const seed = caseSeed(options.seed, index);
    const rng = new FuzzRng(seed);
    const base = parsed[rng.int(parsed.length)];
    const { image, description } = mutate(base.bytes, base.info, rng);
    return { index, seedName: base.name, caseSeed: rng.u32(), image, mutations: description };
  };
  const failures: FuzzFailure[] = [];
  let next = 0;
  let done = 0;
  const slots: Slot[] = [];
  for (let j = 0; j < jobs; j++) {
    const dir = join(options.workDir, `slot${j}`);
    await mkdir(dir, { recursive: true });
    await provideBacking(seedDir, dir);
    slots.push(new Slot(dir, options.workerHeapMiB ?? 512));
  }
  const record = async (p: Prepared, kind: FuzzFailure['kind'], details: string[]): Promise<void> => {
    await mkdir(failDir, { recursive: true });
    const imagePath = join(failDir, `case${p.index}-${p.seedName}.qcow2`);
    await writeFile(imagePath, p.image);
    await writeFile(`${imagePath}.txt`, [`case ${p.index} (run seed ${options.seed}), seed image ${p.seedName}, ${kind}`, ...p.mutations, '', ...details].join('\n'));
    failures.push({ caseIndex: p.index, seedImage: p.seedName, kind, details, mutations: p.mutations, imagePath });
  };
  const runOne = async (slot: Slot, p: Prepared): Promise<void> => {
    const path = join(slot.dir, `case.qcow2`);
    await writeFile(path, p.image);
    let result = await slot.run(path, p.caseSeed, timeoutMs);
    if ('hang' in result) {
      await writeFile(path, p.image);
      result = await slot.run(path, p.caseSeed, timeoutMs);
      if ('hang' in result) {
        await record(p, 'hang', [`no answer within ${timeoutMs} ms, twice`]);
        return;
      }
    }
    if ('dead' in result) await record(p, 'crash', [result.dead]);
    else if (result.failures.length > 0) await record(p, 'invariant', result.failures);
  };
  await Promise.all(slots.map(async (slot) => {
    while (next < indices.length) {
      const p = prepare(indices[next++]);
      await runOne(slot, p);
      done++;
      options.onProgress?.(done, indices.length, failures.length);
    }
    slot.close();
  }));
  for (const slot of slots) await rm(slot.dir, { recursive: true, force: true });
  failures.sort((a, b) => a.caseIndex - b.caseIndex);
  return { cases: indices.length, failures, seed: options.seed };
}
