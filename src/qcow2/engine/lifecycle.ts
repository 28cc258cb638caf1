/**
 * Open and close of an image, and the drained sections maintenance code runs in.
 *
 * Open (QEMU's qcow2_do_open): header, data file, backing chain, L1, refcount table, snapshot table,
 * then every metadata structure is registered in the overlap map (ImageState.registerMetadata), and
 * a writable image left dirty is repaired by the repair the caller injected (Qcow2OpenOptions
 * .repairDirtyImage: check/dirty-repair.ts, passed by src/node.ts — the engine does not import check). Close: flush in order
 * (flush.ts), give back the tail of the file this session added, clear the dirty bit, close files.
 */
import debugFactory from 'debug';
import type { HostFile, HostFileOpener, HostFileOpenOptions } from '../../io/host-file.js';
import { openBacking, resolveBackingPath, type BackingReader } from './backing.js';
import type { L1Table } from './cluster-map.js';
import { CompressedWriter, type CompressedWriterOptions } from './compressed-writer.js';
import { DropCacheFile } from './drop-cache-file.js';
import { flushLocked } from './flush.js';
import type { Qcow2OpenOptions } from './options.js';
import { readIntoMap } from './read.js';
import { SizeTrackingFile } from './size-tracking-file.js';
import { ImageState } from './state.js';
import { prepareFirstWrite, writeNormal } from './write.js';
import { zeroClusterForCompress } from './zero-discard.js';
import { HEADER_V3_MIN_BYTES, INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from '../format/constants.js';
import { CodedError } from '../format/errors.js';
import { decodeHeader, HEADER_FIELD, hasBit, withBit } from '../format/header.js';
import { readSnapshotTable } from '../format/snapshot-table.js';

const trace = debugFactory('qcow2fuse:qcow2');

/** Opens a backing qcow2 image read-only (Qcow2Image.open, passed down to avoid an import cycle). */
export type BackingQcow2Opener = (path: string, file: HostFile, chain: string[]) => Promise<BackingReader>;

/**
 * Open the image at `path` into an ImageState. Read-only opens take QEMU's reader locks (or share
 * everything with forceShare, like `qemu-img -U`); writable opens take QEMU's write locks. Backing
 * files open as readers.
 */
export async function openImageState(path: string, options: Qcow2OpenOptions, openQcow2Backing: BackingQcow2Opener): Promise<ImageState> {
  const opener = options.openHostFile;
  const fileOptions: HostFileOpenOptions = { readOnly: options.readOnly, direct: options.cache === 'none', aio: options.aio, lock: options.lock ?? true,
    forceShare: options.forceShare };
  const rawFile = options.file ?? await opener(path, fileOptions);
  const file = new SizeTrackingFile(rawFile, await rawFile.size());
  const cleanup: (() => Promise<void>)[] = [() => file.close()];
  try {
    const fileBytes = await file.size();
    const first = Buffer.alloc(Math.min(fileBytes, HEADER_V3_MIN_BYTES));
    await file.pread(first, 0, 'header');
    const clusterBits = first.length >= HEADER_FIELD.clusterBits + 4 ? first.readUInt32BE(HEADER_FIELD.clusterBits) : 0;
    const headerArea = Buffer.alloc(Math.min(fileBytes, clusterBits >= 9 && clusterBits <= 21 ? 2 ** clusterBits : HEADER_V3_MIN_BYTES));
    await file.pread(headerArea, 0, 'header');
    const header = decodeHeader(headerArea, path, fileBytes);
    if (!options.readOnly && options.check !== true && hasBit(header.incompatibleFeatures, INCOMPAT_CORRUPT)) {
      throw new CodedError('EACCES', `${path}: image is marked corrupt; it can only be opened read-only (repair it with 'qcow2fuse check -r all')`, { image: path });
    }
    let dataFile: HostFile = file;
    if (header.dataFile !== undefined) {
      dataFile = await opener(resolveBackingPath(path, header.dataFile), fileOptions);
      cleanup.push(() => dataFile.close());
    }
    let backing: BackingReader | undefined;
    if (header.backingFile !== undefined && options.noBacking !== true) {
      backing = await openBacking(path, header.backingFile, header.backingFormat, {
        opener, chain: options.chain ?? [path], forceShare: options.forceShare, openQcow2: openQcow2Backing,
      });
      const b = backing;
      cleanup.push(() => b.close());
    }
    const l1Buf = Buffer.alloc(Math.max(header.l1Entries * 8, 8));
    if (header.l1Entries > 0) await file.pread(l1Buf.subarray(0, header.l1Entries * 8), header.l1TableOffset, 'l1');
    const l1: L1Table = { offset: header.l1TableOffset, entries: header.l1Entries, buf: l1Buf };
    const s = new ImageState(path, file, dataFile, header, l1, backing, options, fileBytes);
    await s.refcounts.load(header.refcountTableOffset, header.refcountTableClusters);
    if (header.nbSnapshots > 0 && options.check !== true) {
      const table = await readSnapshotTable((offset, bytes) => s.readHost(offset, bytes), header.snapshotsOffset, header.nbSnapshots, fileBytes, path);
      s.setSnapshotTable(table.entries, table.tableBytes);
    }
    s.registerMetadata();
    if (options.compress && !options.readOnly) await startCompressedWriter(s, opener, options.compressedWriter);
    if (!options.readOnly && options.check !== true && hasBit(header.incompatibleFeatures, INCOMPAT_DIRTY)) {
      if (options.repairDirtyImage === undefined) {
        throw new CodedError('EIO', `${path}: the image is dirty and needs a repair before it is written (open it with a repair, or run 'qcow2fuse check -r all')`, { image: path });
      }
      await options.repairDirtyImage(s, options);
    }
    trace('opened %s: %d bytes virtual, cluster %d, %s', path, header.virtualSize, s.geometry.clusterSize, options.readOnly ? 'ro' : 'rw');
    return s;
  } catch (err) {
    for (const fn of cleanup.reverse()) await fn().catch(() => undefined);
    throw err;
  }
}

/**
 * Route writes through a CompressedWriter. Compressed host clusters go out through a second,
 * O_DIRECT handle (they must not fill the host page cache); where the filesystem refuses O_DIRECT a
 * warning is printed and buffered writes are followed by fadvise(DONTNEED).
 */
async function startCompressedWriter(s: ImageState, opener: HostFileOpener, options: CompressedWriterOptions | undefined): Promise<void> {
  if (s.hasDataFile) {
    throw new CodedError('EINVAL', `${s.path}: compressed writes are impossible with an external data file`, { image: s.path });
  }
  if (s.geometry.maxRefcount < 3) {
    throw new CodedError('EINVAL', `${s.path}: compressed writes need refcount_bits of 2 or more`, { image: s.path });
  }
  const tracked = s.file;
  let direct: HostFile;
  try {
    direct = await opener(s.path, { readOnly: false, direct: true, aio: s.aioMode, lock: false });
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    process.emitWarning(`qcow2fuse: ${s.path}: O_DIRECT refused (${message}); compressed data is written buffered and dropped from the page cache`);
    direct = new DropCacheFile(tracked);
  }
  const directTracked = new SizeTrackingFile(direct, tracked.sizeBytes);
  directTracked.onWrite = (end) => tracked.noteWrite(end);
  s.directFile = directTracked;
  const g = s.geometry;
  s.compressedWriter = new CompressedWriter({
    geometry: g,
    compressionType: s.compressionType,
    directFile: directTracked,
    maxRefcount: g.maxRefcount,
    locked: (fn) => s.lock.run(fn),
    readCurrent: (guestOffset, buf) => readIntoMap(s, s.activeMap, guestOffset, buf, false),
    writeUncompressed: (guestOffset, data) => writeNormal(s, guestOffset, data, directTracked),
    zeroCluster: (clusterIndex) => zeroClusterForCompress(s, clusterIndex),
    allocClustersLocked: (n) => s.refcounts.allocClusters(n),
    // +1 per linked chunk; -1 drops the writer's own allocation reference, which no L2 entry holds:
    // the count left still covers every chunk linked, so it needs no L2-first ordering (DESIGN §4
    // rule 3 is for removing a reference an L2 entry holds). A refcount→L2 dependency here made the
    // next link write back the L2 cache and fdatasync once per host cluster (~75% more bytes written).
    updateRefcountLocked: (hostClusterIndex, addend) => s.refcounts.updateRefcount(hostClusterIndex * g.clusterSize, g.clusterSize, addend),
    linkCompressedLocked: (guestClusterIndex, entry) => s.activeMap.linkCompressed(guestClusterIndex, entry),
  }, options);
}

/**
 * Run `fn` under the metadata lock with no guest write in flight (QEMU drains all I/O around
 * snapshot operations): pending compressed data is linked and the compressed writer's open host
 * clusters are closed (none is appended to once a snapshot shares it), and every write that
 * planned against the tables has finished, so `fn` may rewrite L1/L2 tables and refcounts freely.
 */
export async function runDrained<T>(s: ImageState, fn: () => Promise<T>): Promise<T> {
  s.assertWritable();
  await prepareFirstWrite(s);
  for (;;) {
    await s.compressedWriter?.close();
    let waitFor: Promise<void> | undefined;
    const result = await s.lock.run(async () => {
      s.assertWritable();
      waitFor = s.inflight.anyGuestDone();
      if (waitFor) return undefined;
      // Refcounts exact before the tables are rewritten (overwritten entries are freed in batches).
      await s.activeMap.releaseDeferredFrees();
      return { value: await fn() };
    });
    if (result) return result.value;
    await waitFor;
  }
}

/**
 * Give back the tail of the file past the last allocated cluster that this session added
 * (preallocation ahead, the compressed writer's unused area, clusters freed at the end): close.
 * Never below the size at open, so whatever another tool left past its clusters stays.
 */
async function trimTail(s: ImageState): Promise<void> {
  const tracked = s.file;
  const allocatedEnd = await s.refcounts.allocatedEnd();
  const target = Math.max(allocatedEnd, tracked.openedBytes);
  if (allocatedEnd > 0 && (await tracked.size()) > target) await tracked.truncate(target);
}

/** Flush, clear the dirty bit we set, unlock and close (the image, its data file and backing chain). Idempotent. */
export async function closeImageState(s: ImageState): Promise<void> {
  if (s.closed) return;
  try {
    if (!s.readOnly) {
      await s.compressedWriter?.close();
      await s.lock.run(async () => {
        await flushLocked(s);
        await trimTail(s);
        if (hasBit(s.header.incompatibleFeatures, INCOMPAT_DIRTY)) {
          await s.updateHeader({ incompatibleFeatures: withBit(s.header.incompatibleFeatures, INCOMPAT_DIRTY, false) });
        }
      });
    }
  } finally {
    s.closed = true;
    await s.settleBackground();
    await s.backing?.close();
    if (s.directFile) await s.directFile.close();
    if (s.hasDataFile) await s.dataFile.close();
    await s.file.close();
  }
}
