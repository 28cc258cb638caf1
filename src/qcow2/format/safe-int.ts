/**
 * 64-bit on-disk values become JS numbers only through these helpers: a value above 2^53 cannot be a
 * valid offset or size in an image we can handle, so it is reported, never truncated.
 */

/** Read a big-endian u64 at `pos` as a BigInt (Buffers natively, without a DataView per call). */
export function readU64(buf: Uint8Array, pos: number): bigint {
  if (Buffer.isBuffer(buf)) return buf.readBigUInt64BE(pos);
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength).getBigUint64(pos, false);
}

/** Write `value` (taken modulo 2^64, as DataView does) as a big-endian u64 at `pos`. */
export function writeU64(buf: Uint8Array, pos: number, value: bigint | number): void {
  const v = BigInt.asUintN(64, BigInt(value));
  if (Buffer.isBuffer(buf)) buf.writeBigUInt64BE(v, pos);
  else new DataView(buf.buffer, buf.byteOffset, buf.byteLength).setBigUint64(pos, v, false);
}

/** A BigInt as a number when it is a safe integer, otherwise undefined. */
export function toSafeNumber(value: bigint): number | undefined {
  return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : undefined;
}

export function hex(value: bigint | number): string {
  return `0x${value.toString(16)}`;
}
