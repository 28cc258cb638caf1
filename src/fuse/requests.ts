/**
 * Requests in flight, for an adapter in front of the handlers of ops.ts: each request is answered
 * exactly once (a second answer is dropped and traced), a handler that throws synchronously is caught
 * like one that rejects, the error becomes its errno (errno.ts; unknown errors answer EIO), failures
 * the daemon should log (EIO, ENOSPC, EDQUOT) are reported, and the adapter can wait until nothing is
 * in flight. `DEBUG=qcow2fuse:fuse` traces every request with its answer and latency.
 */
import createDebug from 'debug';
import { performance } from 'node:perf_hooks';
import { errnoName, errnoNumber } from './errno.js';

const trace = createDebug('qcow2fuse:fuse');

const REPORTED = new Set(['EIO', 'ENOSPC', 'EDQUOT']);

export interface TrackerOptions {
  /**
   * Called for every request answered with an error that the daemon should log: EIO (host I/O
   * failure, corruption, a bug) and ENOSPC/EDQUOT (host full). Refusals (ENOENT, EROFS, EPERM …) are
   * answers, not failures, and are only traced.
   */
  onError?: (op: string, path: string, err: unknown, errno: string) => void;
}

export interface RequestTracker {
  /**
   * Run one request: `work(path)` then `reply(result)`, or `replyError(errno)` (positive) when resolving
   * the path, the work or the reply throws. Exactly one of the two is called, once.
   */
  run<T>(op: string, key: number, path: () => string, detail: () => string, work: (path: string) => Promise<T>,
    reply: (result: T) => void, replyError: (errno: number) => void): void;
  inFlight(): number;
  drained(): Promise<void>;
}

export function createRequestTracker(options: TrackerOptions = {}): RequestTracker {
  let inFlight = 0;
  let idle: (() => void)[] = [];

  function settle(): void {
    if (--inFlight === 0) {
      const waiting = idle;
      idle = [];
      for (const wake of waiting) wake();
    }
  }

  function run<T>(op: string, key: number, pathOf: () => string, detail: () => string, work: (path: string) => Promise<T>,
    reply: (result: T) => void, replyError: (errno: number) => void): void {
    let answered = false;
    // The request's key until its path is known (formatted only when traced or reported).
    let path: string | undefined;
    const shown = () => path ?? `#${key}`;
    const start = trace.enabled ? performance.now() : 0;
    inFlight++;
    const finish = (answer: () => void, outcome: string) => {
      if (answered) {
        trace('BUG: second answer to %s %s dropped (%s)', op, shown(), outcome);
        return;
      }
      answered = true;
      if (trace.enabled) trace('%s %s%s → %s (%sms)', op, shown(), detail(), outcome, (performance.now() - start).toFixed(2));
      try {
        answer();
      } catch (err) {
        trace('%s %s: the kernel did not take the answer: %s', op, shown(), err instanceof Error ? err.message : String(err));
      } finally {
        settle();
      }
    };
    const fail = (err: unknown) => {
      const errno = errnoName(err);
      if (REPORTED.has(errno)) options.onError?.(op, shown(), err, errno);
      finish(() => replyError(errnoNumber(errno) as number), `${errno}${err instanceof Error ? `: ${err.message}` : ''}`);
    };
    let pending: Promise<T>;
    try {
      const resolved = pathOf();
      path = resolved;
      pending = work(resolved);
    } catch (err) {
      fail(err);
      return;
    }
    // A reply the native side refuses before taking the request (bad arguments: a bug) still answers EIO.
    const answerWith = (result: T) => () => {
      try {
        reply(result);
      } catch (err) {
        if ((err as { code?: unknown }).code !== 'EALREADY') replyError(errnoNumber('EIO') as number);
        throw err;
      }
    };
    pending.then((result) => finish(answerWith(result), 'ok'), fail);
  }

  return {
    run,
    inFlight: () => inFlight,
    drained: () => (inFlight === 0 ? Promise.resolve() : new Promise<void>((resolve) => idle.push(resolve))),
  };
}
