/**
 * Durability: write back every cache in order and sync. Ordering (DESIGN §4): deferred frees are
 * released first (refcounts exact), then the L2 cache and the refcount cache write back — each one
 * honouring the dependencies set on it (cluster-map.ts rules 1–3) — then fdatasync, and only then
 * are the holes of freed clusters punched.
 */
import type { ImageState } from './state.js';

/** Write back every cache in order (refcounts before L2) and fdatasync: everything written is durable. */
export async function flush(s: ImageState): Promise<void> {
  if (s.readOnly || s.closed) return;
  await s.compressedWriter?.flush();
  await s.lock.run(() => flushLocked(s));
}

/** flush() with the metadata lock held and the compressed writer already flushed. */
export async function flushLocked(s: ImageState): Promise<void> {
  await s.activeMap.releaseDeferredFrees();
  await s.l2Cache.flush();
  await s.refcountCache.flush();
  await s.file.fdatasync();
  await s.processPunches();
  if (s.hasDataFile) await s.dataFile.fdatasync();
}
