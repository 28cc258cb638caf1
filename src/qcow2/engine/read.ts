/**
 * The read path: map guest ranges under the metadata lock (several L2 slices per hold), then read
 * the mapped segments outside it, in parallel. Host ranges being read are marked in flight so no
 * cluster is freed and reused under the read (inflight.ts). Compressed clusters stored back to back
 * are read with one pread per run and decompressed straight into the caller's buffer, on every core.
 */
import { CODEC_CORES, decompressClusterInto, decompressClustersInto } from './compression.js';
import type { ClusterMap, ReadSegment } from './cluster-map.js';
import type { InflightRange } from './inflight.js';
import type { ImageState } from './state.js';

/** Longest host range read at once for a run of back-to-back compressed chunks. */
const COMPRESSED_RUN_BYTES = 512 * 1024;
/** Largest gap between two chunks still read together (read and thrown away). */
const COMPRESSED_RUN_GAP_BYTES = 4096;

type CompressedSegment = Extract<ReadSegment, { kind: 'compressed' }>;

/**
 * Read guest bytes through `map` (active or a snapshot's) into `buf`. With `withPending`, data the
 * compressed writer still holds for these clusters is laid over what the mapping gives.
 */
export async function readIntoMap(s: ImageState, map: ClusterMap, guestOffset: number, buf: Buffer, withPending: boolean): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const segments: ReadSegment[] = [];
    const ranges: InflightRange[] = [];
    let overlay: ((out: Buffer) => void) | undefined;
    const start = guestOffset + done;
    const covered = await s.lock.run(async () => {
      let n = 0;
      // Map up to 64 slices' worth per lock hold.
      for (let i = 0; i < 64 && done + n < buf.length; i++) n += await map.mapForRead(start + n, buf.length - done - n, segments);
      for (const seg of segments) if (seg.kind === 'data' && !s.hasDataFile) ranges.push(s.inflight.addHost(seg.hostOffset, seg.bytes));
      if (withPending && map === s.activeMap) overlay = s.compressedWriter?.overlayFor(start, n);
      return n;
    });
    try {
      await readSegments(s, segments, guestOffset, buf);
    } finally {
      for (const r of ranges) s.inflight.removeHost(r);
    }
    overlay?.(buf.subarray(done, done + covered));
    done += covered;
  }
}

function isWholeCompressed(s: ImageState, seg: ReadSegment): seg is CompressedSegment {
  return seg.kind === 'compressed' && seg.offsetInCluster === 0 && seg.bytes === s.geometry.clusterSize;
}

/**
 * Whole compressed clusters (in guest order) grouped into runs whose chunks lie back to back on the
 * host (as `qemu-img convert -c` and our compressed writer place them): gaps of at most
 * COMPRESSED_RUN_GAP_BYTES, at most COMPRESSED_RUN_BYTES from the first chunk's start.
 */
function compressedRuns(segments: CompressedSegment[]): CompressedSegment[][] {
  const runs: CompressedSegment[][] = [];
  let run: CompressedSegment[] = [];
  let runEnd = 0;
  for (const seg of segments) {
    const { hostOffset, compressedBytes } = seg.descriptor;
    if (run.length > 0 && (hostOffset < run[0].descriptor.hostOffset || hostOffset > runEnd + COMPRESSED_RUN_GAP_BYTES
      || hostOffset + compressedBytes - run[0].descriptor.hostOffset > COMPRESSED_RUN_BYTES)) {
      runs.push(run);
      run = [];
    }
    runEnd = run.length === 0 ? hostOffset + compressedBytes : Math.max(runEnd, hostOffset + compressedBytes);
    run.push(seg);
  }
  if (run.length > 0) runs.push(run);
  return runs;
}

/**
 * Read mapped segments into `buf` (which starts at `guestOffset`), all in parallel. Whole compressed
 * clusters neither cached nor being loaded are read in runs (compressedRuns: one pread per run) and
 * decompressed straight into `buf`; every other segment is read on its own (a cached or loading
 * compressed cluster through the cache).
 */
export async function readSegments(s: ImageState, segments: ReadSegment[], guestOffset: number, buf: Buffer): Promise<void> {
  const out = (seg: ReadSegment): Buffer => buf.subarray(seg.guestOffset - guestOffset, seg.guestOffset - guestOffset + seg.bytes);
  const jobs: Promise<void>[] = [];
  const direct: CompressedSegment[] = [];
  for (const seg of segments) {
    if (isWholeCompressed(s, seg) && !s.decompressed.has(seg.descriptor.hostOffset)) direct.push(seg);
    else jobs.push(readSegment(s, seg, out(seg)));
  }
  for (const run of compressedRuns(direct)) {
    jobs.push(run.length === 1 ? readSegment(s, run[0], out(run[0])) : readCompressedRun(s, run, guestOffset, buf));
  }
  await Promise.all(jobs);
}

/**
 * One pread for the host range of several compressed chunks, then the chunks decompressed straight
 * into `buf`, in up to CODEC_CORES codec jobs of consecutive chunks (a job per chunk cost more in
 * job overhead than small clusters take to decode). A compressed mount reads through its O_DIRECT
 * handle, as for single chunks: read-back while ingesting must not fill the host page cache.
 */
async function readCompressedRun(s: ImageState, run: CompressedSegment[], guestOffset: number, buf: Buffer): Promise<void> {
  const start = run[0].descriptor.hostOffset;
  const end = Math.min(Math.max(...run.map((seg) => seg.descriptor.hostOffset + seg.descriptor.compressedBytes)), s.file.sizeBytes);
  const src = Buffer.allocUnsafe(Math.max(0, end - start));
  const n = await (s.directFile ?? s.file).pread(src, start, 'compressed');
  const perJob = Math.ceil(run.length / Math.min(run.length, CODEC_CORES));
  const jobs: Promise<void>[] = [];
  for (let first = 0; first < run.length; first += perJob) {
    jobs.push(decompressBatch(s, run.slice(first, first + perJob), src.subarray(0, n), start, guestOffset, buf));
  }
  await Promise.all(jobs);
}

/** Decompress `batch` (chunks inside `src`, read from host offset `srcHostOffset`) into `buf` in one codec job. */
async function decompressBatch(s: ImageState, batch: CompressedSegment[], src: Buffer, srcHostOffset: number, guestOffset: number, buf: Buffer): Promise<void> {
  const spans = new Uint32Array(4 * batch.length);
  batch.forEach((seg, i) => {
    const { hostOffset, compressedBytes } = seg.descriptor;
    const srcStart = Math.min(src.length, hostOffset - srcHostOffset);
    spans.set([srcStart, Math.min(src.length, srcStart + compressedBytes) - srcStart, seg.guestOffset - guestOffset, seg.bytes], 4 * i);
  });
  let bad: number[];
  try {
    bad = await decompressClustersInto(s.compressionType, src, buf, spans);
  } catch (err) {
    // No codec context (ENOMEM): reported as a single decompression reports it.
    const { hostOffset, compressedBytes } = batch[0].descriptor;
    return badChunk(s, hostOffset, compressedBytes, err);
  }
  if (bad.length === 0) return;
  const { hostOffset, compressedBytes } = batch[bad[0]].descriptor;
  badChunk(s, hostOffset, compressedBytes, new Error(`${s.compressionType}: invalid compressed data (cannot produce ${batch[bad[0]].bytes} bytes)`));
}

/** A chunk that does not decompress: (non-fatal) corruption, thrown. */
function badChunk(s: ImageState, hostOffset: number, compressedBytes: number, err: unknown): never {
  const message = err instanceof Error ? err.message : String(err);
  s.signalCorruption(false, `cannot decompress cluster at ${hostOffset} (${compressedBytes} bytes): ${message}`, { structure: 'compressed', hostOffset });
}

async function readSegment(s: ImageState, seg: ReadSegment, out: Buffer): Promise<void> {
  switch (seg.kind) {
    case 'zero':
      out.fill(0);
      return;
    case 'backing':
      if (s.backing) await s.backing.readInto(seg.guestOffset, out);
      else out.fill(0);
      return;
    case 'data': {
      // A compressed mount reads through its O_DIRECT handle too: read-back must not fill the page cache.
      const n = await (s.directFile ?? s.dataFile).pread(out, seg.hostOffset, 'data');
      if (n < out.length) out.fill(0, n);
      return;
    }
    case 'compressed': {
      const { hostOffset, compressedBytes } = seg.descriptor;
      // A whole cluster decompresses straight into the caller's buffer (no cache entry, no copy:
      // bulk reads stream); a part goes through the cache, so reading a cluster piecewise
      // decompresses it once, and so does a cluster cached or being decompressed ahead.
      if (!s.decompressed.has(hostOffset) && isWholeCompressed(s, seg)) {
        await decompressInto(s, hostOffset, compressedBytes, out);
        return;
      }
      const cluster = await readCompressedCluster(s, hostOffset, compressedBytes);
      cluster.copy(out, 0, seg.offsetInCluster, seg.offsetInCluster + seg.bytes);
      return;
    }
  }
}

/** The decompressed contents of the compressed chunk at `hostOffset` (cached). */
export async function readCompressedCluster(s: ImageState, hostOffset: number, compressedBytes: number): Promise<Buffer> {
  return s.decompressed.get(hostOffset, async () => {
    const cluster = Buffer.allocUnsafe(s.geometry.clusterSize);
    await decompressInto(s, hostOffset, compressedBytes, cluster);
    return cluster;
  });
}

/** Read the compressed chunk at `hostOffset` and decompress it into `out` (one cluster). */
async function decompressInto(s: ImageState, hostOffset: number, compressedBytes: number, out: Buffer): Promise<void> {
  const readBytes = Math.min(compressedBytes, Math.max(0, s.file.sizeBytes - hostOffset));
  const src = Buffer.allocUnsafe(readBytes);
  const n = await (s.directFile ?? s.file).pread(src, hostOffset, 'compressed');
  await decompressChunk(s, src.subarray(0, n), hostOffset, compressedBytes, out);
}

/** Decompress the chunk read from `hostOffset` into `out`; a bad chunk is (non-fatal) corruption. */
async function decompressChunk(s: ImageState, src: Buffer, hostOffset: number, compressedBytes: number, out: Buffer): Promise<void> {
  try {
    await decompressClusterInto(s.compressionType, src, out);
  } catch (err) {
    badChunk(s, hostOffset, compressedBytes, err);
  }
}
