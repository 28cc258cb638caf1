/**
 * Child processes for tests: `run` resolves with {stdout, stderr, code} whatever the exit status,
 * and rejects only when the command cannot be started (e.g. ENOENT).
 */
import { execFile } from 'node:child_process';
import { constants } from 'node:os';

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
