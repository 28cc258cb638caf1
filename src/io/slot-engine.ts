/**
 * The JavaScript half shared by the native I/O engines (aio.ts: Linux AIO; thread-io.ts: our own
 * thread pool): a fixed set of request slots, a FIFO for requests beyond them, and completions that
 * arrive from the addon in batches — slot numbers and results (bytes or -errno) in two typed arrays,
 * announced by one call per batch — and settle each request's promise.
 */
import { constants as osConstants } from 'node:os';

const ERRNO_NAMES = new Map<number, string>(Object.entries(osConstants.errno).map(([name, value]) => [value, name]));

/** An Error shaped like Node's fs errors (code = errno name, errno negated, syscall). */
export function errnoError(errno: number, syscall: string): Error {
  const code = ERRNO_NAMES.get(errno) ?? 'EIO';
  return Object.assign(new Error(`${code}: ${syscall} failed (errno ${errno})`), { code, errno: -errno, syscall });
}

/** One pread (write false) or pwrite waiting for, or occupying, a slot. */
export interface SlotRequest {
  write: boolean;
  fd: number;
  view: Uint8Array;
  offset: number;
  resolve: (bytes: number) => void;
  reject: (error: Error) => void;
}

export abstract class SlotEngine {
  protected readonly outSlots: Int32Array;
  protected readonly outResults: Float64Array;
  /** The request occupying each slot (it also keeps the request's memory alive). */
  private readonly bySlot: (SlotRequest | undefined)[];
  private readonly freeSlots: number[];
  private readonly waiting: SlotRequest[] = [];
  /** Requests handed to the addon since the engine started. */
  nbSubmitted = 0;

  protected constructor(readonly nbSlots: number, private readonly syscallName: string) {
    this.outSlots = new Int32Array(nbSlots);
    this.outResults = new Float64Array(nbSlots);
    this.bySlot = new Array<SlotRequest | undefined>(nbSlots).fill(undefined);
    this.freeSlots = Array.from({ length: nbSlots }, (_, i) => nbSlots - 1 - i);
  }

  /** Hand `request` to the addon in `slot` (throws when the addon refuses it outright). */
  protected abstract submitNative(slot: number, request: SlotRequest): void;

  /**
   * pread (write=false) or pwrite of all of `view` at `offset` on `fd`; resolves to the bytes
   * transferred by one call (short at end of file, or where the kernel stopped early).
   */
  submit(write: boolean, fd: number, view: Uint8Array, offset: number): Promise<number> {
    return new Promise((resolve, reject) => {
      const request: SlotRequest = { write, fd, view, offset, resolve, reject };
      const slot = this.freeSlots.pop();
      if (slot === undefined) this.waiting.push(request);
      else this.start(slot, request);
    });
  }

  private start(slot: number, request: SlotRequest): void {
    this.bySlot[slot] = request;
    this.nbSubmitted++;
    try {
      this.submitNative(slot, request);
    } catch (error) {
      this.bySlot[slot] = undefined;
      this.freeSlots.push(slot);
      request.reject(error instanceof Error ? error : new Error(String(error)));
    }
  }

  /** The addon's batch: `count` completions in outSlots/outResults. */
  protected onComplete(count: number): void {
    for (let i = 0; i < count; i++) {
      const slot = this.outSlots[i];
      const result = this.outResults[i];
      const request = this.bySlot[slot];
      this.bySlot[slot] = undefined;
      const next = this.waiting.shift();
      if (next) this.start(slot, next);
      else this.freeSlots.push(slot);
      if (request === undefined) continue;
      if (result >= 0) request.resolve(result);
      else request.reject(errnoError(-result, `${this.syscallName}(${request.write ? 'pwrite' : 'pread'})`));
    }
  }
}
