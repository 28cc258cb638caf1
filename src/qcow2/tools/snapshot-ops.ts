/**
 * Internal snapshots, write side (QEMU's block/qcow2-snapshot.c): create, delete and apply, as
 * `qemu-img snapshot -c / -d / -a` do them. Each runs in a drained section of the image (no guest
 * write in flight, metadata lock held).
 *
 * A snapshot holds one reference on its L1 table's clusters, on every L2 table that L1 points to and
 * on every host cluster those tables reference: normal and preallocated-zero clusters, and for a
 * compressed cluster each host cluster its sectors overlap (qcow2_update_snapshot_refcount). COPIED
 * (bit 63) means "refcount is exactly 1" and only matters in the active L1 and its L2 tables.
 *
 * Write ordering (a crash leaks clusters, never corrupts; every "synced" is an fdatasync):
 * - create: the L1 copy is written; refcounts are incremented (refused and rolled back, before any
 *   other change, when one would overflow refcount_bits); COPIED is cleared in the active tables;
 *   all of it is synced — only then is the new snapshot table written and synced, then the header's
 *   nb_snapshots + snapshots_offset switched in one 12-byte synced write, then the old table freed.
 * - delete: the table without the snapshot and the header first (the snapshot is gone); then its
 *   references are dropped and its L1 freed, synced; then COPIED is set where a refcount fell to 1.
 * - apply: the snapshot's references are incremented and COPIED cleared in its tables, synced, before
 *   the active L1 is overwritten with its L1 (COPIED clear, synced); then the old active references
 *   are dropped, synced; then the size is switched. COPIED stays clear: everything the new active
 *   tables reach is also the snapshot's, so no refcount there is 1 (QEMU's final addend-0 pass
 *   finds nothing to set).
 * COPIED is only ever set after the refcount that justifies it is on disk; clearing it is always safe.
 */
import debugFactory from 'debug';
import { ClusterMap, type L1Table } from '../engine/cluster-map.js';
import { HI_COPIED, QCOW_MAX_SNAPSHOTS } from '../format/constants.js';
import { CodedError, Qcow2CorruptError, Qcow2UnsupportedError } from '../format/errors.js';
import { imageState, type Qcow2Image } from '../engine/image.js';
import type { ImageState } from '../engine/state.js';
import { clusterKind, decodeCompressed, decodeL1Entry, encodeL1Entry, isCopied, l2HostOffset, readL2Entry, writeL2Entry, type RawL2Entry } from '../format/l2-entry.js';
import { writeSnapshotTable } from '../check/repair.js';
import { runDrained } from '../engine/lifecycle.js';
import { findSnapshotEntry, openSnapshotViewOf, type SnapshotView } from '../engine/snapshot.js';
import { encodeSnapshotTable, type SnapshotEntry } from '../format/snapshot-table.js';

const trace = debugFactory('qcow2fuse:snapshot');

/** QEMU's QCOW_MAX_SNAPSHOTS_SIZE: the snapshot table may not exceed 64 MiB. */
const MAX_SNAPSHOT_TABLE_BYTES = 1024 * QCOW_MAX_SNAPSHOTS;
/** qemu-img copies the name into QEMUSnapshotInfo.name[256]: longer names are cut to 255 bytes. */
const MAX_SNAPSHOT_NAME_BYTES = 255;
/** strtoul's range (snapshot ids are parsed with it). */
const ULONG_RANGE = 2n ** 64n;

/**
 * Take a snapshot of the active layer named `name` (qemu-img snapshot -c): a new id (the largest
 * numeric id + 1), the time now, no VM state, the current virtual size, icount 0 (qemu-img 7.2
 * leaves it zeroed). Names need not be unique. Returns the new table entry.
 */
export async function createSnapshot(qcow2: Qcow2Image, name: string): Promise<SnapshotEntry> {
  const image = imageState(qcow2);
  return runDrained(image, async () => {
    refuseDataFile(image, 'create');
    if (image.snapshots.length >= QCOW_MAX_SNAPSHOTS) {
      throw new CodedError('EFBIG', `${image.path}: too many snapshots (QEMU's limit is ${QCOW_MAX_SNAPSHOTS})`, { image: image.path });
    }
    const g = image.geometry;
    const active = image.activeMap.l1;
    const l1Bytes = active.entries * 8;
    const nowMs = Date.now();
    const entry: SnapshotEntry = {
      l1TableOffset: 0, l1Entries: active.entries, id: nextSnapshotId(image.snapshots), name: truncateName(name),
      dateSec: Math.floor(nowMs / 1000), dateNsec: (nowMs % 1000) * 1_000_000, vmClockNsec: 0, vmStateBytes: 0,
      diskSize: image.virtualSize, icount: 0, extraUnknown: Buffer.alloc(0),
    };
    const entries = [...withDiskSizes(image), entry];
    checkTableSize(image, entries);

    // The snapshot's L1: a copy of the active one (COPIED is meaningless in an inactive table).
    if (l1Bytes > 0) {
      const copy = Buffer.alloc(l1Bytes);
      for (let i = 0; i < active.entries; i++) encodeL1Entry(copy, i, decodeL1Entry(active.buf, i).l2Offset, false);
      entry.l1TableOffset = await image.refcounts.allocClusters(g.sizeToClusters(l1Bytes));
      image.activeMap.assertNoOverlap(entry.l1TableOffset, l1Bytes, 'snapshot-l1');
      await image.file.pwrite(copy, entry.l1TableOffset, 'l1');
      image.metadata.add('snapshot-l1', entry.l1TableOffset, l1Bytes);
    }
    try {
      await addReferences(image, image.activeMap);
    } catch (err) {
      if (l1Bytes > 0) await image.refcounts.freeClusters(entry.l1TableOffset, l1Bytes);
      throw err;
    }
    // Every table and cluster the active L1 reaches is now shared: nothing is COPIED any more.
    await clearCopiedInL2(image, image.activeMap);
    let l1Changed = false;
    for (let i = 0; i < active.entries; i++) {
      const e = decodeL1Entry(active.buf, i);
      if (!e.copied) continue;
      encodeL1Entry(active.buf, i, e.l2Offset, false);
      l1Changed = true;
    }
    // Refcounts, the L1 copy and the cleared flags are durable before the table references anything.
    await syncTables(image);
    if (l1Changed) await writeL1(image, active.buf.subarray(0, l1Bytes));
    await replaceSnapshotTable(image, entries);
    trace('%s: created snapshot %s (%s), L1 at %d', image.path, entry.id, entry.name, entry.l1TableOffset);
    return entry;
  });
}

/**
 * Delete the snapshot named `ref`, or else the one with id `ref` (qemu-img snapshot -d looks names
 * up first). Its clusters lose a reference (freed at zero); active entries left with refcount 1
 * get COPIED back. Returns the removed entry.
 */
export async function deleteSnapshot(qcow2: Qcow2Image, ref: string): Promise<SnapshotEntry> {
  const image = imageState(qcow2);
  return runDrained(image, async () => {
    const target = findSnapshotEntry(image.snapshots, { name: ref }) ?? findSnapshotEntry(image.snapshots, { id: ref });
    if (!target) throw new CodedError('ENOENT', `${image.path}: snapshot not found`, { image: image.path, snapshot: ref });
    refuseDataFile(image, 'delete');
    const view = await openTargetView(image, target);
    try {
      await replaceSnapshotTable(image, withDiskSizes(image).filter((_, i) => image.snapshots[i] !== target));
      // The snapshot is no longer referenced by the table: drop its references, then its L1.
      await forEachReference(image, view.map, (hostOffset, bytes) => image.activeMap.freeHostClusters(hostOffset, bytes));
      if (target.l1Entries > 0) await image.activeMap.freeHostClusters(target.l1TableOffset, target.l1Entries * 8);
      await syncTables(image);
      await recomputeCopied(image);
    } finally {
      await view.close();
    }
    trace('%s: deleted snapshot %s (%s)', image.path, target.id, target.name);
    return target;
  });
}

/**
 * Revert the active layer to the snapshot with id `ref`, or else named `ref` (qemu-img snapshot -a,
 * QEMU's qcow2_snapshot_goto), including the virtual size it recorded. The snapshot stays. Returns it.
 */
export async function applySnapshot(qcow2: Qcow2Image, ref: string): Promise<SnapshotEntry> {
  const image = imageState(qcow2);
  return runDrained(image, async () => {
    refuseDataFile(image, 'apply');
    const target = findSnapshotEntry(image.snapshots, ref);
    if (!target) throw new CodedError('ENOENT', `${image.path}: no snapshot with id or name '${ref}'`, { image: image.path, snapshot: ref });
    const newVirtualSize = target.diskSize ?? image.virtualSize;
    if (newVirtualSize !== image.virtualSize && image.header.version < 3) {
      throw new Qcow2UnsupportedError('ENOTSUP', `snapshot '${target.name}' has a different disk size, and a v2 image with snapshots cannot be resized`, { image: image.path });
    }
    const g = image.geometry;
    const active = image.activeMap;
    const view = await openTargetView(image, target);
    try {
      await active.growL1(Math.max(target.l1Entries, g.l1EntriesFor(newVirtualSize)));
      await addReferences(image, view.map);
      await clearCopiedInL2(image, view.map);
      await syncTables(image);
      // The new active L1: the snapshot's, COPIED clear, zero-padded; written in place and synced.
      const l1Bytes = active.l1.entries * 8;
      const next = Buffer.alloc(l1Bytes);
      for (let i = 0; i < target.l1Entries; i++) encodeL1Entry(next, i, decodeL1Entry(view.map.l1.buf, i).l2Offset, false);
      const old: L1Table = { offset: active.l1.offset, entries: active.l1.entries, buf: Buffer.from(active.l1.buf.subarray(0, l1Bytes)) };
      await writeL1(image, next);
      next.copy(active.l1.buf);
      // Nothing references the old active tables through the L1 any more: drop their references.
      await forEachReference(image, new ClusterMap(active.ctx, old, false), (hostOffset, bytes) => active.freeHostClusters(hostOffset, bytes));
      await syncTables(image);
      if (newVirtualSize !== image.virtualSize) await image.updateHeader({ virtualSize: newVirtualSize });
      active.registerMetadata('l1');
    } finally {
      await view.close();
    }
    trace('%s: applied snapshot %s (%s)', image.path, target.id, target.name);
    return target;
  });
}

/** QEMU refuses snapshot changes on images with an external data file (its clusters have no refcounts). */
function refuseDataFile(image: ImageState, what: 'create' | 'delete' | 'apply'): void {
  if (image.hasDataFile) {
    throw new Qcow2UnsupportedError('ENOTSUP', `cannot ${what} internal snapshots of an image with an external data file`, { image: image.path });
  }
}

/** A read view of `target`'s tables (its L1 validated as QEMU does); refuses duplicate ids, which would make the lookup ambiguous. */
async function openTargetView(image: ImageState, target: SnapshotEntry): Promise<SnapshotView> {
  const view = await openSnapshotViewOf(image, { id: target.id });
  if (view.snapshot !== target) {
    await view.close();
    throw new CodedError('EINVAL', `${image.path}: snapshot id '${target.id}' is not unique`, { image: image.path, snapshot: target.id });
  }
  return view;
}

/** The next id: one more than the largest id read as C's strtoul does (qemu's find_new_snapshot_id). */
function nextSnapshotId(snapshots: readonly SnapshotEntry[]): string {
  let max = 0n;
  for (const s of snapshots) {
    const m = /^\s*([+-]?)(\d+)/.exec(s.id);
    if (!m) continue;
    const magnitude = BigInt(m[2]);
    let value = magnitude >= ULONG_RANGE ? ULONG_RANGE - 1n : magnitude;
    if (m[1] === '-' && magnitude < ULONG_RANGE) value = (ULONG_RANGE - magnitude) % ULONG_RANGE;
    if (value > max) max = value;
  }
  return ((max + 1n) % ULONG_RANGE).toString();
}

/** `name` cut to MAX_SNAPSHOT_NAME_BYTES of UTF-8, at a character boundary. */
function truncateName(name: string): string {
  const bytes = Buffer.from(name, 'utf8');
  if (bytes.length <= MAX_SNAPSHOT_NAME_BYTES) return name;
  let end = MAX_SNAPSHOT_NAME_BYTES;
  while (end > 0 && (bytes[end] & 0xc0) === 0x80) end--;
  return bytes.toString('utf8', 0, end);
}

/** The current entries with a disk size on each (QEMU gives entries without one the current size when it reads them). */
function withDiskSizes(image: ImageState): SnapshotEntry[] {
  return image.snapshots.map((s) => (s.diskSize === undefined ? { ...s, diskSize: image.virtualSize } : s));
}

function checkTableSize(image: ImageState, entries: SnapshotEntry[]): void {
  const bytes = encodeSnapshotTable(entries).length;
  if (bytes > MAX_SNAPSHOT_TABLE_BYTES) {
    throw new CodedError('EFBIG', `${image.path}: the snapshot table would take ${bytes} bytes (QEMU's limit is ${MAX_SNAPSHOT_TABLE_BYTES})`, { image: image.path });
  }
}

/**
 * Write `entries` as the new snapshot table (repair.ts's writeSnapshotTable: new table synced, header
 * switched, old table freed) after every table change made so far is durable.
 */
async function replaceSnapshotTable(image: ImageState, entries: SnapshotEntry[]): Promise<void> {
  await syncTables(image);
  await writeSnapshotTable(image, entries, image.header.snapshotsOffset, image.snapshotTableBytes, (line) => trace('%s: %s', image.path, line));
  if (entries.length > 0) image.metadata.add('snapshot-table', image.header.snapshotsOffset, image.snapshotTableBytes);
}

/** Every table change so far durable: L2 and refcount caches written back (in their dependency order), then fdatasync. */
async function syncTables(image: ImageState): Promise<void> {
  await image.l2Cache.flush();
  await image.refcountCache.flush();
  await image.file.fdatasync();
}

/** Overwrite the active L1 table on disk with `table` (its size), synced. */
async function writeL1(image: ImageState, table: Buffer): Promise<void> {
  if (table.length === 0) return;
  const offset = image.activeMap.l1.offset;
  image.activeMap.assertNoOverlap(offset, table.length, 'l1');
  await image.file.pwrite(table, offset, 'l1');
  await image.file.fdatasync();
}

/**
 * Call `visit(hostOffset, bytes)` for each reference the tables under `map`'s L1 hold, in a fixed
 * order: for each L2 table its data references (normal and preallocated-zero clusters, compressed
 * chunks), then the table itself. Stops after `limit` visits; returns the number made. A slice is
 * released before its references are visited (a visit may free the table).
 */
async function forEachReference(image: ImageState, map: ClusterMap, visit: (hostOffset: number, bytes: number) => Promise<void>, limit = Number.POSITIVE_INFINITY): Promise<number> {
  const g = image.geometry;
  let visited = 0;
  for (let l1Index = 0; l1Index < map.l1.entries; l1Index++) {
    const { l2Offset } = map.l2TableOffset(l1Index);
    if (l2Offset === 0) continue;
    for (let slice = 0; slice < g.l2Entries / g.l2SliceEntries; slice++) {
      for (const [hostOffset, bytes] of await sliceReferences(image, l2Offset, slice)) {
        if (visited >= limit) return visited;
        await visit(hostOffset, bytes);
        visited++;
      }
    }
    if (visited >= limit) return visited;
    await visit(l2Offset, g.clusterSize);
    visited++;
  }
  return visited;
}

/** The host ranges the entries of one L2 slice reference, as [hostOffset, bytes] pairs. */
async function sliceReferences(image: ImageState, l2Offset: number, slice: number): Promise<[number, number][]> {
  const g = image.geometry;
  const h = await image.l2Cache.get(l2Offset + slice * g.l2SliceBytes);
  try {
    const refs: [number, number][] = [];
    for (let i = 0; i < g.l2SliceEntries; i++) {
      const e = readL2Entry(h.buf, i, g);
      const kind = clusterKind(e, g, false);
      if (kind === 'compressed') {
        const d = decodeCompressed(e, g);
        refs.push([d.hostOffset, d.compressedBytes]);
      } else if (kind === 'normal' || kind === 'zero-alloc') {
        const hostOffset = l2HostOffset(e);
        if (hostOffset % g.clusterSize !== 0) {
          image.signalCorruption(true, `cluster allocation offset ${hostOffset} unaligned (L2 offset ${l2Offset}, index ${slice * g.l2SliceEntries + i})`,
            { structure: 'l2', hostOffset: h.offset + i * g.l2EntryBytes, index: slice * g.l2SliceEntries + i });
        }
        refs.push([hostOffset, g.clusterSize]);
      }
    }
    return refs;
  } finally {
    image.l2Cache.release(h);
  }
}

/**
 * One more reference on everything `map`'s L1 reaches. Before each increment its clusters are
 * checked: a referenced cluster with refcount 0 is corruption, one at the refcount_bits maximum
 * refuses the operation (EINVAL, as QEMU's update_refcount) — either way the increments already
 * made are undone first (back to values ≥ 1: nothing is freed), so a refusal changes nothing.
 */
async function addReferences(image: ImageState, map: ClusterMap): Promise<void> {
  let done = 0;
  try {
    await forEachReference(image, map, async (hostOffset, bytes) => {
      await checkIncrement(image, hostOffset, bytes);
      await image.refcounts.updateRefcount(hostOffset, bytes, 1);
      done++;
    });
  } catch (err) {
    await forEachReference(image, map, (hostOffset, bytes) => image.refcounts.updateRefcount(hostOffset, bytes, -1), done)
      .catch((undoErr: unknown) => trace('%s: undoing %d increments failed (clusters leak): %o', image.path, done, undoErr));
    throw err;
  }
}

async function checkIncrement(image: ImageState, hostOffset: number, bytes: number): Promise<void> {
  const g = image.geometry;
  for (let cluster = g.clusterIndex(hostOffset); cluster <= g.clusterIndex(hostOffset + bytes - 1); cluster++) {
    const refcount = await image.refcounts.getRefcount(cluster);
    if (refcount === 0) {
      throw new Qcow2CorruptError(`host cluster ${cluster} is referenced but has refcount 0 (repair it with 'qcow2fuse check -r all')`,
        { image: image.path, structure: 'refblock', hostOffset: cluster * g.clusterSize }, false);
    }
    if (refcount >= g.maxRefcount) {
      throw new CodedError('EINVAL', `${image.path}: the refcount of host cluster ${cluster} would exceed ${g.maxRefcount}, the most refcount_bits=${g.refcountBits} can hold`,
        { image: image.path, hostOffset: cluster * g.clusterSize, refcount });
    }
  }
}

function withCopied(e: RawL2Entry, copied: boolean): RawL2Entry {
  return { ...e, hi: (copied ? e.hi | HI_COPIED : e.hi & ~HI_COPIED) >>> 0 };
}

/**
 * Set COPIED on every entry of the L2 table at `l2Offset` to what `want` says (slice by slice through
 * the L2 cache; only changed slices are marked dirty).
 */
async function setCopiedInL2(image: ImageState, l2Offset: number, want: (e: RawL2Entry) => boolean | Promise<boolean>): Promise<void> {
  const g = image.geometry;
  for (let slice = 0; slice < g.l2Entries / g.l2SliceEntries; slice++) {
    const h = await image.l2Cache.get(l2Offset + slice * g.l2SliceBytes);
    try {
      let changed = false;
      for (let i = 0; i < g.l2SliceEntries; i++) {
        const e = readL2Entry(h.buf, i, g);
        const copied = await want(e);
        if (isCopied(e) === copied) continue;
        writeL2Entry(h.buf, i, g, withCopied(e, copied));
        changed = true;
      }
      if (changed) image.l2Cache.markDirty(h);
    } finally {
      await image.l2Cache.put(h);
    }
  }
}

/** Clear COPIED in every entry of the L2 tables `map`'s L1 points to (after their refcounts were raised). */
async function clearCopiedInL2(image: ImageState, map: ClusterMap): Promise<void> {
  for (let l1Index = 0; l1Index < map.l1.entries; l1Index++) {
    const { l2Offset } = map.l2TableOffset(l1Index);
    if (l2Offset !== 0) await setCopiedInL2(image, l2Offset, () => false);
  }
}

/**
 * QEMU's qcow2_update_snapshot_refcount with addend 0 on the active L1: COPIED set exactly on the
 * active L2 entries (normal, preallocated zero) and L1 entries whose cluster has refcount 1, cleared
 * everywhere else. Called once the refcounts it reads are durable; the L2 tables are synced before
 * the L1 is rewritten.
 */
async function recomputeCopied(image: ImageState): Promise<void> {
  const g = image.geometry;
  const active = image.activeMap.l1;
  let l1Changed = false;
  for (let l1Index = 0; l1Index < active.entries; l1Index++) {
    const { l2Offset, copied } = image.activeMap.l2TableOffset(l1Index);
    if (l2Offset === 0) continue;
    await setCopiedInL2(image, l2Offset, async (e) => {
      const kind = clusterKind(e, g, false);
      return (kind === 'normal' || kind === 'zero-alloc') && await image.refcounts.getRefcount(g.clusterIndex(l2HostOffset(e))) === 1;
    });
    const tableCopied = await image.refcounts.getRefcount(g.clusterIndex(l2Offset)) === 1;
    if (tableCopied !== copied) {
      encodeL1Entry(active.buf, l1Index, l2Offset, tableCopied);
      l1Changed = true;
    }
  }
  await syncTables(image);
  if (l1Changed) await writeL1(image, active.buf.subarray(0, active.entries * 8));
}
