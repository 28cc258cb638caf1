/**
 * Files for tests: hashes, sparse and pattern files, and small real ext4 images built from files on
 * the machine (shared libraries and docs, like the anchors' data set) with `mke2fs -d`, no mount.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { copyFile, lstat, mkdir, open, readdir, readlink, rm, stat, symlink, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { run } from './exec.js';
import { fillPattern, type PatternKind } from './patterns.js';
import { findTool } from './tools.js';

/** Hex sha256 of a buffer. */
export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Hex sha256 of a file's contents (streamed; holes read as zeros). */
export async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** Create (or truncate to) a sparse file of `bytes` bytes with no data allocated. */
export async function createSparseFile(path: string, bytes: number): Promise<void> {
  await (await open(path, 'w')).close();
  await truncate(path, bytes);
}

/** Bytes the filesystem actually allocated for `path` (st_blocks × 512). */
export async function allocatedBytes(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}

/**
 * Write a file of `bytes` bytes whose contents are the pattern for (seed, offset 0, kind), so any
 * range can be checked later with checkPattern(buf, seed, offset, kind).
 */
export async function writePatternFile(path: string, bytes: number, seed: number, kind: PatternKind = 'random'): Promise<void> {
  const handle = await open(path, 'w');
  try {
    const buf = Buffer.allocUnsafe(Math.min(bytes, 4 << 20));
    for (let offset = 0; offset < bytes; offset += buf.length) {
      const chunk = buf.subarray(0, Math.min(buf.length, bytes - offset));
      fillPattern(chunk, seed, offset, kind);
      await handle.write(chunk, 0, chunk.length, offset);
    }
  } finally {
    await handle.close();
  }
}

/** Default sources for makeExt4Image: real binaries and text, as in the anchors' data set. */
export const EXT4_SOURCES: readonly string[] = ['/usr/share/doc', '/usr/lib/x86_64-linux-gnu'];

export interface Ext4ImageOptions {
  /** Size of the raw image in bytes (sparse; free space stays a hole). Default 64 MiB. */
  sizeBytes?: number;
  /** File data to copy in, at most; default 40% of sizeBytes (leaves room for metadata). */
  dataBytes?: number;
  /** Source trees copied (in sorted order, deterministic) until dataBytes is reached. */
  sources?: readonly string[];
  /** Scratch directory for the staging tree; default: next to the image. */
  stagingDir?: string;
}

export interface Ext4Image {
  path: string;
  sizeBytes: number;
  /** Regular-file bytes copied in. */
  dataBytes: number;
  files: number;
}

/**
 * A raw ext4 image of real files: copies a deterministic subset of `sources` (regular files and
 * symlinks, each file whole, until dataBytes) into a staging tree and runs
 * `mke2fs -q -t ext4 -F -d STAGING` with a fixed UUID and hash seed: the same machine gives the same
 * files and tree (timestamps differ, so the image bytes do too).
 */
export async function makeExt4Image(path: string, options: Ext4ImageOptions = {}): Promise<Ext4Image> {
  const sizeBytes = options.sizeBytes ?? 64 << 20;
  const budget = options.dataBytes ?? Math.floor(sizeBytes * 0.4);
  const staging = options.stagingDir ?? `${path}.d`;
  await rm(staging, { recursive: true, force: true });
  await mkdir(staging, { recursive: true });
  const copied = { dataBytes: 0, files: 0 };
  try {
    for (const [index, source] of (options.sources ?? EXT4_SOURCES).entries()) {
      await copyTree(source, join(staging, `src${index}`), budget, copied);
    }
    await createSparseFile(path, sizeBytes);
    const uuid = '5b1c0a2e-7d3f-4c5e-9a1b-2c3d4e5f6a7b';
    const args = ['-q', '-t', 'ext4', '-F', '-U', uuid, '-E', `root_owner=0:0,hash_seed=${uuid}`, '-d', staging, path];
    const result = await run(findTool('mke2fs') ?? 'mke2fs', args);
    if (result.code !== 0) throw new Error(`mke2fs ${args.join(' ')} failed (${result.code}): ${result.stderr.trim()}`);
  } finally {
    await rm(staging, { recursive: true, force: true });
  }
  return { path, sizeBytes, ...copied };
}

async function copyTree(src: string, dst: string, budget: number, copied: { dataBytes: number; files: number }): Promise<void> {
  let names: string[];
  try {
    names = (await readdir(src)).sort();
  } catch {
    return;
  }
  await mkdir(dst, { recursive: true });
  for (const name of names) {
    if (copied.dataBytes >= budget) return;
    const from = join(src, name);
    const to = join(dst, name);
    const info = await lstat(from).catch(() => undefined);
    if (info === undefined) continue;
    if (info.isDirectory()) {
      await copyTree(from, to, budget, copied);
    } else if (info.isSymbolicLink()) {
      await symlink(await readlink(from), to);
      copied.files++;
    } else if (info.isFile() && copied.dataBytes + info.size <= budget) {
      try {
        await copyFile(from, to);
      } catch {
        continue;
      }
      copied.dataBytes += info.size;
      copied.files++;
    }
  }
}

/** `e2fsck -fn IMAGE` (read-only full check): exit code 0 means clean. */
export async function e2fsckReadOnly(path: string): Promise<{ code: number; output: string }> {
  const result = await run(findTool('e2fsck') ?? 'e2fsck', ['-fn', path]);
  return { code: result.code, output: result.stdout + result.stderr };
}

/**
 * Bring every file of `dir` to a state that reading cannot change: sync it and read it whole once.
 * The host facts qemu-img and we report move otherwise — st_blocks ("actual-size") while delayed
 * allocation is written back, and SEEK_HOLE, which counts cached pages of unwritten extents as data
 * (pages each tool's own reads and the kernel's readahead bring in differently).
 */
export async function settleFiles(dir: string): Promise<void> {
  for (const name of await readdir(dir)) {
    const handle = await open(join(dir, name), 'r');
    try {
      if (!(await handle.stat()).isFile()) continue;
      await handle.sync();
      const buf = Buffer.allocUnsafe(1 << 20);
      for (let pos = 0; ; pos += buf.length) if ((await handle.read(buf, 0, buf.length, pos)).bytesRead < buf.length) break;
    } finally {
      await handle.close();
    }
  }
}
