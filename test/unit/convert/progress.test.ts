import { describe, expect, it } from 'vitest';
import { ProgressReporter, progressLine } from '../../../src/convert/progress.js';

describe('convert -p', () => {
  it('shows qemu-img\'s percent, the rate and the time left; bytes for a stream of unknown size', () => {
    expect(progressLine(50e6, 100e6, 1)).toBe('    (50.00/100%) 50.0 MB/s, 0:01 left');
    expect(progressLine(0, 100e6, 0)).toBe('    (0.00/100%) 0.0 MB/s');
    expect(progressLine(3 * 2 ** 20, undefined, 2)).toBe('    3.0 MiB copied, 1.6 MB/s');
    expect(progressLine(1e9, 1e10, 1)).toBe('    (10.00/100%) 1000.0 MB/s, 0:09 left');
    expect(progressLine(1e6, 1e10, 1)).toBe('    (0.01/100%) 1.0 MB/s, 2:46:39 left');
  });

  it('prints a plain line every 5% when not a terminal, and the last one once', () => {
    const out: string[] = [];
    let now = 0;
    const p = new ProgressReporter({ tty: false, write: (t) => out.push(t), now: () => now });
    for (let done = 0; done <= 100; done++) {
      now += 10;
      p.update(done, 100);
    }
    p.finish(100);
    expect(out).toHaveLength(21);
    expect(out.every((line) => line.endsWith('\n') && !line.includes('\r'))).toBe(true);
    expect(out[20]).toMatch(/^ {4}\(100\.00\/100%\)/);
  });

  it('refreshes one line on a terminal, at most every 200 ms', () => {
    const out: string[] = [];
    let now = 0;
    const p = new ProgressReporter({ tty: true, write: (t) => out.push(t), now: () => now });
    for (let done = 0; done < 100; done++) {
      now += 50;
      p.update(done, 100);
    }
    p.finish(100);
    expect(out.length).toBeGreaterThanOrEqual(20);
    expect(out.length).toBeLessThanOrEqual(27);
    expect(out.every((t) => t.startsWith('\r'))).toBe(true);
    expect(out[out.length - 1]).toMatch(/\(100\.00\/100%\).*\n$/);
  });
});
