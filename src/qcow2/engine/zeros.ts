/**
 * Zero detection shared by the write paths (uncompressed writes, the compressed writer, convert):
 * one all-zero buffer, grown on demand and never written to, to compare data with and to write
 * zeros from.
 */
let zeros = Buffer.alloc(0);

/** A shared all-zero buffer of `bytes` (never written to). */
export function zeroBlock(bytes: number): Buffer {
  if (zeros.length < bytes) zeros = Buffer.alloc(Math.max(bytes, 2 * zeros.length));
  return zeros.subarray(0, bytes);
}

/** Whether data[start, end) is all zero bytes; the comparison stops at the first non-zero byte. */
export function isZeroRange(data: Uint8Array, start: number, end: number): boolean {
  return zeroBlock(end - start).compare(data, start, end) === 0;
}
