/**
 * Child processes for tests: `run` resolves with {stdout, stderr, code} whatever the exit status,
 * and rejects only when the command cannot be started (e.g. ENOENT).
 */
import { execFile } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { constants } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';

export interface ExecResult {
  stdout: string;
  stderr: string;
  /** Exit status; 128 + signal number when killed by a signal (including the timeout's SIGTERM). */
  code: number;
}

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Kill the command after this many milliseconds (default 120 000). */
  timeoutMs?: number;
  /** Data written to the command's stdin. */
  input?: string | Uint8Array;
}

/** Run a command; resolves with its output and exit code, rejects only when it cannot be started. */
export function run(command: string, args: readonly string[], options: RunOptions = {}): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(command, args, {
      cwd: options.cwd,
      env: options.env ?? process.env,
      timeout: options.timeoutMs ?? 120_000,
      maxBuffer: 256 * 1024 * 1024,
      encoding: 'utf8',
    }, (error: Error | null, stdout, stderr) => {
      if (error === null) {
        resolve({ stdout, stderr, code: 0 });
        return;
      }
      const { code, signal } = error as NodeJS.ErrnoException & { signal?: NodeJS.Signals | null };
      if (typeof code === 'number') resolve({ stdout, stderr, code });
      else if (typeof signal === 'string') resolve({ stdout, stderr: `${stderr}[killed by ${signal}]`, code: 128 + constants.signals[signal] });
      else reject(error);
    });
    if (options.input !== undefined) child.stdin?.end(options.input);
  });
}

/**
 * True while any thread of process `pid` has not exited. The leader of a multi-threaded process
 * shows 'Z' as soon as it exits itself, while its other threads may still be tearing down; the
 * process's files (and the file locks on them) are closed by the last thread to exit.
 */
export function anyThreadAlive(pid: number): boolean {
  let threadIds: string[];
  try {
    threadIds = readdirSync(`/proc/${pid}/task`);
  } catch {
    return false;
  }
  return threadIds.some((tid) => {
    try {
      const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
      const state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
      return state !== 'Z' && state !== 'X';
    } catch {
      return false;
    }
  });
}

/** Resolves once every thread of process `pid` has exited (a zombie counts); rejects after timeoutMs. */
export async function waitForExit(pid: number, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (anyThreadAlive(pid)) {
    if (Date.now() > deadline) throw new Error(`process ${pid} still running after ${timeoutMs} ms`);
    await sleep(20);
  }
}
