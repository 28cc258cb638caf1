/**
 * Compressed-cluster codecs (QEMU-compatible: zlib raw deflate with a 12-bit window, or zstd frames),
 * run on the libuv threadpool by the native addon, and the LRU of decompressed clusters: reading a
 * compressed cluster 4 KiB at a time decompresses it once; concurrent readers share one decompression.
 */
import { availableParallelism } from 'node:os';
import { LRUCache } from 'lru-cache';
import { compress, decompress, decompressBatch, type CompressionType } from '../../io/native.js';
import { COMPRESSION_ZSTD } from '../format/constants.js';

export type { CompressionType };

export function compressionTypeName(headerValue: number): CompressionType {
  return headerValue === COMPRESSION_ZSTD ? 'zstd' : 'zlib';
}

/**
 * Codec jobs on the threadpool at once: two per core (one more queued per core keeps it busy while
 * the main thread is late to hand out the next), leaving at least two of libuv's threads to file I/O.
 * Submitting every cluster of a large write or read at once queued hundreds of codec jobs in front
 * of the file reads and writes that feed them (the threadpool is FIFO), so the pipeline stalled.
 */
/** Cores the codec jobs spread over: a batch of clusters is cut into this many jobs at most. */
export const CODEC_CORES = Math.max(1, availableParallelism());

const MAX_CODEC_JOBS = Math.max(1, Math.min(2 * CODEC_CORES, Number(process.env.UV_THREADPOOL_SIZE ?? 4) - 2));
let codecJobs = 0;
const codecWaiters: (() => void)[] = [];

/** Run `job` once fewer than MAX_CODEC_JOBS codec jobs are on the threadpool. */
async function codecSlot<T>(job: () => Promise<T>): Promise<T> {
  while (codecJobs >= MAX_CODEC_JOBS) await new Promise<void>((resolve) => codecWaiters.push(resolve));
  codecJobs++;
  try {
    return await job();
  } finally {
    codecJobs--;
    codecWaiters.shift()?.();
  }
}

/** Compress one cluster; null when the result would not be smaller than `maxOutBytes`. */
export function compressCluster(type: CompressionType, cluster: Uint8Array, maxOutBytes: number): Promise<Buffer | null> {
  return codecSlot(() => compress(type, cluster, maxOutBytes));
}

/** Decompress `src` into `out` (exactly one cluster); rejects (code EBADCOMPRESSED) on bad data. */
export function decompressClusterInto(type: CompressionType, src: Uint8Array, out: Uint8Array): Promise<void> {
  return codecSlot(() => decompress(type, src, out));
}

/**
 * Decompress several chunks of `src` into `dst` in one codec job (spans: [srcOffset, srcBytes,
 * dstOffset, dstBytes] per chunk). Resolves the indices of the chunks that are bad data (empty when
 * all decoded); the other chunks' bytes are in place either way.
 */
export async function decompressClustersInto(type: CompressionType, src: Uint8Array, dst: Uint8Array, spans: Uint32Array): Promise<number[]> {
  const statuses = await codecSlot(() => decompressBatch(type, src, dst, spans));
  const bad: number[] = [];
  if (statuses) statuses.forEach((status, i) => { if (status !== 0) bad.push(i); });
  return bad;
}

/**
 * LRU of decompressed clusters keyed by the compressed chunk's host offset, with the loads in
 * flight (a reader of a chunk being loaded joins that load). Every
 * invalidation bumps a generation: a load that started before it never enters the LRU, so a chunk
 * freed and its host offset reused while it was read is never served stale.
 */
export class DecompressedCache {
  private readonly lru: LRUCache<number, Buffer>;
  private readonly pending = new Map<number, Promise<Buffer>>();
  private generation = 0;

  constructor(maxBytes: number) {
    this.lru = new LRUCache<number, Buffer>({ maxSize: Math.max(maxBytes, 1), sizeCalculation: (b) => b.length });
  }

  /** Whether chunk `hostOffset` is cached or being loaded. */
  has(hostOffset: number): boolean {
    return this.lru.has(hostOffset) || this.pending.has(hostOffset);
  }

  /** The decompressed cluster for chunk `hostOffset`, loading it with `load` once. */
  async get(hostOffset: number, load: () => Promise<Buffer>): Promise<Buffer> {
    const hit = this.lru.get(hostOffset);
    if (hit) return hit;
    const p = this.pending.get(hostOffset);
    if (p) return p;
    return this.track(hostOffset, load(), this.generation);
  }

  private track(hostOffset: number, load: Promise<Buffer>, generation: number): Promise<Buffer> {
    this.pending.set(hostOffset, load);
    const settled = (): boolean => {
      if (this.pending.get(hostOffset) !== load) return false;
      this.pending.delete(hostOffset);
      return true;
    };
    load.then((cluster) => {
      if (settled() && generation === this.generation) this.lru.set(hostOffset, cluster);
    }, settled);
    return load;
  }

  /** Forget chunks that start in [hostOffset, +bytes) (their clusters were freed or rewritten). */
  invalidate(hostOffset: number, bytes: number): void {
    this.generation++;
    for (const key of this.lru.keys()) if (key >= hostOffset && key < hostOffset + bytes) this.lru.delete(key);
    for (const key of [...this.pending.keys()]) if (key >= hostOffset && key < hostOffset + bytes) this.pending.delete(key);
  }

  clear(): void {
    this.generation++;
    this.lru.clear();
    this.pending.clear();
  }
}
