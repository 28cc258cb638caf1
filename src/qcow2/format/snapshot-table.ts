/**
 * Internal snapshot table: nb_snapshots variable-length entries at snapshots_offset, each 8-aligned:
 *   0 l1_table_offset (u64) · 8 l1_size (u32) · 12 id_str_size (u16) · 14 name_size (u16)
 *  16 date_sec (u32) · 20 date_nsec (u32) · 24 vm_clock_nsec (u64) · 32 vm_state_size (u32)
 *  36 extra_data_size (u32) · 40 extra data (vm_state_size_large u64, disk_size u64, icount u64 …)
 *  then id_str, name, zero padding to a multiple of 8.
 */
import { QCOW_MAX_SNAPSHOT_EXTRA_DATA, SNAPSHOT_HEADER_BYTES } from './constants.js';
import { Qcow2CorruptError } from './errors.js';
import { readU64, toSafeNumber, writeU64 } from './safe-int.js';

export interface SnapshotEntry {
  l1TableOffset: number;
  l1Entries: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateBytes: number;
  /** Guest size at snapshot time (extra data), when recorded. */
  diskSize?: number;
  /** Instruction count (extra data), -1 when not recorded. */
  icount?: number;
  /** Extra data bytes beyond what we understand, preserved on rewrite. */
  extraUnknown: Buffer;
}

/** Reads `bytes` at host offset `offset` of the image file, zero-filled past EOF. */
export type TableReader = (offset: number, bytes: number) => Promise<Buffer>;

function corrupt(image: string, offset: number, message: string): Qcow2CorruptError {
  return new Qcow2CorruptError(message, { image, structure: 'snapshot-table', hostOffset: offset }, false);
}

/** Decode the snapshot table; `tableEndLimit` bounds how far the table may extend (the file size). */
export async function readSnapshotTable(read: TableReader, tableOffset: number, nbSnapshots: number, fileBytes: number, image: string): Promise<{ entries: SnapshotEntry[]; tableBytes: number }> {
  const entries: SnapshotEntry[] = [];
  let pos = tableOffset;
  for (let i = 0; i < nbSnapshots; i++) {
    if (pos + SNAPSHOT_HEADER_BYTES > fileBytes) throw corrupt(image, pos, `snapshot table entry ${i} lies past the end of the file`);
    const head = await read(pos, SNAPSHOT_HEADER_BYTES);
    const l1TableOffset = toSafeNumber(readU64(head, 0));
    const vmClockNsec = toSafeNumber(readU64(head, 24));
    if (l1TableOffset === undefined || vmClockNsec === undefined) throw corrupt(image, pos, `snapshot ${i} has an out-of-range field`);
    const idBytes = head.readUInt16BE(12);
    const nameBytes = head.readUInt16BE(14);
    const extraBytes = head.readUInt32BE(36);
    if (extraBytes > QCOW_MAX_SNAPSHOT_EXTRA_DATA) throw corrupt(image, pos, `too much extra metadata in snapshot table entry ${i} (${extraBytes} bytes)`);
    const restBytes = extraBytes + idBytes + nameBytes;
    if (pos + SNAPSHOT_HEADER_BYTES + restBytes > fileBytes) throw corrupt(image, pos, `snapshot table entry ${i} lies past the end of the file`);
    const rest = await read(pos + SNAPSHOT_HEADER_BYTES, restBytes);
    const extra = rest.subarray(0, extraBytes);
    const entry: SnapshotEntry = {
      l1TableOffset,
      l1Entries: head.readUInt32BE(8),
      dateSec: head.readUInt32BE(16),
      dateNsec: head.readUInt32BE(20),
      vmClockNsec,
      vmStateBytes: head.readUInt32BE(32),
      id: rest.toString('utf8', extraBytes, extraBytes + idBytes),
      name: rest.toString('utf8', extraBytes + idBytes, restBytes),
      extraUnknown: Buffer.alloc(0),
    };
    if (extraBytes >= 8) entry.vmStateBytes = toSafeNumber(readU64(extra, 0)) ?? entry.vmStateBytes;
    if (extraBytes >= 16) entry.diskSize = toSafeNumber(readU64(extra, 8));
    if (extraBytes >= 24) {
      const raw = readU64(extra, 16);
      entry.icount = raw === 0xffffffffffffffffn ? -1 : (toSafeNumber(raw) ?? -1);
    }
    if (extraBytes > 24) entry.extraUnknown = Buffer.from(extra.subarray(24));
    entries.push(entry);
    pos += Math.ceil((SNAPSHOT_HEADER_BYTES + restBytes) / 8) * 8;
  }
  return { entries, tableBytes: pos - tableOffset };
}

/** Encode a snapshot table as QEMU writes it (24 bytes of extra data per entry, plus preserved unknown extra). */
export function encodeSnapshotTable(entries: SnapshotEntry[]): Buffer {
  const parts: Buffer[] = [];
  for (const s of entries) {
    const id = Buffer.from(s.id, 'utf8');
    const name = Buffer.from(s.name, 'utf8');
    const extra = Buffer.alloc(24 + s.extraUnknown.length);
    writeU64(extra, 0, s.vmStateBytes);
    writeU64(extra, 8, s.diskSize ?? 0);
    writeU64(extra, 16, s.icount === undefined || s.icount < 0 ? 0xffffffffffffffffn : BigInt(s.icount));
    s.extraUnknown.copy(extra, 24);
    const head = Buffer.alloc(SNAPSHOT_HEADER_BYTES);
    writeU64(head, 0, s.l1TableOffset);
    head.writeUInt32BE(s.l1Entries, 8);
    head.writeUInt16BE(id.length, 12);
    head.writeUInt16BE(name.length, 14);
    head.writeUInt32BE(s.dateSec, 16);
    head.writeUInt32BE(s.dateNsec, 20);
    writeU64(head, 24, s.vmClockNsec);
    head.writeUInt32BE(Math.min(s.vmStateBytes, 0xffffffff), 32);
    head.writeUInt32BE(extra.length, 36);
    const bytes = SNAPSHOT_HEADER_BYTES + extra.length + id.length + name.length;
    parts.push(head, extra, id, name, Buffer.alloc(Math.ceil(bytes / 8) * 8 - bytes));
  }
  return Buffer.concat(parts);
}
