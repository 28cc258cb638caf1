/**
 * Fuzz worker (a child process of the runner, run from dist/ with node): executes cases sent over
 * IPC and answers with the invariant violations it saw. Per case, on the mutated image:
 *   1. open read-only, read the whole guest disk (sampled when it is huge), walk the layout, check;
 *      the file must not change;
 *   2. open writable (a dirty image is repaired here), write a little, flush, close — or, when the
 *      open is refused, the file must not have changed;
 *   3. sometimes `check -r all` on a copy of the mutated image;
 *   4. a final read-only check of what the writable session left.
 * Every error anything throws must be one of our coded errors; anything else (TypeError,
 * RangeError, an fs error that escaped validation, an unhandled rejection) is a failure. Hangs and
 * crashes are caught by the runner, which kills a worker that does not answer in time.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { copyFile, rm, stat } from 'node:fs/promises';
import { CodedError } from '../../src/io/errors.js';
import { checkImage } from '../../src/qcow2/check/check.js';
import { Qcow2Image } from '../../src/qcow2/engine/image.js';
import { layout } from '../../src/qcow2/tools/layout.js';
import { FuzzRng } from './prng.js';
import { openImage } from '../../src/node.js';

export interface CaseRequest {
  type: 'case';
  id: number;
  path: string;
  seed: number;
}

export interface CaseReply {
  type: 'done';
  id: number;
  failures: string[];
}

const READ_ALL_LIMIT_BYTES = 64 * 1024 * 1024;
const CHUNK_BYTES = 1024 * 1024;
const SAMPLED_CHUNKS = 64;

class Case {
  readonly failures: string[] = [];

  /** Run `fn`; a coded error is an acceptable refusal, anything else a failure. Returns undefined on error. */
  async attempt<T>(where: string, fn: () => Promise<T>): Promise<T | undefined> {
    try {
      return await fn();
    } catch (err) {
      if (!(err instanceof CodedError) || typeof err.code !== 'string') {
        const e = err instanceof Error ? err : new Error(String(err));
        this.failures.push(`${where}: non-coded ${e.name}: ${e.message}\n${e.stack ?? ''}`);
      }
      return undefined;
    }
  }
}

/** Size and SHA-256 of the file; a file whose size changed is not read (it may have grown far, sparse). */
async function fileHash(path: string, sameSizeAs?: string): Promise<string> {
  const bytes = (await stat(path)).size;
  if (sameSizeAs !== undefined && !sameSizeAs.startsWith(`${bytes}:`)) return `${bytes}:`;
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path) as AsyncIterable<Buffer>) hash.update(chunk);
  return `${bytes}:${hash.digest('hex')}`;
}

async function readEverything(c: Case, image: Qcow2Image, rng: FuzzRng): Promise<void> {
  const size = image.virtualSize;
  const chunks: number[] = [];
  if (size <= READ_ALL_LIMIT_BYTES) {
    for (let offset = 0; offset < size; offset += CHUNK_BYTES) chunks.push(offset);
  } else {
    chunks.push(0, Math.max(0, size - CHUNK_BYTES));
    for (let i = 0; i < SAMPLED_CHUNKS; i++) chunks.push(Math.floor((rng.u32() / 0x1_0000_0000) * Math.max(1, size - CHUNK_BYTES)));
  }
  for (const offset of chunks) await c.attempt(`read ${offset}`, () => image.read(offset, Math.min(CHUNK_BYTES, size - offset)));
}

async function walkLayout(image: Qcow2Image): Promise<number> {
  let entries = 0;
  for await (const _entry of layout(image)) entries++;
  return entries;
}

async function writeALittle(c: Case, image: Qcow2Image, rng: FuzzRng): Promise<void> {
  const size = image.virtualSize;
  if (size === 0) return;
  const ops = 1 + rng.int(4);
  for (let i = 0; i < ops; i++) {
    const offset = rng.int(Math.min(size, 0x1_0000_0000));
    const bytes = Math.min(size - offset, 1 + rng.int(128 * 1024));
    const kind = rng.int(6);
    if (kind === 0) await c.attempt('writeZeroes', () => image.writeZeroes(offset, bytes));
    else if (kind === 1) await c.attempt('discard', () => image.discard(offset, bytes));
    else await c.attempt('write', () => image.write(offset, Buffer.alloc(bytes, 0x40 + i)));
  }
  await c.attempt('flush', () => image.flush());
}

export async function runCase(path: string, seed: number): Promise<string[]> {
  const c = new Case();
  const rng = new FuzzRng(seed);
  const before = await fileHash(path);
  // The repair of step 3 works on a copy of the image as mutated (not as the writable session left it).
  const repairCopy = rng.chance(0.25) ? `${path}.repair` : undefined;
  if (repairCopy !== undefined) await copyFile(path, repairCopy);

  const ro = await c.attempt('open ro', () => openImage(path, { readOnly: true }));
  if (ro) {
    await readEverything(c, ro, rng);
    await c.attempt('layout', () => walkLayout(ro));
    await c.attempt('check', () => checkImage(ro));
    await c.attempt('close ro', () => ro.close());
  }
  if ((await fileHash(path, before)) !== before) c.failures.push('the read-only session changed the file');

  const rw = await c.attempt('open rw', () => openImage(path, { readOnly: false }));
  if (rw) {
    await writeALittle(c, rw, rng);
    await c.attempt('close rw', () => rw.close());
  } else if ((await fileHash(path, before)) !== before) {
    c.failures.push('a refused writable open changed the file');
  }

  if (repairCopy !== undefined) {
    const image = await c.attempt('open for repair', () => openImage(repairCopy, { readOnly: false, check: true }));
    if (image) {
      await c.attempt('check -r all', () => checkImage(image, { repair: 'all' }));
      await c.attempt('close repaired', () => image.close());
    }
    await rm(repairCopy, { force: true });
  }

  // The read-only session checked the file as it was; check again only what the writable session changed.
  const final = rw ? await c.attempt('open final', () => openImage(path, { readOnly: true, check: true })) : undefined;
  if (final) {
    await c.attempt('final check', () => checkImage(final));
    await c.attempt('close final', () => final.close());
  }
  return c.failures;
}

function describe(reason: unknown): string {
  return reason instanceof Error ? `${reason.name}: ${reason.message}\n${reason.stack ?? ''}` : String(reason);
}

/** Failures not tied to an await of the case (unhandled rejections), reported with the current case. */
const stray: string[] = [];

if (process.send !== undefined) {
  process.removeAllListeners('warning');
  process.on('warning', () => undefined);
  process.on('unhandledRejection', (reason) => stray.push(`unhandled rejection: ${describe(reason)}`));
  process.on('message', (message: CaseRequest) => {
    if (message.type !== 'case') return;
    void runCase(message.path, message.seed).then(
      (failures) => failures,
      (err: unknown) => [`case threw outside any operation: ${describe(err)}`],
    ).then(async (failures) => {
      await new Promise((resolve) => setImmediate(resolve));
      const reply: CaseReply = { type: 'done', id: message.id, failures: [...failures, ...stray.splice(0)] };
      process.send?.(reply);
    });
  });
}
