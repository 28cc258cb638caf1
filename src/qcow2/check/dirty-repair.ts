/**
 * The repair of an image opened writable with the dirty bit set (lazy refcounts after a crash), as
 * QEMU's qcow2_do_open does it: a check with every repair, which also clears the dirty bit — but
 * staged (StagingFile) and written only when it succeeded. src/qcow2/engine does not import it: the
 * Node wiring (src/node.ts) passes it to Qcow2Image.open as `repairDirtyImage`.
 */
import type { HostFile } from '../../io/host-file.js';
import { allocAligned, DEFAULT_ALIGNMENT_BYTES } from '../../io/aligned-buffer.js';
import { imageState, Qcow2Image } from '../engine/image.js';
import type { Qcow2OpenOptions } from '../engine/options.js';
import type { ImageState } from '../engine/state.js';
import { CodedError } from '../format/errors.js';
import { decodeHeader } from '../format/header.js';
import { readSnapshotTable } from '../format/snapshot-table.js';
import { checkPassLocked } from './check.js';

/**
 * A HostFile that stages every write in memory over a real one (reads see the staged data), for a
 * repair that must either complete or leave the file untouched. `commit()` writes the staged pages
 * to the real file: everything but the header cluster first, synced, then the header, synced — so a
 * crash during the commit leaves the old header (still dirty) in charge, and the next open repairs
 * again. Page granularity keeps O_DIRECT handles happy. A punched hole is staged as zeros; fallocate
 * reports "unsupported", so callers fall back to plain writes.
 */
export class StagingFile implements HostFile {
  readonly readOnly = false;
  readonly direct = false;
  private readonly inner: HostFile;
  private readonly pageBytes: number;
  private readonly headerBytes: number;
  /** Staged page contents by page index. */
  private readonly pages = new Map<number, Buffer>();
  private innerBytes: number;
  private sizeBytes: number;

  constructor(inner: HostFile, sizeBytes: number, headerBytes: number) {
    this.inner = inner;
    this.pageBytes = Math.max(4096, inner.dioAlignment);
    this.headerBytes = headerBytes;
    this.innerBytes = sizeBytes;
    this.sizeBytes = sizeBytes;
  }

  get path(): string { return this.inner.path; }
  get dioAlignment(): number { return this.inner.dioAlignment; }

  /** The page as the file holds it now (staged, else read from the real file; zeros past its end). */
  private async load(index: number): Promise<Buffer> {
    const staged = this.pages.get(index);
    if (staged) return staged;
    const page = allocAligned(this.pageBytes, Math.max(DEFAULT_ALIGNMENT_BYTES, this.inner.dioAlignment));
    page.fill(0);
    const offset = index * this.pageBytes;
    if (offset < this.innerBytes && offset < this.sizeBytes) {
      const n = await this.inner.pread(page, offset);
      page.fill(0, Math.max(0, Math.min(n, this.sizeBytes - offset)));
    }
    return page;
  }

  async pread(buf: Uint8Array, hostOffset: number): Promise<number> {
    const end = Math.min(hostOffset + buf.length, this.sizeBytes);
    for (let pos = hostOffset; pos < end;) {
      const index = Math.floor(pos / this.pageBytes);
      const within = pos - index * this.pageBytes;
      const n = Math.min(end - pos, this.pageBytes - within);
      (await this.load(index)).copy(buf, pos - hostOffset, within, within + n);
      pos += n;
    }
    return Math.max(0, end - hostOffset);
  }

  async pwrite(buf: Uint8Array, hostOffset: number): Promise<void> {
    const data = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
    for (let pos = hostOffset; pos < hostOffset + data.length;) {
      const index = Math.floor(pos / this.pageBytes);
      const within = pos - index * this.pageBytes;
      const n = Math.min(hostOffset + data.length - pos, this.pageBytes - within);
      const page = await this.load(index);
      data.copy(page, within, pos - hostOffset, pos - hostOffset + n);
      this.pages.set(index, page);
      pos += n;
    }
    this.sizeBytes = Math.max(this.sizeBytes, hostOffset + data.length);
  }

  async fdatasync(): Promise<void> {}
  async size(): Promise<number> { return this.sizeBytes; }

  async truncate(bytes: number): Promise<void> {
    for (const index of [...this.pages.keys()]) {
      const start = index * this.pageBytes;
      if (start >= bytes) this.pages.delete(index);
      else if (start + this.pageBytes > bytes) this.pages.get(index)!.fill(0, bytes - start);
    }
    if (bytes < this.innerBytes) this.innerBytes = bytes;
    this.sizeBytes = bytes;
  }

  async zeroRange(): Promise<boolean> { return false; }

  /** Freed clusters read as zeros afterwards, as on the real file (staged as zeros, within the file). */
  async punchHole(offset: number, length: number): Promise<boolean> {
    const end = Math.min(offset + length, this.sizeBytes);
    const zeros = Buffer.alloc(Math.min(Math.max(end - offset, 0), 1024 * 1024));
    for (let pos = offset; pos < end; pos += zeros.length) await this.pwrite(zeros.subarray(0, Math.min(zeros.length, end - pos)), pos);
    return true;
  }

  async allocate(): Promise<boolean> { return false; }
  async dropCache(): Promise<void> {}
  /** The real file stays open: it belongs to the image being repaired. */
  async close(): Promise<void> {}

  /** Write the staged pages to the real file (header cluster last, each phase synced) and set its size. */
  async commit(): Promise<void> {
    const indices = [...this.pages.keys()].sort((a, b) => a - b);
    const isHeader = (index: number): boolean => index * this.pageBytes < this.headerBytes;
    for (const phase of [false, true]) {
      for (const index of indices) if (isHeader(index) === phase) await this.inner.pwrite(this.pages.get(index)!, index * this.pageBytes, 'other');
      if (phase === false && (await this.inner.size()) !== this.sizeBytes) await this.inner.truncate(this.sizeBytes);
      await this.inner.fdatasync();
    }
    this.pages.clear();
  }
}

/**
 * Repair an image opened writable with the dirty bit set, as QEMU's qcow2_do_open does (a check with
 * every repair, which clears the dirty bit) — but staged: the repair runs on a twin of the image
 * whose writes go to a StagingFile, and reaches the real file only when it succeeded. A repair that
 * fails (check errors, fatal corruption) leaves the file untouched — QEMU may leave it half repaired
 * and marked corrupt — and the open fails with EIO. On success the image reloads what the repair
 * changed (header, refcount table, L1 COPIED flags, snapshot table).
 */
export async function repairDirtyImage(image: ImageState, options: Qcow2OpenOptions): Promise<void> {
  const fail = (why: string, cause?: unknown): never => {
    throw new CodedError('EIO', `${image.path}: could not repair dirty image: ${why}; run 'qcow2fuse check -r all'`, { image: image.path }, { cause });
  };
  const message = (err: unknown): string => (err instanceof Error ? err.message : String(err));
  const staging = new StagingFile(image.file, await image.file.size(), image.geometry.clusterSize);
  const twin = await Qcow2Image.open(image.path, { readOnly: false, check: true, file: staging, lock: false, openHostFile: options.openHostFile }).catch((err: unknown) => fail(message(err), err));
  let repaired = false;
  try {
    const result = await imageState(twin).lock.run(() => checkPassLocked(imageState(twin), { leaks: true, errors: true, beyondEnd: true })).catch((err: unknown) => fail(message(err), err));
    if (result.checkErrors > 0) fail(`${result.checkErrors} check errors`);
    if (twin.readOnly) fail('the repair met fatal corruption');
    await twin.close().catch((err: unknown) => fail(message(err), err));
    if (twin.readOnly) fail('the repair met fatal corruption');
    repaired = true;
  } finally {
    if (!repaired) await twin.close().catch(() => undefined);
  }
  await image.lock.run(async () => {
    await staging.commit();
    await reloadAfterRepair(image);
  });
}

/** Re-read what a repair may have changed under an open image (before the image was used). */
async function reloadAfterRepair(image: ImageState): Promise<void> {
  const g = image.geometry;
  const fileBytes = await image.file.size();
  image.setHeader(decodeHeader(await image.readHost(0, Math.min(g.clusterSize, fileBytes)), image.path, fileBytes));
  await image.refcounts.load(image.header.refcountTableOffset, image.header.refcountTableClusters);
  const l1 = image.activeMap.l1;
  (await image.readHost(l1.offset, l1.entries * 8)).copy(l1.buf, 0);
  image.setSnapshotTable([], 0);
  if (image.header.nbSnapshots > 0) {
    const table = await readSnapshotTable((offset, bytes) => image.readHost(offset, bytes), image.header.snapshotsOffset, image.header.nbSnapshots, fileBytes, image.path);
    image.setSnapshotTable(table.entries, table.tableBytes);
  }
  image.l2Cache.invalidateClean();
  image.refcountCache.invalidateClean();
  image.registerMetadata();
}
