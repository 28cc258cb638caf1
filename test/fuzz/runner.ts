/**
 * The fuzz runner: builds the seeds, then feeds mutated images to a pool of worker processes
 * (dist/test/fuzz/worker.js), one case at a time each. A case that uses `timeoutMs` (2 s) of the
 * worker's CPU time, or 30 s of wall time, without answering is a hang: the worker is killed
 * (SIGKILL) and the case re-run once in a fresh worker; hanging twice is a failure. A worker that dies is a crash (out-of-memory included:
 * workers run with a bounded heap). Each failure keeps the mutated image and its description.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
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
  /** Per-case limit of worker CPU time (default 2000 ms). */
  timeoutMs?: number;
  /** Per-case limit of wall time, for cases that wait instead of compute (default 30 s). */
  wallTimeoutMs?: number;
  /** Scratch directory (seeds, case images, failure repros under failures/). */
  workDir: string;
  /** Run only these case indices (reproduce a failure). */
  only?: number[];
  /** Heap limit of a worker in MiB (default 512). */
  workerHeapMiB?: number;
  onProgress?: (done: number, total: number, failures: number) => void;
}

/** CPU time (user + system) a process has used, in ms, from /proc; undefined where unavailable. */
function cpuMs(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / CLOCK_TICKS_PER_SECOND;
  } catch {
    return undefined;
  }
}

/** Linux's USER_HZ (clock ticks in /proc/PID/stat), 100 on every architecture Node runs on. */
const CLOCK_TICKS_PER_SECOND = 100;

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

  /**
   * Run one case; resolves with its failures, or with why the worker died or hung. A case hangs when
   * the worker spends `cpuLimitMs` of CPU on it (a busy loop) or `wallLimitMs` of wall time (a
   * deadlock): CPU time, read from /proc, does not count time other processes take from the machine.
   */
  run(path: string, seed: number, cpuLimitMs: number, wallLimitMs: number): Promise<{ failures: string[] } | { dead: string } | { hang: string }> {
    this.child ??= this.spawn();
    const child = this.child;
    const id = this.nextId++;
    const started = Date.now();
    const cpuAtStart = cpuMs(child.pid);
    return new Promise((resolve) => {
      const poll = setInterval(() => {
        const cpu = cpuMs(child.pid);
        const cpuUsed = cpu !== undefined && cpuAtStart !== undefined ? cpu - cpuAtStart : Date.now() - started;
        const wall = Date.now() - started;
        if (cpuUsed <= cpuLimitMs && wall <= wallLimitMs) return;
        clearInterval(poll);
        this.pending = undefined;
        this.child = undefined;
        child.kill('SIGKILL');
        resolve({ hang: `${cpuUsed} ms of CPU, ${wall} ms of wall time without an answer (limits ${cpuLimitMs} ms CPU, ${wallLimitMs} ms wall)` });
      }, 100);
      this.pending = { id, child, resolve: (r) => { clearInterval(poll); resolve(r); } };
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
  const wallTimeoutMs = options.wallTimeoutMs ?? 30_000;
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
    let result = await slot.run(path, p.caseSeed, timeoutMs, wallTimeoutMs);
    if ('hang' in result) {
      await writeFile(path, p.image);
      result = await slot.run(path, p.caseSeed, timeoutMs, wallTimeoutMs);
      if ('hang' in result) {
        await record(p, 'hang', [`${result.hang}, twice`]);
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
