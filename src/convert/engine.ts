/**
 * The copy engine of `convert`: guest bytes from a ConvertSource into a ConvertSink, in windows.
 *
 * Windows of the source (WINDOW_BYTES, aligned) are planned from its extents — what block status
 * says reads as zeros is never read — or, for a stream, read one after another until it ends. Of
 * the `jobs` windows in flight, the sink writes as many at once as it does well (sink.parallelWrites:
 * one for a file, two to keep the compressed writer fed) and reads run ahead with the rest, so a
 * stalled write does not stall reads; with -c the compressed writer compresses the clusters of the
 * windows it holds on the threadpool, on every core. Each window
 * is cut into granules and classified (zero-runs.ts): all-zero granules are never written, with -B
 * granules equal to the backing file are skipped.
 */
import { ConvertError, sideError } from './errors.js';
import type { ConvertSink } from './sink.js';
import type { ConvertSource } from './source.js';
import { classifyWindow } from './zero-runs.js';
import { zeroBlock } from '../qcow2/engine/zeros.js';

/** Guest bytes per window; windows of sized sources start at multiples of it (a multiple of every cluster size). */
export const WINDOW_BYTES = 8 * 1024 * 1024;

export interface ConvertOptions {
  /** qemu-img's -S in bytes (default 4096); 0 writes everything (a fully allocated output). */
  minSparseBytes?: number;
  /** -B: the backing file's contents; granules equal to it are not written. */
  backing?: ConvertSource;
  /** -m: windows in flight, reads and writes together (default 8; the sink takes at most half). */
  jobs?: number;
  /** For a stream: the size it must have (a stream that ends before or goes past it is an error). */
  expectedBytes?: number;
  /** Called as windows complete, with the bytes done and the total when known. */
  onProgress?(doneBytes: number, totalBytes: number | undefined): void;
}

export interface ConvertResult {
  /** The destination's virtual size (a stream's bytes rounded up to 512). */
  virtualSize: number;
  /** Guest bytes of the source read or known as zeros. */
  sourceBytes: number;
}

/** One window: `data` undefined when block status says it reads as zeros. */
interface Chunk {
  guestOffset: number;
  bytes: number;
  data?: Buffer;
  /** The pooled buffer behind data, given back once written. */
  window?: Buffer;
}

/** A chunk being read (wrapped: an async generator would await a bare promise it yields). */
interface PendingChunk {
  chunk: Promise<Chunk>;
}

interface PlannedWindow {
  guestOffset: number;
  bytes: number;
  zero: boolean;
}

/** Windows of a sized source in guest order, each wholly zero (by block status) or to be read. */
async function* planWindows(source: ConvertSource): AsyncGenerator<PlannedWindow> {
  let pending: PlannedWindow | undefined;
  for await (const extent of source.extents()) {
    let pos = extent.guestOffset;
    const end = extent.guestOffset + extent.bytes;
    while (pos < end) {
      const windowEnd = Math.min(end, pos - (pos % WINDOW_BYTES) + WINDOW_BYTES);
      // Neighbouring extents of the same kind share a window (small data extents, compressed runs).
      if (pending && pending.zero === extent.zero && pending.guestOffset + pending.bytes === pos
        && Math.floor(pending.guestOffset / WINDOW_BYTES) === Math.floor(pos / WINDOW_BYTES)) {
        pending.bytes += windowEnd - pos;
      } else {
        if (pending) yield pending;
        pending = { guestOffset: pos, bytes: windowEnd - pos, zero: extent.zero };
      }
      pos = windowEnd;
    }
  }
  if (pending && pending.bytes > 0) yield pending;
}

/** Pooled window buffers. */
class WindowPool {
  private readonly free: Buffer[] = [];
  take(): Buffer {
    return this.free.pop() ?? Buffer.allocUnsafe(WINDOW_BYTES);
  }
  give(window: Buffer | undefined): void {
    if (window) this.free.push(window);
  }
}

/** Chunks of a sized source: reads started as they are planned (they complete out of order). */
async function* sizedChunks(source: ConvertSource, pool: WindowPool): AsyncGenerator<PendingChunk> {
  for await (const w of planWindows(source)) {
    if (w.zero) {
      yield { chunk: Promise.resolve({ guestOffset: w.guestOffset, bytes: w.bytes }) };
      continue;
    }
    const window = pool.take();
    const data = window.subarray(0, w.bytes);
    const chunk = source.readInto(w.guestOffset, data).then(
      () => ({ guestOffset: w.guestOffset, bytes: w.bytes, data, window }),
      (err: unknown) => { throw sideError('source', source.path, w.guestOffset, err); });
    chunk.catch(() => undefined); // observed when drained; not an unhandled rejection meanwhile
    yield { chunk };
  }
}

/** Chunks of a stream, read in order until it ends (a short read is its end). */
async function* streamChunks(source: ConvertSource, pool: WindowPool): AsyncGenerator<PendingChunk> {
  let guestOffset = 0;
  for (;;) {
    const window = pool.take();
    let n: number;
    try {
      n = await source.readInto(guestOffset, window);
    } catch (err) {
      throw sideError('source', source.path, guestOffset, err);
    }
    if (n === 0) {
      pool.give(window);
      return;
    }
    yield { chunk: Promise.resolve({ guestOffset, bytes: n, data: window.subarray(0, n), window }) };
    guestOffset += n;
    if (n < window.length) return;
  }
}

/** The backing file's bytes at [guestOffset, +bytes) (zeros past its end). */
async function readBacking(backing: ConvertSource, guestOffset: number, bytes: number): Promise<Buffer> {
  const buf = Buffer.alloc(bytes);
  const size = backing.virtualSize ?? 0;
  if (guestOffset < size) await backing.readInto(guestOffset, buf.subarray(0, Math.min(bytes, size - guestOffset)));
  return buf;
}

/** Write one window into the sink: its data runs, and zeroes where the destination would not read zeros. */
async function writeChunk(chunk: Chunk, sink: ConvertSink, options: ConvertOptions): Promise<void> {
  const minSparseBytes = options.minSparseBytes ?? 4096;
  if (sink.ordered) {
    await (chunk.data ? sink.writeData(chunk.guestOffset, chunk.data) : sink.writeZeroes(chunk.guestOffset, chunk.bytes));
    return;
  }
  if (!chunk.data && !options.backing) {
    if (minSparseBytes > 0 && sink.zeroInitialized) return;
    if (minSparseBytes > 0) {
      await sink.writeZeroes(chunk.guestOffset, chunk.bytes);
      return;
    }
  }
  const data = chunk.data ?? zeroBlock(chunk.bytes);
  const backing = options.backing ? await readBacking(options.backing, chunk.guestOffset, chunk.bytes)
    .catch((err: unknown) => { throw sideError('source', options.backing!.path, chunk.guestOffset, err); }) : undefined;
  const runs = classifyWindow(data, chunk.guestOffset, { granuleBytes: sink.granuleBytes, minSparseBytes, zeroInitialized: sink.zeroInitialized, ...(backing ? { backing } : {}) });
  await Promise.all(runs.map((run) => {
    if (run.kind === 'data') return sink.writeData(chunk.guestOffset + run.start, data.subarray(run.start, run.end));
    if (run.kind === 'zero') return sink.writeZeroes(chunk.guestOffset + run.start, run.end - run.start);
    return Promise.resolve();
  }));
}

/**
 * Copy `source` into `sink` and finish the sink (final size, flush, close); on failure the sink is
 * aborted (closed, left consistent) and the error says which side failed and at which offset.
 */
export async function convertImage(source: ConvertSource, sink: ConvertSink, options: ConvertOptions = {}): Promise<ConvertResult> {
  let sourceBytes: number;
  try {
    sourceBytes = await copyWindows(source, sink, options);
  } catch (err) {
    await sink.abort();
    throw err;
  }
  if (source.sequential && options.expectedBytes !== undefined && sourceBytes !== options.expectedBytes) {
    await sink.abort();
    const early = sourceBytes < options.expectedBytes;
    throw new ConvertError(early ? 'ESHORTREAD' : 'ELONGREAD', early
      ? `${source.path}: the input ended early, after ${sourceBytes} of ${options.expectedBytes} bytes`
      : `${source.path}: the input is longer than the expected ${options.expectedBytes} bytes`, { path: source.path, guestOffset: sourceBytes });
  }
  const virtualSize = source.sequential ? Math.ceil(sourceBytes / 512) * 512 : sourceBytes;
  try {
    await sink.finish(virtualSize);
  } catch (err) {
    throw sideError('destination', sink.path, virtualSize, err);
  }
  return { virtualSize, sourceBytes };
}

/** The copy loop (see the module comment); returns the source bytes covered. */
async function copyWindows(source: ConvertSource, sink: ConvertSink, options: ConvertOptions): Promise<number> {
  const jobs = Math.max(2, options.jobs ?? 8);
  const writeAhead = Math.min(sink.parallelWrites, Math.floor(jobs / 2));
  const readAhead = jobs - writeAhead;
  const pool = new WindowPool();
  const total = source.virtualSize ?? options.expectedBytes;
  const reading: Promise<Chunk>[] = [];
  const writing = new Set<Promise<void>>();
  let failure: { error: unknown } | undefined;
  let doneBytes = 0;
  const drainOne = async (): Promise<void> => {
    const c = await reading.shift()!;
    await sink.ensureSize(c.guestOffset + c.bytes).catch((err: unknown) => { throw sideError('destination', sink.path, c.guestOffset, err); });
    const w = writeChunk(c, sink, options).then(() => {
      pool.give(c.window);
      doneBytes += c.bytes;
      options.onProgress?.(doneBytes, total);
    }, (err: unknown) => { failure ??= { error: sideError('destination', sink.path, c.guestOffset, err) }; });
    writing.add(w);
    void w.finally(() => writing.delete(w));
    while (writing.size >= writeAhead) await Promise.race(writing);
    if (failure) throw failure.error;
  };
  let sourceBytes = 0;
  try {
    options.onProgress?.(0, total);
    for await (const pending of source.sequential ? streamChunks(source, pool) : sizedChunks(source, pool)) {
      reading.push(pending.chunk);
      if (reading.length >= readAhead) await drainOne();
    }
    while (reading.length > 0) await drainOne();
    await Promise.all(writing);
    if (failure) throw failure.error;
    sourceBytes = source.virtualSize ?? doneBytes;
  } finally {
    // Settle I/O still in flight after a failure before the source and the sink are closed under it.
    await Promise.allSettled([...reading, ...writing]);
  }
  return sourceBytes;
}
