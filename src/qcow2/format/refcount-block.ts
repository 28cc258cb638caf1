/**
 * Refcount table and refcount block entries.
 *
 * Refcount table entry (u64): bits 9–63 host offset of a refcount block (0 = not allocated), bits 0–8 reserved.
 * Refcount block: cluster-sized array of refcount_bits-wide unsigned entries (refcount_bits = 1 << refcount_order).
 * Sub-byte widths (1, 2, 4 bits) are packed from the least significant bit of each byte; wider entries are
 * big-endian. A 64-bit refcount above 2^53 is reported as Infinity (no real image reaches it).
 */
import { readU64, toSafeNumber, writeU64 } from './safe-int.js';

export interface ReftableEntry {
  refblockOffset: number;
  /** Bits 0–8 set, or an offset beyond 2^53 (check reports it). */
  invalid: boolean;
}

export function decodeReftableEntry(buf: Uint8Array, index: number): ReftableEntry {
  const raw = readU64(buf, index * 8);
  const offset = toSafeNumber(raw & ~0x1ffn);
  return { refblockOffset: offset ?? 0, invalid: (raw & 0x1ffn) !== 0n || offset === undefined };
}

export function encodeReftableEntry(buf: Uint8Array, index: number, refblockOffset: number): void {
  writeU64(buf, index * 8, refblockOffset);
}

export function getRefcount(block: Uint8Array, index: number, refcountOrder: number): number {
  switch (refcountOrder) {
    case 0: return (block[index >>> 3] >>> (index & 7)) & 0x1;
    case 1: return (block[index >>> 2] >>> (2 * (index & 3))) & 0x3;
    case 2: return (block[index >>> 1] >>> (4 * (index & 1))) & 0xf;
    case 3: return block[index];
    case 4: return (block[2 * index] << 8) | block[2 * index + 1];
    case 5: return new DataView(block.buffer, block.byteOffset, block.byteLength).getUint32(4 * index);
    default: {
      const value = toSafeNumber(readU64(block, 8 * index));
      return value ?? Number.POSITIVE_INFINITY;
    }
  }
}

/** Store `value` (0 ≤ value ≤ max for the order; caller checks) at `index`. */
export function setRefcount(block: Uint8Array, index: number, refcountOrder: number, value: number): void {
  switch (refcountOrder) {
    case 0: case 1: case 2: {
      const bits = 2 ** refcountOrder;
      const perByte = 8 / bits;
      const byteIndex = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[byteIndex] = (block[byteIndex] & ~mask) | ((value << shift) & mask);
      return;
    }
    case 3: block[index] = value; return;
    case 4: block[2 * index] = value >>> 8; block[2 * index + 1] = value & 0xff; return;
    case 5: new DataView(block.buffer, block.byteOffset, block.byteLength).setUint32(4 * index, value); return;
    default: writeU64(block, 8 * index, value);
  }
}
