/**
 * `qcow2fuse convert [-p] [-q] [-c] [-f qcow2] [-l SNAPSHOT] -O raw|qcow2 [-o OPTIONS] SRC DST` —
 * qemu-img convert: copy the guest contents of SRC (its active layer, or an internal snapshot with
 * -l) into DST.
 *
 * -O raw: DST is created (truncated) with the virtual size and only non-zero data is written, so it
 *   is as sparse as qemu-img's: ranges the mapping says read as zeros are never read, and all-zero
 *   4 KiB blocks of data are skipped (qemu-img's default -S 4k). DST '-' streams every byte to stdout.
 * -O qcow2: DST is formatted (`-o` takes `create`'s options) and written through the driver; with -c
 *   every cluster goes through the compressed writer.
 * Reads run ahead of writes (several windows in flight, compressed clusters decompressed in
 * parallel on the threadpool). -p shows qemu-img's progress line on stderr.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { nodeHostAllocationProbe, type HostAllocationProbe } from '../../io/host-allocation.js';
import { createImage, type CreateOptions } from '../../qcow2/tools/create.js';
import { Qcow2Image } from '../../qcow2/engine/image.js';
import { mapEntries } from '../../qcow2/tools/map.js';
import { openSnapshotView, type SnapshotRef } from '../../qcow2/engine/snapshot.js';
import type { ClusterMap } from '../../qcow2/engine/cluster-map.js';
import { parseArgs } from '../args.js';
import { FORCE_SHARE_FLAGS, FORCE_SHARE_USAGE, forceShareOf, warnIfForceShared } from '../force-share.js';
import { parseCreateArgs } from './create.js';
import { commandError, progressText, trace, writeOut } from '../output.js';

export const summary = 'copy an image (or one of its snapshots) to raw or qcow2 (qemu-img convert)';

const USAGE = `usage: qcow2fuse convert [-p] [-q] [-c] [-U] [-f qcow2] [-t CACHE] [-l SNAPSHOT] -O raw|qcow2 [-o OPTIONS] SOURCE DEST
  -O raw|qcow2   output format (DEST '-' writes raw to stdout)
  -t CACHE       raw output: unsafe (default, as qemu-img: no sync) or writeback (synced before exit)
  -c             compress the clusters of a qcow2 output
  -l SNAPSHOT    read the internal snapshot SNAPSHOT (id or name; or snapshot.id=ID / snapshot.name=NAME)
  -o OPTIONS     qcow2 output options, as for 'create' (cluster_size, compat, compression_type, …)
  -p             show progress (on stderr)
${FORCE_SHARE_USAGE} (the source)
`;

/**
 * Guest bytes per read request; windows start at multiples of this (a multiple of every cluster
 * size). A window of compressed clusters is decompressed in parallel.
 */
const WINDOW_BYTES = 8 * 1024 * 1024;
/** Read requests in flight ahead of the writer. */
const READ_AHEAD = 4;
/** Windows being written at once (file outputs). */
const WRITE_AHEAD = 4;
/** Granularity of the zero detection in data (qemu-img convert's default min_sparse). */
const SPARSE_BYTES = 4096;

export interface ConvertArgs {
  source: string;
  dest: string;
  outputFormat: 'raw' | 'qcow2';
  compress: boolean;
  progress: boolean;
  snapshot?: SnapshotRef;
  createOptions: CreateOptions;
  /** Make a raw DEST durable before exiting (-t writeback); qemu-img's default is unsafe (no sync). */
  sync: boolean;
  /** Read SOURCE even while another process writes it (-U). */
  forceShare: boolean;
}

/** Parse qemu-img convert's arguments; throws with a message (and code 'USAGE' for --help). */
export function parseConvertArgs(argv: string[]): ConvertArgs {
  const { flags, positional } = parseArgs(argv, ['-O', '-f', '-l', '-o', '-t'], ['-p', '-q', '-c', ...FORCE_SHARE_FLAGS, '-h', '--help']);
  if (flags.has('-h') || flags.has('--help')) throw Object.assign(new Error(USAGE), { code: 'USAGE' });
  const format = flags.get('-f') ?? 'qcow2';
  if (format !== 'qcow2') throw new Error(`only qcow2 sources are supported (got -f ${format})`);
  const outputFormat = flags.get('-O') ?? 'raw';
  if (outputFormat !== 'raw' && outputFormat !== 'qcow2') throw new Error(`output format must be raw or qcow2, got '${outputFormat}'`);
  if (positional.length !== 2) throw new Error('expected SOURCE and DEST');
  const [source, dest] = positional as [string, string];
  const compress = flags.has('-c');
  if (compress && outputFormat === 'raw') throw new Error('Compression not supported for this file format');
  if (dest === '-' && outputFormat !== 'raw') throw new Error("DEST '-' (stdout) needs -O raw");
  let createOptions: CreateOptions = {};
  if (flags.has('-o')) {
    if (outputFormat !== 'qcow2') throw new Error('-o options are only for -O qcow2');
    createOptions = parseCreateArgs(['-o', flags.get('-o')!, dest]).options;
  }
  let snapshot: SnapshotRef | undefined;
  const l = flags.get('-l');
  if (l !== undefined) {
    if (l.startsWith('snapshot.id=')) snapshot = { id: l.slice('snapshot.id='.length) };
    else if (l.startsWith('snapshot.name=')) snapshot = { name: l.slice('snapshot.name='.length) };
    else snapshot = l;
  }
  const cache = flags.get('-t') ?? 'unsafe';
  if (cache !== 'unsafe' && cache !== 'writeback') throw new Error(`cache mode must be unsafe or writeback, got '${cache}'`);
  const progress = flags.has('-p') && !flags.has('-q');
  return { source, dest, outputFormat, compress, progress, createOptions, sync: cache === 'writeback', forceShare: forceShareOf(flags), ...(snapshot !== undefined ? { snapshot } : {}) };
}

/** Where guest bytes come from: the active layer or a snapshot view. */
interface Source {
  image: Qcow2Image;
  virtualSize: number;
  topMap?: ClusterMap;
  readInto(guestOffset: number, buf: Buffer): Promise<void>;
}

/** One window of guest bytes: `data` is undefined when the mapping says it reads as zeros. */
interface Chunk {
  guestOffset: number;
  bytes: number;
  data?: Buffer;
}

interface Sink {
  /** Chunks must be written one after another, in guest order (a stream). */
  ordered: boolean;
  write(chunk: Chunk): Promise<void>;
  close(): Promise<void>;
}

/**
 * Windows of the source in guest order, each wholly zero or to be read. Zero is what qemu-img's
 * block status says: by mapping, and host holes under preallocated clusters (so, like qemu-img, we
 * never read those: reading unwritten extents would even turn them into "data" for SEEK_DATA).
 */
async function* plan(source: Source, probe: HostAllocationProbe): AsyncGenerator<{ guestOffset: number; bytes: number; zero: boolean }> {
  let pending: { guestOffset: number; bytes: number; zero: boolean } | undefined;
  for await (const entry of mapEntries(source.image, { probe, ...(source.topMap ? { topMap: source.topMap } : {}) })) {
    let pos = entry.start;
    const end = entry.start + entry.length;
    while (pos < end) {
      const windowEnd = Math.min(end, pos - (pos % WINDOW_BYTES) + WINDOW_BYTES);
      const zero = entry.zero;
      // Neighbouring extents of the same kind share a window (compressed runs, small data extents).
      if (pending && pending.zero === zero && pending.guestOffset + pending.bytes === pos && Math.floor(pending.guestOffset / WINDOW_BYTES) === Math.floor(pos / WINDOW_BYTES)) {
        pending.bytes += windowEnd - pos;
      } else {
        if (pending) yield pending;
        pending = { guestOffset: pos, bytes: windowEnd - pos, zero };
      }
      pos = windowEnd;
    }
  }
  if (pending && pending.bytes > 0) yield pending;
}

/** The non-zero runs of `data` at SPARSE_BYTES granularity (relative offsets), for sparse writes. */
function nonZeroRuns(data: Buffer, granularity: number): [number, number][] {
  const zero = zeroBlock(granularity);
  const runs: [number, number][] = [];
  let runStart = -1;
  for (let pos = 0; pos < data.length; pos += granularity) {
    const end = Math.min(data.length, pos + granularity);
    const isZero = zero.compare(data, pos, end, 0, end - pos) === 0;
    if (!isZero && runStart < 0) runStart = pos;
    if (isZero && runStart >= 0) {
      runs.push([runStart, pos]);
      runStart = -1;
    }
  }
  if (runStart >= 0) runs.push([runStart, data.length]);
  return runs;
}

const zeroBlocks = new Map<number, Buffer>();

function zeroBlock(bytes: number): Buffer {
  let b = zeroBlocks.get(bytes);
  if (!b) {
    b = Buffer.alloc(bytes);
    zeroBlocks.set(bytes, b);
  }
  return b;
}

/** A raw file: created with the full size, only non-zero data written; synced at the end when `sync`. */
async function rawFileSink(path: string, virtualSize: number, sync: boolean): Promise<Sink> {
  const handle: FileHandle = await open(path, 'w');
  try {
    if ((await handle.stat()).isFile()) await handle.truncate(virtualSize);
  } catch (err) {
    await handle.close();
    throw err;
  }
  return {
    ordered: false,
    async write(chunk) {
      if (!chunk.data) return;
      for (const [start, end] of nonZeroRuns(chunk.data, SPARSE_BYTES)) {
        let done = start;
        while (done < end) {
          const { bytesWritten } = await handle.write(chunk.data, done, end - done, chunk.guestOffset + done);
          done += bytesWritten;
        }
      }
    },
    async close() {
      try {
        if (sync) await handle.datasync();
      } finally {
        await handle.close();
      }
    },
  };
}

/** stdout: every byte, in order. */
function stdoutSink(): Sink {
  return {
    ordered: true,
    async write(chunk) {
      if (chunk.data) {
        await writeOut(chunk.data);
        return;
      }
      const zero = zeroBlock(WINDOW_BYTES);
      for (let done = 0; done < chunk.bytes; done += zero.length) await writeOut(zero.subarray(0, Math.min(zero.length, chunk.bytes - done)));
    },
    async close() {},
  };
}

/** A new qcow2 image: all-zero clusters stay unallocated, the rest is written (compressed with -c). */
async function qcow2Sink(path: string, virtualSize: number, options: CreateOptions, compress: boolean): Promise<Sink> {
  await createImage(path, { ...options, virtualSize });
  const image = await Qcow2Image.open(path, { readOnly: false, compress });
  const clusterBytes = image.geometry.clusterSize;
  return {
    ordered: false,
    async write(chunk) {
      if (!chunk.data) return;
      // Runs start where the source's extents do, not always on a cluster of ours: the driver completes partial clusters.
      await Promise.all(nonZeroRuns(chunk.data, clusterBytes).map(([start, end]) => image.write(chunk.guestOffset + start, chunk.data!.subarray(start, end))));
    },
    async close() {
      await image.close();
    },
  };
}

/**
 * Copy every window of `source` into `sink`: reads run READ_AHEAD windows ahead; an unordered sink
 * (a file) also gets up to WRITE_AHEAD windows written at once, so a stalled write does not stall reads.
 */
async function copy(source: Source, sink: Sink, probe: HostAllocationProbe, onProgress: (doneBytes: number) => void): Promise<void> {
  const freeWindows: Buffer[] = [];
  const reading: { chunk: Promise<Chunk>; window?: Buffer }[] = [];
  const writing = new Set<Promise<void>>();
  let failure: { error: unknown } | undefined;
  let doneBytes = 0;
  const written = (c: Chunk, window: Buffer | undefined): void => {
    if (window) freeWindows.push(window);
    doneBytes += c.bytes;
    onProgress(doneBytes);
  };
  const drainOne = async (): Promise<void> => {
    const { chunk, window } = reading.shift()!;
    const c = await chunk;
    if (sink.ordered) {
      await sink.write(c);
      written(c, window);
      return;
    }
    const w = sink.write(c).then(() => written(c, window), (error: unknown) => { failure ??= { error }; });
    writing.add(w);
    void w.finally(() => writing.delete(w));
    while (writing.size >= WRITE_AHEAD) await Promise.race(writing);
    if (failure) throw failure.error;
  };
  try {
    for await (const w of plan(source, probe)) {
      if (w.zero) {
        reading.push({ chunk: Promise.resolve({ guestOffset: w.guestOffset, bytes: w.bytes }) });
      } else {
        const window = freeWindows.pop() ?? Buffer.allocUnsafe(WINDOW_BYTES);
        const data = window.subarray(0, w.bytes);
        const chunk = source.readInto(w.guestOffset, data).then(() => ({ guestOffset: w.guestOffset, bytes: w.bytes, data }));
        chunk.catch(() => undefined); // observed when drained; a failure must not be an unhandled rejection meanwhile
        reading.push({ chunk, window });
      }
      if (reading.length >= READ_AHEAD) await drainOne();
    }
    while (reading.length > 0) await drainOne();
    await Promise.all(writing);
    if (failure) throw failure.error;
  } finally {
    // Settle I/O still in flight after a failure before the image and the output are closed under it.
    await Promise.allSettled([...reading.map((r) => r.chunk), ...writing]);
  }
}

export async function run(argv: string[]): Promise<number> {
  let args: ConvertArgs;
  try {
    args = parseConvertArgs(argv);
  } catch (err) {
    if ((err as { code?: unknown }).code === 'USAGE') {
      process.stdout.write(USAGE);
      return 0;
    }
    process.stderr.write(`qcow2fuse convert: ${commandError(err)}\n${USAGE}`);
    return 1;
  }
  try {
    warnIfForceShared('convert', args.source, args.forceShare);
    const image = await Qcow2Image.open(args.source, { readOnly: true, forceShare: args.forceShare });
    try {
      let source: Source;
      if (args.snapshot !== undefined) {
        // As qemu-img convert -l: the snapshot's tables, the image's current size.
        const view = await openSnapshotView(image, args.snapshot, { virtualSizeBytes: image.virtualSize });
        source = { image, virtualSize: view.virtualSize, topMap: view.map, readInto: (o, b) => view.readInto(o, b) };
      } else {
        source = { image, virtualSize: image.virtualSize, readInto: (o, b) => image.readInto(o, b) };
      }
      trace('convert %s → %s (%s%s), %d bytes', args.source, args.dest, args.outputFormat, args.compress ? ', compressed' : '', source.virtualSize);
      const sink = args.dest === '-' ? stdoutSink()
        : args.outputFormat === 'raw' ? await rawFileSink(args.dest, source.virtualSize, args.sync)
          : await qcow2Sink(args.dest, source.virtualSize, args.createOptions, args.compress);
      let shownPercent = -1;
      const showProgress = (doneBytes: number): void => {
        if (!args.progress) return;
        const percent = source.virtualSize === 0 ? 100 : Math.floor((doneBytes / source.virtualSize) * 100);
        if (percent === shownPercent) return;
        shownPercent = percent;
        process.stderr.write(progressText(source.virtualSize === 0 ? 1 : doneBytes / source.virtualSize));
      };
      showProgress(0);
      const probe = nodeHostAllocationProbe();
      try {
        await copy(source, sink, probe, showProgress);
      } finally {
        probe.close();
        await sink.close();
      }
      showProgress(source.virtualSize);
      if (args.progress) process.stderr.write('\n');
    } finally {
      await image.close();
    }
    return 0;
  } catch (err) {
    process.stderr.write(`qcow2fuse convert: ${commandError(err)}\n`);
    return 1;
  }
}
