/**
 * 64-bit on-disk values become JS numbers only through these helpers: a value above 2^53 cannot be a
 * valid offset or size in an image we can handle, so it is reported, never truncated.
 */

/** Read a big-endian u64 at `pos` as a BigInt. */
export function readU64(buf: Uint8Array, pos: number): bigint {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength).getBigUint64(pos, false);
}

export function writeU64(buf: Uint8Array, pos: number, value: bigint | number): void {
  new DataView(buf.buffer, buf.byteOffset, buf.byteLength).setBigUint64(pos, BigInt(value), false);
}

/** A BigInt as a number when it is a safe integer, otherwise undefined. */
export function toSafeNumber(value: bigint): number | undefined {
  return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : undefined;
}

export function hex(value: bigint | number): string {
  return `0x${value.toString(16)}`;
}
