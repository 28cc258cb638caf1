/**
 * convert -p: qemu-img's "(NN.NN/100%)" followed by the rate (MB/s) and the time left. On a terminal
 * one line is refreshed in place (\r); otherwise (a log, a pipe) a plain line is printed every
 * PLAIN_STEP_PERCENT percent. A stream of unknown size shows the bytes copied instead of percent.
 */

const PLAIN_STEP_PERCENT = 5;
/** Terminal refreshes at most this often (ms). */
const REFRESH_MS = 200;

export interface ProgressOptions {
  /** A terminal: refresh one line. */
  tty: boolean;
  write(text: string): void;
  /** Clock in ms (tests). */
  now?: () => number;
}

function duration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${sec}` : `${m}:${sec}`;
}

/** The text of one progress report (without the line ending). */
export function progressLine(doneBytes: number, totalBytes: number | undefined, elapsedSeconds: number): string {
  const rate = elapsedSeconds > 0 ? doneBytes / elapsedSeconds : 0;
  const mbps = `${(rate / 1e6).toFixed(1)} MB/s`;
  if (totalBytes === undefined) return `    ${(doneBytes / 2 ** 20).toFixed(1)} MiB copied, ${mbps}`;
  const fraction = totalBytes === 0 ? 1 : Math.min(1, doneBytes / totalBytes);
  const left = rate > 0 ? `, ${duration((totalBytes - doneBytes) / rate)} left` : '';
  return `    (${(fraction * 100).toFixed(2)}/100%) ${mbps}${left}`;
}

export class ProgressReporter {
  private readonly startMs: number;
  private lastMs = -Infinity;
  private lastStep = -1;
  private printedComplete = false;
  private readonly now: () => number;

  constructor(private readonly o: ProgressOptions) {
    this.now = o.now ?? (() => Date.now());
    this.startMs = this.now();
  }

  /** Report `doneBytes` of `totalBytes`; throttled (every step on a file, REFRESH_MS on a terminal). */
  update(doneBytes: number, totalBytes: number | undefined): void {
    const nowMs = this.now();
    const line = (): string => progressLine(doneBytes, totalBytes, (nowMs - this.startMs) / 1000);
    const complete = totalBytes !== undefined && doneBytes >= totalBytes;
    if (this.o.tty) {
      if (!complete && nowMs - this.lastMs < REFRESH_MS) return;
      this.lastMs = nowMs;
      this.o.write(`\r${line()}\x1b[K`);
      return;
    }
    const step = totalBytes === undefined || totalBytes === 0
      ? Math.floor(doneBytes / (256 * 2 ** 20))
      : Math.floor((Math.min(doneBytes, totalBytes) / totalBytes) * (100 / PLAIN_STEP_PERCENT));
    if (step === this.lastStep) return;
    this.lastStep = step;
    this.printedComplete = complete;
    this.o.write(`${line()}\n`);
  }

  /** The final report (100% or the stream's size) and the end of the line. */
  finish(doneBytes: number): void {
    if (this.o.tty) this.o.write(`\r${progressLine(doneBytes, doneBytes, (this.now() - this.startMs) / 1000)}\x1b[K\n`);
    else if (!this.printedComplete) this.o.write(`${progressLine(doneBytes, doneBytes, (this.now() - this.startMs) / 1000)}\n`);
  }
}
