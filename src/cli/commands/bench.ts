/**
 * `qcow2fuse bench` — qemu-img bench's workload on our driver, in-process:
 * `bench [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFFSET] [-w] [-t none|writeback|writethrough]
 *        [-i threads|native] [-n] [--pattern=BYTE] [--no-prealloc] IMAGE`.
 * Requests go sequentially from OFFSET in steps of STEP (default SIZE), DEPTH of them in flight, like
 * qemu-img bench; writes send a zero-filled buffer unless --pattern, allocated as qemu-img bench does
 * (aligned for O_DIRECT). A flush ends a write run. `-i` picks how O_DIRECT I/O is submitted (aio=).
 */
import type { AioMode } from '../../io/host-file.js';
import { type CacheMode } from '../../qcow2/engine/image.js';
import { parseArgs, parseSize } from '../args.js';
import { openImage } from '../../node.js';
import { FORCE_SHARE_FLAGS, forceShareOf, warnIfForceShared } from '../force-share.js';

export const summary = 'run a simple I/O benchmark on an image (qemu-img bench)';

export interface BenchResult {
  seconds: number;
  requests: number;
  bytes: number;
}

export interface BenchOptions {
  count: number;
  depth: number;
  requestBytes: number;
  stepBytes: number;
  offset: number;
  write: boolean;
  cache: CacheMode;
  aio?: AioMode;
  pattern?: number;
  preallocate: boolean;
  /** Read even while another process writes the image (-U). */
  forceShare?: boolean;
}

/** Run the workload on `path`; the clock covers the requests and the final flush, not the open. */
export async function runBench(path: string, o: BenchOptions): Promise<BenchResult> {
  // Zeros are written as qemu-img bench writes them (no detect-zeroes).
  const image = await openImage(path, { readOnly: !o.write, cache: o.cache, aio: o.aio, preallocate: o.preallocate, forceShare: o.forceShare,
    detectZeroes: false });
  try {
    // One buffer per request in flight, cut from one aligned allocation, as qemu-img bench does.
    const depth = Math.min(o.depth, o.count);
    const bufs = image.allocIoBuffer(depth * o.requestBytes).fill(o.pattern ?? 0);
    let next = 0;
    const start = process.hrtime.bigint();
    const worker = async (workerIndex: number): Promise<void> => {
      const buf = bufs.subarray(workerIndex * o.requestBytes, (workerIndex + 1) * o.requestBytes);
      while (next < o.count) {
        const i = next++;
        const offset = (o.offset + i * o.stepBytes) % Math.max(image.virtualSize - o.requestBytes + 1, 1);
        if (o.write) await image.write(offset, buf);
        else await image.read(offset, o.requestBytes);
      }
    };
    await Promise.all(Array.from({ length: depth }, (_, workerIndex) => worker(workerIndex)));
    if (o.write) await image.flush();
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    return { seconds, requests: o.count, bytes: o.count * o.requestBytes };
  } finally {
    await image.close();
  }
}

const USAGE = 'usage: qcow2fuse bench [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFFSET] [-w] [-t none|writeback|writethrough] ' +
  '[-i threads|native] [--pattern=BYTE] [--no-prealloc] [-U] IMAGE\n';

export async function run(argv: string[]): Promise<number> {
  if (argv.includes('--help')) {
    process.stdout.write(USAGE);
    return 0;
  }
  const { flags, positional } = parseArgs(argv, ['-c', '-d', '-s', '-S', '-o', '-t', '-i', '-f', '--pattern'], ['-w', '-n', '-q', '--no-prealloc', ...FORCE_SHARE_FLAGS]);
  const [path] = positional;
  if (path === undefined || positional.length !== 1) {
    process.stderr.write(USAGE);
    return 1;
  }
  const cache = flags.get('-t') ?? 'writeback';
  if (cache !== 'none' && cache !== 'writeback' && cache !== 'writethrough') {
    process.stderr.write(`qcow2fuse bench: invalid cache mode '${cache}'\n`);
    return 1;
  }
  const aio = flags.get('-i');
  if (aio !== undefined && aio !== 'threads' && aio !== 'native') {
    process.stderr.write(`qcow2fuse bench: invalid aio mode '${aio}' (threads or native)\n`);
    return 1;
  }
  const requestBytes = parseSize(flags.get('-s') ?? '4096');
  const options: BenchOptions = {
    count: Number(flags.get('-c') ?? 75000),
    depth: Number(flags.get('-d') ?? 64),
    requestBytes,
    stepBytes: flags.has('-S') ? parseSize(flags.get('-S')!) : requestBytes,
    offset: parseSize(flags.get('-o') ?? '0'),
    write: flags.has('-w'),
    cache,
    aio,
    pattern: flags.has('--pattern') ? Number(flags.get('--pattern')) : undefined,
    preallocate: !flags.has('--no-prealloc'),
    forceShare: forceShareOf(flags),
  };
  warnIfForceShared('bench', path, options.forceShare === true);
  if (!flags.has('-q')) {
    process.stdout.write(`Sending ${options.count} ${options.write ? 'write' : 'read'} requests, ${requestBytes} bytes each, ${options.depth} in parallel ` +
      `(starting at offset ${options.offset}, step size ${options.stepBytes})\n`);
  }
  const result = await runBench(path, options);
  process.stdout.write(`Run completed in ${result.seconds.toFixed(3)} seconds.\n`);
  return 0;
}
