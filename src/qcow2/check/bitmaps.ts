/**
 * The bitmap pass (QEMU's qcow2_check_bitmaps_refcounts): count the bitmap directory, bitmap tables
 * and bitmap data clusters.
 */
import { readU64 } from '../format/safe-int.js';
import type { CheckContext } from './context.js';
import type { CheckCounters } from './counters.js';
import { CheckAbortError, ERRNO_TEXT } from './repair.js';

/** Bitmap extension limits (qcow2-bitmap.c). */
const BME_MAX_TABLE_SIZE = 0x8000000;
const BME_MAX_PHYS_SIZE = 0x20000000;
const BME_MAX_NAME_SIZE = 1023;
const BME_DIR_ENTRY_BYTES = 24;
const MAX_BITMAP_DIRECTORY_BYTES = 1024 * 65535;

function bitmapTableEntryValid(entry: bigint, clusterSize: number): boolean {
  if ((entry & 0xff000000000001fen) !== 0n) return false;
  const offset = entry & 0x00fffffffffffe00n;
  if (offset !== 0n && ((entry & 1n) !== 0n || offset % BigInt(clusterSize) !== 0n)) return false;
  return true;
}

/** QEMU's qcow2_check_bitmaps_refcounts. */
export async function checkBitmaps(c: CheckContext, res: CheckCounters): Promise<void> {
  const bitmaps = c.image.header.bitmaps;
  if (!bitmaps || bitmaps.nbBitmaps === 0) return;
  c.incRefcounts(res, bitmaps.directoryOffset, bitmaps.directoryBytes);
  const list = await loadBitmapList(c, bitmaps.directoryOffset, bitmaps.directoryBytes, bitmaps.nbBitmaps);
  if (list === undefined) {
    res.corruptions++;
    throw new CheckAbortError('EINVAL', ERRNO_TEXT.EINVAL);
  }
  const cs = c.clusterSize;
  for (const bm of list) {
    c.incRefcounts(res, bm.tableOffset, bm.tableEntries * 8);
    const table = await c.read(bm.tableOffset, bm.tableEntries * 8);
    const entries: bigint[] = [];
    for (let i = 0; i < bm.tableEntries; i++) {
      const entry = readU64(table, i * 8);
      if (!bitmapTableEntryValid(entry, cs)) {
        res.corruptions++;
        throw new CheckAbortError('EINVAL', ERRNO_TEXT.EINVAL);
      }
      entries.push(entry);
    }
    for (const entry of entries) {
      const offset = Number(entry & 0x00fffffffffffe00n);
      if (offset !== 0) c.incRefcounts(res, offset, cs);
    }
  }
}

/** QEMU's bitmap_list_load: the bitmap directory's entries, or undefined when it is broken. */
export async function loadBitmapList(c: CheckContext, offset: number, bytes: number, nbBitmaps: number): Promise<{ tableOffset: number; tableEntries: number }[] | undefined> {
  if (bytes === 0 || bytes > MAX_BITMAP_DIRECTORY_BYTES) return undefined;
  const dir = await c.read(offset, bytes);
  const cs = c.clusterSize;
  const list: { tableOffset: number; tableEntries: number }[] = [];
  let pos = 0;
  while (pos < bytes) {
    if (pos + BME_DIR_ENTRY_BYTES > bytes) return undefined;
    if (list.length + 1 > nbBitmaps) return undefined;
    const tableOffset = readU64(dir, pos);
    const tableEntries = dir.readUInt32BE(pos + 8);
    const flags = dir.readUInt32BE(pos + 12);
    const type = dir.readUInt8(pos + 16);
    const granularityBits = dir.readUInt8(pos + 17);
    const nameBytes = dir.readUInt16BE(pos + 18);
    const extraBytes = dir.readUInt32BE(pos + 20);
    const next = pos + Math.ceil((BME_DIR_ENTRY_BYTES + nameBytes + extraBytes) / 8) * 8;
    if (next > bytes) return undefined;
    if (extraBytes !== 0) return undefined;
    const bad = tableEntries === 0 || tableOffset === 0n || tableOffset % BigInt(cs) !== 0n || tableEntries > BME_MAX_TABLE_SIZE
      || granularityBits > 31 || granularityBits < 9 || (flags & 0xfffffffc) !== 0 || nameBytes > BME_MAX_NAME_SIZE || type !== 1;
    if (bad) return undefined;
    const physBytes = tableEntries * cs;
    if (physBytes > BME_MAX_PHYS_SIZE) return undefined;
    if ((flags & 1) === 0 && c.image.virtualSize > physBytes * 8 * 2 ** granularityBits) return undefined;
    list.push({ tableOffset: Number(tableOffset), tableEntries });
    pos = next;
  }
  if (list.length !== nbBitmaps || pos !== bytes) return undefined;
  return list;
}
