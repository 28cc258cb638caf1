/**
 * `convertFiles(source, dest, options)`: what `qcow2fuse convert` does, as a library call — open the
 * source (probing its format), refuse a destination that is the source, warn about a block device
 * mounted read-write elsewhere, create (or with -n open) the destination, copy, and clean up: when
 * the source fails (unreadable, vanished, a pipe that ends early) the partial destination is removed
 * unless it existed before (-n); when the destination fails (ENOSPC, EIO) it is left as it is — a
 * qcow2 image then still passes `qemu-img check` (it may leak, never corrupt), as qemu-img leaves it.
 */
import { rm, stat } from 'node:fs/promises';
import type { Stats } from 'node:fs';
import type { Readable, Writable } from 'node:stream';
import type { HostFileOpener } from '../io/host-file.js';
import type { CacheMode } from '../qcow2/engine/image.js';
import type { SnapshotRef } from '../qcow2/engine/snapshot.js';
import type { CreateOptions } from '../node.js';
import type { CompressedWriterOptions } from '../qcow2/engine/compressed-writer.js';
import { resolveBackingPath } from '../qcow2/engine/backing.js';
import { convertImage, type ConvertResult } from './engine.js';
import { ConvertError } from './errors.js';
import { readWriteMounts, sameHostObject } from './host-source.js';
import { openConvertSink, type ConvertCacheMode, type ConvertSink } from './sink.js';
import { openConvertSource, type ConvertSource, type ImageFormat } from './source.js';

export interface ConvertFilesOptions {
  /** -f (probed when absent). */
  sourceFormat?: ImageFormat;
  /** -O (default raw, as qemu-img). */
  outputFormat?: ImageFormat;
  /** -l */
  snapshot?: SnapshotRef;
  /** -o: qcow2 creation options. */
  createOptions?: CreateOptions;
  /** -c */
  compress?: boolean;
  /** -t (default unsafe) and -T. */
  cache?: ConvertCacheMode;
  sourceCache?: CacheMode;
  /** -S in bytes (default 4096; 0 = fully allocated output). */
  minSparseBytes?: number;
  /** -B and -F: the output's backing file (relative to DEST's directory) and its format. */
  backingFile?: string;
  backingFormat?: ImageFormat;
  /** -n: DEST exists; it is written over, never created. */
  noCreate?: boolean;
  /** -m */
  jobs?: number;
  /** A stream source's expected size: ending before it (or going past it) is an error. */
  expectedBytes?: number;
  /** -U: read the source (and -B's backing file) sharing every permission, as qemu-img's force-share. */
  forceShare?: boolean;
  onProgress?(doneBytes: number, totalBytes: number | undefined): void;
  /** Things the user should know (a source device mounted read-write). */
  onWarning?(message: string): void;
  openHostFile?: HostFileOpener;
  compressedWriter?: CompressedWriterOptions;
  stdin?: Readable;
  stdout?: Writable;
}

async function statOrUndefined(path: string): Promise<Stats | undefined> {
  return stat(path).catch(() => undefined);
}

/** Warn about a source block device mounted read-write. */
async function warnIfMounted(sourcePath: string, o: ConvertFilesOptions): Promise<void> {
  if (sourcePath === '-') return;
  const mounts = await readWriteMounts(sourcePath).catch(() => []);
  if (mounts.length > 0) o.onWarning?.(`${sourcePath} is mounted read-write at ${mounts.join(', ')}: the copy may be inconsistent`);
}

/** Refuse DEST when it is a file the source reads (the source itself, its data file, a backing file). */
async function refuseSourceAsDest(source: ConvertSource, destPath: string): Promise<void> {
  if (destPath === '-') return;
  const dest = await statOrUndefined(destPath);
  if (!dest) return;
  for (const path of source.hostPaths) {
    const s = await statOrUndefined(path);
    if (s && sameHostObject(s, dest)) {
      const what = path === source.path ? 'the source' : `a file the source reads (${path})`;
      throw new ConvertError('EINVAL', `${destPath}: the destination is ${what}; refusing to overwrite it`, { path: destPath });
    }
  }
}

/** Convert SOURCE into DEST (paths; '-' is stdin or stdout). */
export async function convertFiles(sourcePath: string, destPath: string, o: ConvertFilesOptions = {}): Promise<ConvertResult> {
  await warnIfMounted(sourcePath, o);
  const outputFormat = o.outputFormat ?? 'raw';
  if (o.compress && outputFormat !== 'qcow2') throw new ConvertError('EINVAL', 'Compression not supported for this file format', { path: destPath });
  if (o.backingFile !== undefined && outputFormat !== 'qcow2') throw new ConvertError('EINVAL', 'a backing file (-B) needs -O qcow2', { path: destPath });
  const source = await openConvertSource(sourcePath, {
    ...(o.sourceFormat ? { format: o.sourceFormat } : {}), ...(o.snapshot !== undefined ? { snapshot: o.snapshot } : {}),
    ...(o.sourceCache ? { cache: o.sourceCache } : {}), ...(o.openHostFile ? { openHostFile: o.openHostFile } : {}),
    ...(o.stdin ? { stdin: o.stdin } : {}), forceShare: o.forceShare ?? false,
  });
  let backing: ConvertSource | undefined;
  let sink: ConvertSink | undefined;
  const created = !o.noCreate && destPath !== '-';
  try {
    await refuseSourceAsDest(source, destPath);
    if (o.backingFile !== undefined) {
      backing = await openConvertSource(resolveBackingPath(destPath, o.backingFile), { ...(o.backingFormat ? { format: o.backingFormat } : {}), forceShare: o.forceShare ?? false });
    }
    const createOptions: CreateOptions = { ...o.createOptions, ...(o.backingFile !== undefined ? { backingFile: o.backingFile, backingFormat: backing!.format } : {}) };
    sink = await openConvertSink(destPath, {
      format: outputFormat, virtualSize: source.virtualSize ?? o.expectedBytes, create: !o.noCreate, createOptions, compress: o.compress ?? false,
      ...(o.cache ? { cache: o.cache } : {}), ...(o.minSparseBytes !== undefined ? { minSparseBytes: o.minSparseBytes } : {}),
      ...(o.openHostFile ? { openHostFile: o.openHostFile } : {}), ...(o.compressedWriter ? { compressedWriter: o.compressedWriter } : {}),
      ...(o.stdout ? { stdout: o.stdout } : {}),
    });
    return await convertImage(source, sink, {
      ...(o.minSparseBytes !== undefined ? { minSparseBytes: o.minSparseBytes } : {}), ...(backing ? { backing } : {}),
      ...(o.jobs !== undefined ? { jobs: o.jobs } : {}), ...(o.expectedBytes !== undefined ? { expectedBytes: o.expectedBytes } : {}),
      ...(o.onProgress ? { onProgress: (done: number, total: number | undefined) => o.onProgress!(done, total) } : {}),
    });
  } catch (err) {
    const side = (err as { details?: { side?: unknown } }).details?.side;
    // A destination we made that cannot be complete because the source failed is not left to look like a copy.
    if (created && sink !== undefined && side !== 'destination') await rm(destPath, { force: true }).catch(() => undefined);
    throw err;
  } finally {
    await source.close().catch(() => undefined);
    await backing?.close().catch(() => undefined);
  }
}
