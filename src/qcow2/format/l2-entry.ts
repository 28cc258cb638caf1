/**
 * L1 and L2 table entries, including extended L2 entries and the compressed-cluster descriptor.
 *
 * L1 entry (64 bits):  bits 9–55 L2 table offset · bit 63 COPIED (refcount is exactly 1) · rest reserved.
 * L2 entry (64 bits, standard cluster):
 *   bit 0 reads-as-zero (v3; reserved with extended L2) · bits 9–55 host cluster offset ·
 *   bit 62 = 0 (not compressed) · bit 63 COPIED.
 * L2 entry (compressed cluster): bit 62 = 1; with x = 62 - (cluster_bits - 8):
 *   bits 0..x-1 host byte offset of the compressed data · bits x..61 additional 512-byte sectors.
 * Extended L2 adds a second 64-bit word: bits 0–31 subcluster allocated, bits 32–63 subcluster zero.
 *
 * Entries are handled as two u32 halves (hi = bits 32–63, lo = bits 0–31); JS bitwise operators are
 * only applied to those 32-bit halves.
 */
import { HI_COMPRESSED, HI_COPIED, HI_OFFSET_MASK, LO_OFFSET_MASK, LO_ZERO } from './constants.js';
import type { Geometry } from './geometry.js';

/** An entry as stored: the two halves of its first word and (extended L2) the subcluster bitmap. */
export interface RawL2Entry {
  hi: number;
  lo: number;
  /** Extended L2 only: allocation bitmap (bits 0–31 of the second word). */
  allocBitmap: number;
  /** Extended L2 only: zero bitmap (bits 32–63 of the second word). */
  zeroBitmap: number;
}

export const EMPTY_L2_ENTRY: Readonly<RawL2Entry> = Object.freeze({ hi: 0, lo: 0, allocBitmap: 0, zeroBitmap: 0 });

/** Host offset in bits 9–55 of a 64-bit entry, as a number (always < 2^56, so exact up to 2^53 checks by caller). */
export function entryOffset(hi: number, lo: number): number {
  return (hi & HI_OFFSET_MASK) * 0x1_0000_0000 + ((lo & LO_OFFSET_MASK) >>> 0);
}

export function splitOffset(hostOffset: number): { hi: number; lo: number } {
  return { hi: Math.floor(hostOffset / 0x1_0000_0000), lo: hostOffset % 0x1_0000_0000 };
}

export function entryHex(hi: number, lo: number): string {
  return `0x${(hi >>> 0).toString(16).padStart(8, '0')}${(lo >>> 0).toString(16).padStart(8, '0')}`;
}

// ----- L1 -----

export interface L1Entry {
  l2Offset: number;
  copied: boolean;
  /** Reserved bits set (bits 1–8, 56–62): reported by check. */
  reservedBits: boolean;
}

export function decodeL1Entry(buf: Uint8Array, index: number): L1Entry {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const hi = view.getUint32(index * 8);
  const lo = view.getUint32(index * 8 + 4);
  return { l2Offset: entryOffset(hi, lo), copied: (hi & HI_COPIED) !== 0, reservedBits: (hi & 0x7f000000) !== 0 || (lo & 0x1ff) !== 0 };
}

export function encodeL1Entry(buf: Uint8Array, index: number, l2Offset: number, copied: boolean): void {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const { hi, lo } = splitOffset(l2Offset);
  view.setUint32(index * 8, (copied ? HI_COPIED : 0) | hi);
  view.setUint32(index * 8 + 4, lo);
}

// ----- L2 -----

export function readL2Entry(buf: Uint8Array, indexInSlice: number, geometry: Geometry): RawL2Entry {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const pos = indexInSlice * geometry.l2EntryBytes;
  const hi = view.getUint32(pos);
  const lo = view.getUint32(pos + 4);
  if (!geometry.extendedL2) return { hi, lo, allocBitmap: 0, zeroBitmap: 0 };
  return { hi, lo, zeroBitmap: view.getUint32(pos + 8), allocBitmap: view.getUint32(pos + 12) };
}

export function writeL2Entry(buf: Uint8Array, indexInSlice: number, geometry: Geometry, entry: RawL2Entry): void {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const pos = indexInSlice * geometry.l2EntryBytes;
  view.setUint32(pos, entry.hi >>> 0);
  view.setUint32(pos + 4, entry.lo >>> 0);
  if (geometry.extendedL2) {
    view.setUint32(pos + 8, entry.zeroBitmap >>> 0);
    view.setUint32(pos + 12, entry.allocBitmap >>> 0);
  }
}

export type ClusterKind = 'unallocated' | 'zero-plain' | 'zero-alloc' | 'normal' | 'compressed';

export function isCompressed(e: RawL2Entry): boolean {
  return (e.hi & HI_COMPRESSED) !== 0;
}

export function isCopied(e: RawL2Entry): boolean {
  return (e.hi & HI_COPIED) !== 0;
}

/** Host offset of a standard (uncompressed) entry. */
export function l2HostOffset(e: RawL2Entry): number {
  return entryOffset(e.hi, e.lo);
}

/**
 * Cluster kind of a standard L2 entry (QEMU's qcow2_get_cluster_type). With an external data file,
 * offset 0 with COPIED set is a normal cluster at data-file offset 0.
 */
export function clusterKind(e: RawL2Entry, geometry: Geometry, hasDataFile: boolean): ClusterKind {
  if (isCompressed(e)) return 'compressed';
  const offset = l2HostOffset(e);
  if (!geometry.extendedL2 && (e.lo & LO_ZERO) !== 0) return offset === 0 ? 'zero-plain' : 'zero-alloc';
  if (offset === 0) return hasDataFile && isCopied(e) ? 'normal' : 'unallocated';
  return 'normal';
}

/** Reserved bits of a standard (uncompressed) entry that must be zero: 1–8 and 56–61. */
export function hasReservedBits(e: RawL2Entry, geometry: Geometry): boolean {
  if (isCompressed(e)) return false;
  const loReserved = geometry.extendedL2 ? 0x1ff : 0x1fe;
  return (e.lo & loReserved) !== 0 || (e.hi & 0x3f000000) !== 0;
}

export type SubclusterKind = 'unallocated' | 'zero' | 'normal' | 'compressed' | 'invalid';

/**
 * Kind of one subcluster (extended L2) or of the whole cluster (standard L2; subclusterIndex ignored).
 * 'normal' means the subcluster's data is at the cluster's host offset + its offset.
 */
export function subclusterKind(e: RawL2Entry, subclusterIndex: number, geometry: Geometry, hasDataFile: boolean): SubclusterKind {
  const kind = clusterKind(e, geometry, hasDataFile);
  if (!geometry.extendedL2) {
    if (kind === 'zero-plain' || kind === 'zero-alloc') return 'zero';
    return kind;
  }
  if (kind === 'compressed') return e.allocBitmap !== 0 || e.zeroBitmap !== 0 ? 'invalid' : 'compressed';
  const bit = 2 ** subclusterIndex;
  const alloc = Math.floor(e.allocBitmap / bit) % 2 === 1;
  const zero = Math.floor(e.zeroBitmap / bit) % 2 === 1;
  if (kind === 'normal') {
    if ((e.allocBitmap & e.zeroBitmap) !== 0) return 'invalid';
    if (zero) return 'zero';
    return alloc ? 'normal' : 'unallocated';
  }
  // no host cluster
  if (e.allocBitmap !== 0) return 'invalid';
  return zero ? 'zero' : 'unallocated';
}

export function makeNormalEntry(hostOffset: number, copied: boolean, allocBitmap = 0, zeroBitmap = 0): RawL2Entry {
  const { hi, lo } = splitOffset(hostOffset);
  return { hi: ((copied ? HI_COPIED : 0) | hi) >>> 0, lo, allocBitmap, zeroBitmap };
}

/** A zero cluster: v3 flag (standard L2) or all-zero bitmap (extended L2), keeping `hostOffset` when preallocated. */
export function makeZeroEntry(geometry: Geometry, hostOffset = 0, copied = false): RawL2Entry {
  const { hi, lo } = splitOffset(hostOffset);
  if (geometry.extendedL2) {
    return { hi: ((copied ? HI_COPIED : 0) | hi) >>> 0, lo, allocBitmap: 0, zeroBitmap: 0xffffffff };
  }
  return { hi: ((copied ? HI_COPIED : 0) | hi) >>> 0, lo: (lo | LO_ZERO) >>> 0, allocBitmap: 0, zeroBitmap: 0 };
}

// ----- compressed descriptor -----

export interface CompressedDescriptor {
  /** Host byte offset where the compressed stream starts. */
  hostOffset: number;
  /** Bytes to read: up to the end of the last 512-byte sector the descriptor covers. */
  compressedBytes: number;
  /** Number of 512-byte sectors covered (the field + 1). */
  nbSectors: number;
}

function entryBig(e: RawL2Entry): bigint {
  return (BigInt(e.hi >>> 0) << 32n) | BigInt(e.lo >>> 0);
}

/** Decode a compressed L2 entry (QEMU's qcow2_parse_compressed_l2_entry). */
export function decodeCompressed(e: RawL2Entry, geometry: Geometry): CompressedDescriptor {
  const shift = BigInt(62 - (geometry.clusterBits - 8));
  const value = entryBig(e);
  const hostOffset = Number(value & ((1n << shift) - 1n));
  const nbSectors = Number((value >> shift) & ((1n << BigInt(geometry.clusterBits - 8)) - 1n)) + 1;
  return { hostOffset, nbSectors, compressedBytes: nbSectors * 512 - (hostOffset % 512) };
}

/** Encode a compressed L2 entry for `compressedBytes` of data at `hostOffset`. */
export function makeCompressedEntry(hostOffset: number, compressedBytes: number, geometry: Geometry): RawL2Entry {
  const shift = BigInt(62 - (geometry.clusterBits - 8));
  const extraSectors = Math.floor((hostOffset + compressedBytes - 1) / 512) - Math.floor(hostOffset / 512);
  const value = (1n << 62n) | (BigInt(extraSectors) << shift) | BigInt(hostOffset);
  return { hi: Number(value >> 32n), lo: Number(value & 0xffffffffn), allocBitmap: 0, zeroBitmap: 0 };
}

/** Host clusters [first, last] whose refcount a compressed descriptor holds (QEMU counts every cluster the sector range overlaps). */
export function compressedClusterRange(d: CompressedDescriptor, geometry: Geometry): { firstHostCluster: number; lastHostCluster: number } {
  const start = d.hostOffset - (d.hostOffset % 512);
  const end = start + d.nbSectors * 512;
  return { firstHostCluster: geometry.clusterIndex(start), lastHostCluster: geometry.clusterIndex(end - 1) };
}
