/**
 * qemu-iotests style image surgery: read and poke bytes at known offsets of images qemu-img made.
 * Offsets come from the header and the tables themselves, never from guesses.
 */
import { open } from 'node:fs/promises';
import { qemuImgCreate, qemuIoOk, type QemuOptionValue } from '../helpers/qemu.js';

export async function peek(path: string, offset: number, bytes: number): Promise<Buffer> {
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(bytes);
    await fh.read(buf, 0, bytes, offset);
    return buf;
  } finally {
    await fh.close();
  }
}

export async function poke(path: string, offset: number, data: Buffer): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    await fh.write(data, 0, data.length, offset);
  } finally {
    await fh.close();
  }
}

export function u64(value: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(value));
  return b;
}

export function u32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value);
  return b;
}

export function u16(value: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value);
  return b;
}

export async function peekU64(path: string, offset: number): Promise<bigint> {
  return (await peek(path, offset, 8)).readBigUInt64BE(0);
}

/** Bits 9–55 of a table entry: the host offset. */
export const OFFSET_MASK = 0x00fffffffffffe00n;
export const COPIED = 0x8000000000000000n;

export interface HeaderFields {
  clusterBits: number;
  clusterSize: number;
  l1Offset: number;
  reftableOffset: number;
  nbSnapshots: number;
  snapshotsOffset: number;
}

export async function header(path: string): Promise<HeaderFields> {
  const b = await peek(path, 0, 72);
  const clusterBits = b.readUInt32BE(20);
  return {
    clusterBits,
    clusterSize: 2 ** clusterBits,
    l1Offset: Number(b.readBigUInt64BE(40)),
    reftableOffset: Number(b.readBigUInt64BE(48)),
    nbSnapshots: b.readUInt32BE(60),
    snapshotsOffset: Number(b.readBigUInt64BE(64)),
  };
}

/** Host offset of the L2 table behind L1 entry `l1Index`. */
export async function l2Offset(path: string, l1Index = 0): Promise<number> {
  const h = await header(path);
  return Number((await peekU64(path, h.l1Offset + l1Index * 8)) & OFFSET_MASK);
}

/** Host offset of the first refcount block. */
export async function refblockOffset(path: string): Promise<number> {
  const h = await header(path);
  return Number(await peekU64(path, h.reftableOffset));
}

/** Set the 16-bit refcount of host cluster `clusterIndex` (first refcount block, refcount_bits=16). */
export async function setRefcount16(path: string, clusterIndex: number, value: number): Promise<void> {
  await poke(path, (await refblockOffset(path)) + clusterIndex * 2, u16(value));
}

/** The base image of the scenarios: 64 MiB, three written regions (one compressed). */
export const BASE_REGIONS = [
  { offset: 0, bytes: 128 * 1024, pattern: 0x11 },
  { offset: 1 << 20, bytes: 64 * 1024, pattern: 0x22 },
  { offset: 2 << 20, bytes: 64 * 1024, pattern: 0x33 },
] as const;

export async function makeBaseImage(path: string, options: Record<string, QemuOptionValue> = {}): Promise<void> {
  await qemuImgCreate(path, '64M', options);
  await qemuIoOk(path, ['write -P 0x11 0 128k', 'write -P 0x22 1M 64k', 'write -c -P 0x33 2M 64k']);
}
