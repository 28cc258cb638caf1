/**
 * Scans of L2 and refcount tables for their non-empty entries (pure: no I/O).
 */

/** Whether entry `index` (with its bitmap) is all zeros: an unallocated cluster with nothing to check. */
function isZeroEntry(table: Buffer, index: number, entryBytes: number): boolean {
  const pos = index * entryBytes;
  for (let k = 0; k < entryBytes; k += 4) if (table.readUInt32BE(pos + k) !== 0) return false;
  return true;
}

const ZERO_RUN = Buffer.alloc(512);

/**
 * The first entry at or after `index` (before `limit`) that is not all zeros, or `limit`: empty
 * stretches of a table are skipped 512 bytes at a time with a native compare.
 */
export function nextNonZeroEntry(table: Buffer, index: number, entryBytes: number, limit: number): number {
  let i = index;
  const perRun = ZERO_RUN.length / entryBytes;
  while (i < limit) {
    if (i % perRun === 0 && i + perRun <= limit && table.compare(ZERO_RUN, 0, ZERO_RUN.length, i * entryBytes, (i + perRun) * entryBytes) === 0) {
      i += perRun;
      continue;
    }
    if (!isZeroEntry(table, i, entryBytes)) return i;
    i++;
  }
  return limit;
}
