/**
 * The snapshot table pass (QEMU's qcow2_check_read_snapshot_table and qcow2_check_fix_snapshot_table):
 * read the table as the check sees it, drop what cannot be kept with -r all, rewrite it when it had
 * corruptions.
 */
import { QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS, SNAPSHOT_HEADER_BYTES } from '../format/constants.js';
import { HEADER_FIELD } from '../format/header.js';
import { readU64 } from '../format/safe-int.js';
import type { SnapshotEntry } from '../format/snapshot-table.js';
import type { CheckContext, CheckSnapshot } from './context.js';
import type { CheckCounters } from './counters.js';
import { type CheckAbortCode, CheckAbortError, ERRNO_TEXT, writeSnapshotTable } from './repair.js';

/** QEMU's QCOW_MAX_SNAPSHOTS_SIZE: the snapshot table may not exceed 64 MiB. */
const MAX_SNAPSHOT_TABLE_BYTES = 1024 * QCOW_MAX_SNAPSHOTS;
const INT_MAX = 0x7fffffff;
const INT64_MAX = 0x7fffffffffffffffn;

/** Sequential reads of a table through a 1 MiB window: one host read per window, not per field (views into it). */
class WindowReader {
  private windowOffset = 0;
  private window: Buffer = Buffer.alloc(0);
  private readonly load: (offset: number, bytes: number) => Promise<Buffer>;

  constructor(load: (offset: number, bytes: number) => Promise<Buffer>) {
    this.load = load;
  }

  async read(offset: number, bytes: number): Promise<Buffer> {
    if (offset < this.windowOffset || offset + bytes > this.windowOffset + this.window.length) {
      this.windowOffset = offset;
      this.window = await this.load(offset, Math.max(bytes, 1024 * 1024));
    }
    return this.window.subarray(offset - this.windowOffset, offset - this.windowOffset + bytes);
  }
}

/** Abort the read of the snapshot table: count a check error, log, throw CheckAbortError. */
type SnapshotReadFailure = (code: CheckAbortCode, message: string, hint?: string) => never;

/**
 * The header's snapshot count and table offset, validated (QEMU's checks on nb_snapshots and
 * snapshots_offset); with -r all an overlong count is cut to QCOW_MAX_SNAPSHOTS (`reduced`).
 */
async function readSnapshotPointer(c: CheckContext, res: CheckCounters): Promise<{ nbSnapshots: number; tableOffset: number; reduced: number }> {
  const pointer = await c.read(HEADER_FIELD.nbSnapshots, 12);
  let nbSnapshots = pointer.readUInt32BE(0);
  const offsetRaw = readU64(pointer, 4);
  let reduced = 0;
  if (nbSnapshots > QCOW_MAX_SNAPSHOTS && c.fix.errors) {
    if (c.verbose) c.log(`Discarding ${nbSnapshots - QCOW_MAX_SNAPSHOTS} overhanging snapshots`);
    reduced += nbSnapshots - QCOW_MAX_SNAPSHOTS;
    nbSnapshots = QCOW_MAX_SNAPSHOTS;
  }
  let invalid: [CheckAbortCode, string] | undefined;
  if (nbSnapshots > QCOW_MAX_SNAPSHOTS) invalid = ['EFBIG', 'snapshot table too large'];
  else if (INT64_MAX - BigInt(nbSnapshots * SNAPSHOT_HEADER_BYTES) < offsetRaw || offsetRaw % BigInt(c.clusterSize) !== 0n) invalid = ['EINVAL', 'snapshot table offset invalid'];
  if (invalid) {
    res.checkErrors++;
    if (c.verbose) c.log(`ERROR ${invalid[1]}`);
    if (nbSnapshots > QCOW_MAX_SNAPSHOTS) c.log(`You can force-remove all ${nbSnapshots - QCOW_MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all`);
    throw new CheckAbortError(invalid[0], invalid[1]);
  }
  return { nbSnapshots, tableOffset: Number(offsetRaw), reduced };
}

/**
 * Snapshot table entry `i` at `pos` (relative to the table start, 8-byte aligned): the entry, where
 * the next one starts, the bytes it takes, and whether too much extra data was dropped (-r all).
 */
async function readSnapshotEntry(c: CheckContext, table: WindowReader, tableOffset: number, start: number, i: number, fail: SnapshotReadFailure):
  Promise<{ snapshot: CheckSnapshot; pos: number; entryBytes: number; dropped: boolean }> {
  let pos = start;
  const head = await table.read(tableOffset + pos, SNAPSHOT_HEADER_BYTES);
  pos += SNAPSHOT_HEADER_BYTES;
  const l1OffsetRaw = readU64(head, 0);
  let extraDataBytes = head.readUInt32BE(36);
  const idBytes = head.readUInt16BE(12);
  const nameBytes = head.readUInt16BE(14);
  let truncateExtra = false;
  if (extraDataBytes > QCOW_MAX_SNAPSHOT_EXTRA_DATA) {
    if (!c.fix.errors) fail('EFBIG', `Too much extra metadata in snapshot table entry ${i}`, 'You can force-remove this extra metadata with qemu-img check -r all');
    if (c.verbose) c.log(`Discarding too much extra metadata in snapshot table entry ${i} (${extraDataBytes} > ${QCOW_MAX_SNAPSHOT_EXTRA_DATA})`);
    truncateExtra = true;
  }
  const knownBytes = Math.min(24, extraDataBytes);
  const known = await table.read(tableOffset + pos, 24);
  pos += knownBytes;
  let unknown: Buffer = Buffer.alloc(0);
  if (extraDataBytes > 24) {
    const extraEnd = pos + extraDataBytes - 24;
    if (truncateExtra) extraDataBytes = QCOW_MAX_SNAPSHOT_EXTRA_DATA;
    unknown = await table.read(tableOffset + pos, extraDataBytes - 24);
    pos = extraEnd;
  }
  const strings = await table.read(tableOffset + pos, idBytes + nameBytes);
  pos += idBytes + nameBytes;
  const vmStateBytes = extraDataBytes >= 8 ? Number(readU64(known, 0)) : head.readUInt32BE(32);
  const sectors = Math.floor(c.image.virtualSize / 512);
  const entry: SnapshotEntry = {
    l1TableOffset: Number(l1OffsetRaw),
    l1Entries: head.readUInt32BE(8),
    id: strings.toString('utf8', 0, idBytes),
    name: strings.toString('utf8', idBytes, idBytes + nameBytes),
    dateSec: head.readUInt32BE(16),
    dateNsec: head.readUInt32BE(20),
    vmClockNsec: Number(readU64(head, 24)),
    vmStateBytes,
    diskSize: extraDataBytes >= 16 ? Number(readU64(known, 8)) : sectors * 512,
    icount: extraDataBytes >= 24 ? (readU64(known, 16) === 0xffffffffffffffffn ? -1 : Number(readU64(known, 16))) : -1,
    extraUnknown: unknown,
  };
  const entryBytes = SNAPSHOT_HEADER_BYTES + extraDataBytes + idBytes + nameBytes;
  return { snapshot: { entry, l1OffsetRaw, extraDataBytes }, pos, entryBytes, dropped: truncateExtra };
}

/** Write the reduced snapshot count into the header (-r all dropped overhanging snapshots). */
async function writeSnapshotCount(c: CheckContext, res: CheckCounters, nbSnapshots: number): Promise<void> {
  const count = Buffer.alloc(4);
  count.writeUInt32BE(nbSnapshots, 0);
  try {
    await c.image.file.pwrite(count, HEADER_FIELD.nbSnapshots, 'header');
    await c.image.file.fdatasync();
  } catch (err) {
    res.checkErrors++;
    if (c.verbose) c.log(`ERROR failed to update the snapshot count in the image header: ${err instanceof Error ? err.message : String(err)}`);
    throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
  }
  c.image.setHeader({ ...c.image.header, nbSnapshots });
}

/** QEMU's qcow2_check_read_snapshot_table. Throws CheckAbortError when the table cannot be read. */
export async function readSnapshotTable(c: CheckContext, res: CheckCounters): Promise<void> {
  await c.refreshFileBytes();
  const pointer = await readSnapshotPointer(c, res);
  let { nbSnapshots, reduced } = pointer;
  const tableOffset = pointer.tableOffset;
  const table = new WindowReader((offset, bytes) => c.read(offset, bytes));
  const snapshots: CheckSnapshot[] = [];
  let dropped = 0;
  let pos = 0; // relative to the table start
  let tableLength = 0;
  const fail: SnapshotReadFailure = (code, message, hint) => {
    res.checkErrors++;
    if (c.verbose) c.log(`ERROR failed to read the snapshot table: ${message}`);
    if (hint !== undefined) c.log(hint);
    throw new CheckAbortError(code, message);
  };
  for (let i = 0; i < nbSnapshots; i++) {
    const entryStart = pos;
    tableLength = Math.ceil(tableLength / 8) * 8;
    pos = Math.ceil(pos / 8) * 8;
    const read = await readSnapshotEntry(c, table, tableOffset, pos, i, fail);
    if (read.dropped) dropped++;
    pos = read.pos;
    tableLength += read.entryBytes;
    if (tableLength > MAX_SNAPSHOT_TABLE_BYTES || pos > INT_MAX) {
      if (!c.fix.errors) fail('EFBIG', 'Snapshot table is too big', `You can force-remove all ${nbSnapshots - i} overhanging snapshots with qemu-img check -r all`);
      if (c.verbose) c.log(`Discarding ${nbSnapshots - i} overhanging snapshots (snapshot table is too big)`);
      reduced += nbSnapshots - i;
      nbSnapshots = i;
      pos = entryStart;
      break;
    }
    snapshots.push(read.snapshot);
  }
  c.snapshots = snapshots;
  c.snapshotsOffset = tableOffset;
  c.snapshotsBytes = pos;
  c.snapshotsRead = true;
  res.corruptions += reduced + dropped;
  if (reduced > 0) {
    await writeSnapshotCount(c, res, nbSnapshots);
    res.corruptionsFixed += reduced;
    res.corruptions -= reduced;
  }
  if (c.image.header.version >= 3) {
    snapshots.forEach((s, i) => {
      if (s.extraDataBytes < 16) {
        res.corruptions++;
        if (c.verbose) c.log(`${c.fix.errors ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete`);
      }
    });
  }
}

/** QEMU's qcow2_check_fix_snapshot_table: rewrite the table when it had corruptions. */
export async function fixSnapshotTable(c: CheckContext, res: CheckCounters): Promise<void> {
  if (res.corruptions === 0 || !c.fix.errors) return;
  try {
    await writeSnapshotTable(c.image, c.snapshots.map((s) => s.entry), c.snapshotsOffset, c.snapshotsBytes, c.log);
  } catch (err) {
    res.checkErrors++;
    if (c.verbose) c.log(`ERROR failed to update snapshot table: ${err instanceof Error ? err.message : String(err)}`);
    throw new CheckAbortError('EIO', ERRNO_TEXT.EIO);
  }
  c.changedLayout = true;
  res.corruptionsFixed += res.corruptions;
  res.corruptions = 0;
}

/** The snapshots as read by the check (undefined when the table could not be read), for the image's in-memory list. */
export function snapshotEntries(c: CheckContext): { entries: SnapshotEntry[]; tableBytes: number } | undefined {
  if (!c.snapshotsRead) return undefined;
  return { entries: c.snapshots.map((s) => s.entry), tableBytes: c.snapshotsBytes };
}
