/**
 * Our own I/O thread pool for buffered host files (and O_DIRECT ones with `aio=threads`) — QEMU's
 * `aio=threads`. libuv's threadpool, behind fs.read/fs.write, is shared with every other job
 * (compression, fs calls) and settles each request with its own callback and request object; here
 * THREAD_IO_THREADS threads of native/threadio.c serve a FIFO and their completions reach JS in one
 * call per batch. Reads of a buffered file are first tried on the main thread with
 * preadv2(RWF_NOWAIT): a page-cache hit is answered there, without any thread hop, and only a miss
 * (EAGAIN) goes to the pool. Writes always go to the pool (Linux has no non-blocking buffered write:
 * pwritev2(RWF_NOWAIT) on ext4 answers EOPNOTSUPP).
 *
 * One pool per process; `threadIo()` returns null when it cannot start (callers keep libuv's pool).
 */
import createDebug from 'debug';

import { preadNowait, threadIoCreate, threadIoSubmit, type ThreadIoHandle } from './native.js';
import { SlotEngine, type SlotRequest } from './slot-engine.js';

const debug = createDebug('qcow2fuse:io');

/** Request slots (FUSE sends up to 64 requests at once, a read may split into several host reads). */
const THREAD_IO_SLOTS = 256;
/**
 * Threads of the pool. Measured with fio 4 KiB randrw qd16 through a mount (2 cores, under load:
 * load average 10–15), daemon CPU per request: 31.0 µs on libuv's pool (16 threads, as the CLI sets
 * UV_THREADPOOL_SIZE), 25.9 µs with 4 threads,
 * 27.3 µs with 8, 28.0 µs with 16. 8 keeps more cache misses at the device for little CPU.
 */
export const THREAD_IO_THREADS = 8;

const EAGAIN = 11;

export class ThreadIoEngine extends SlotEngine {
  private readonly handle: ThreadIoHandle;
  /** Reads answered from the page cache on the main thread. */
  nbInlineReads = 0;

  constructor(nbThreads: number) {
    super(THREAD_IO_SLOTS, 'threadio');
    this.handle = threadIoCreate(nbThreads, THREAD_IO_SLOTS, this.outSlots, this.outResults, (count) => this.onComplete(count));
  }

  protected submitNative(slot: number, request: SlotRequest): void {
    threadIoSubmit(this.handle, slot, request.write, request.fd, request.view, request.offset);
  }

  /**
   * pread on a buffered `fd`: what the page cache holds of the range's start is read here at once
   * (bytes read, possibly short), and otherwise the read is queued on the pool. Other errors than
   * EAGAIN from the inline attempt (EOPNOTSUPP on file systems without non-blocking reads) also send
   * it to the pool, which reports the read's real outcome.
   */
  read(fd: number, view: Uint8Array, offset: number): Promise<number> {
    const result = preadNowait(fd, view, offset);
    if (result >= 0) {
      this.nbInlineReads++;
      return Promise.resolve(result);
    }
    if (result !== -EAGAIN) debug('preadv2(RWF_NOWAIT) on fd %d: errno %d, using the pool', fd, -result);
    return this.submit(false, fd, view, offset);
  }
}

let engine: ThreadIoEngine | null | undefined;

/** The process's I/O thread pool, started on first use; null when it cannot start. */
export function threadIo(): ThreadIoEngine | null {
  if (engine === undefined) {
    try {
      engine = new ThreadIoEngine(THREAD_IO_THREADS);
    } catch (error) {
      debug('I/O thread pool unavailable, using libuv\'s threadpool: %o', error);
      engine = null;
    }
  }
  return engine;
}

/** Whether this process has the I/O thread pool, requests it ran and reads answered inline. */
export function threadIoStats(): { available: boolean; submitted: number; inlineReads: number } {
  const e = threadIo();
  return { available: e !== null, submitted: e?.nbSubmitted ?? 0, inlineReads: e?.nbInlineReads ?? 0 };
}
