/**
 * Deliberately corrupted images, qemu-iotests 060/080 style: each scenario makes the base image
 * with qemu's tools, then pokes bytes at offsets read from the image's own structures.
 */
import { stat } from 'node:fs/promises';
import { qemuImg, type QemuOptionValue } from '../helpers/qemu.js';
import { BASE_REGIONS, COPIED, header, l2Offset, makeBaseImage, OFFSET_MASK, peekU64, poke, refblockOffset, setRefcount16, u32, u64 } from './poke.js';

export interface Region {
  offset: number;
  bytes: number;
  pattern: number;
}

export interface CheckScenario {
  name: string;
  options?: Record<string, QemuOptionValue>;
  /** Take an internal snapshot (qemu-img snapshot -c s1) before corrupting. */
  snapshot?: boolean;
  corrupt(path: string): Promise<void>;
  /** Guest data that must read back unchanged after `check -r all` made the image clean (default: all base regions). */
  intact?: Region[];
}

const ALL: Region[] = BASE_REGIONS.map((r) => ({ ...r }));
const [R0, R1, R2] = ALL as [Region, Region, Region];
const R0_FIRST_CLUSTER: Region = { offset: 0, bytes: 65536, pattern: 0x11 };

/** L2 entry index of the compressed cluster at guest 2 MiB (64 KiB clusters). */
const COMPRESSED_INDEX = 32;

async function l2Entry(path: string, index: number): Promise<{ at: number; value: bigint }> {
  const at = (await l2Offset(path)) + index * 8;
  return { at, value: await peekU64(path, at) };
}

export const CHECK_SCENARIOS: CheckScenario[] = [
  {
    name: 'leaked cluster (refcount 1 on a cluster nothing uses)',
    async corrupt(path) {
      const cluster = Math.ceil((await stat(path)).size / 65536);
      await poke(path, (cluster + 1) * 65536 - 1, Buffer.alloc(1));
      await setRefcount16(path, cluster, 1);
    },
  },
  {
    name: 'refcount of a data cluster set to 0',
    async corrupt(path) {
      await setRefcount16(path, 5, 0);
    },
  },
  {
    name: 'refcount of a cluster shared with a snapshot set too low (2 -> 1)',
    snapshot: true,
    async corrupt(path) {
      const { value } = await l2Entry(path, 0);
      await setRefcount16(path, Number(value & OFFSET_MASK) / 65536, 1);
    },
  },
  {
    name: 'L1 entry pointing at the L1 table (060 test 1)',
    async corrupt(path) {
      const h = await header(path);
      await poke(path, h.l1Offset, u64(COPIED | BigInt(h.l1Offset)));
    },
  },
  {
    name: 'L2 entry moved onto the L1 table',
    async corrupt(path) {
      const h = await header(path);
      const { at } = await l2Entry(path, 1);
      await poke(path, at, u64(COPIED | BigInt(h.l1Offset)));
    },
    intact: [R0_FIRST_CLUSTER, R1, R2],
  },
  {
    name: 'refcount block overlapping an L2 table',
    async corrupt(path) {
      const h = await header(path);
      await poke(path, h.reftableOffset, u64(await l2Offset(path)));
    },
  },
  {
    name: 'compressed descriptor past the end of the file',
    async corrupt(path) {
      const { at, value } = await l2Entry(path, COMPRESSED_INDEX);
      const mask = (1n << 54n) - 1n;
      await poke(path, at, u64((value & ~mask) | ((value & mask) + 0x10000000n)));
    },
    intact: [R0, R1],
  },
  {
    name: 'L2 table offset unaligned in L1',
    async corrupt(path) {
      const h = await header(path);
      await poke(path, h.l1Offset, u64((await peekU64(path, h.l1Offset)) + 0x200n));
    },
  },
  {
    name: 'L1 entry with reserved bits',
    async corrupt(path) {
      const h = await header(path);
      await poke(path, h.l1Offset, u64((await peekU64(path, h.l1Offset)) | 0x0100000000000000n));
    },
  },
  {
    name: 'L2 entry with reserved bits',
    async corrupt(path) {
      const { at, value } = await l2Entry(path, 0);
      await poke(path, at, u64(value | 0x2n));
    },
  },
  {
    name: 'COPIED cleared on a data cluster with refcount 1',
    async corrupt(path) {
      const { at, value } = await l2Entry(path, 0);
      await poke(path, at, u64(value & ~COPIED));
    },
  },
  {
    name: 'COPIED set on a compressed cluster',
    async corrupt(path) {
      const { at, value } = await l2Entry(path, COMPRESSED_INDEX);
      await poke(path, at, u64(value | COPIED));
    },
  },
  {
    name: 'COPIED cleared on an L1 entry',
    async corrupt(path) {
      const h = await header(path);
      await poke(path, h.l1Offset, u64((await peekU64(path, h.l1Offset)) & ~COPIED));
    },
  },
  {
    name: 'refcount block outside the image',
    async corrupt(path) {
      const h = await header(path);
      await poke(path, h.reftableOffset + 8, u64(0x1000000));
    },
  },
  {
    name: 'refcount table entry unaligned',
    async corrupt(path) {
      const h = await header(path);
      await poke(path, h.reftableOffset + 8, u64(0x10200));
    },
  },
  {
    name: 'refcount table entry with reserved bits',
    async corrupt(path) {
      const h = await header(path);
      await poke(path, h.reftableOffset, u64((await peekU64(path, h.reftableOffset)) | 1n));
    },
  },
  {
    name: 'preallocated zero cluster unaligned',
    async corrupt(path) {
      const { at, value } = await l2Entry(path, 1);
      await poke(path, at, u64((value | 1n) + 0x200n));
    },
    intact: [R0_FIRST_CLUSTER, R1, R2],
  },
  {
    name: 'data cluster unaligned',
    async corrupt(path) {
      const { at, value } = await l2Entry(path, 1);
      await poke(path, at, u64(value + 0x200n));
    },
  },
  {
    name: 'data cluster past the end of the file',
    async corrupt(path) {
      const { at } = await l2Entry(path, 1);
      await poke(path, at, u64(COPIED | 0x100000000n));
    },
  },
  {
    name: 'snapshot table entry with too much extra data',
    snapshot: true,
    async corrupt(path) {
      await poke(path, (await header(path)).snapshotsOffset + 36, u32(2000));
    },
  },
  {
    name: 'snapshot L1 table unaligned',
    snapshot: true,
    async corrupt(path) {
      const at = (await header(path)).snapshotsOffset;
      await poke(path, at, u64((await peekU64(path, at)) + 0x200n));
    },
  },
  {
    name: 'snapshot table entry incomplete (extra data < 16 bytes)',
    snapshot: true,
    async corrupt(path) {
      await poke(path, (await header(path)).snapshotsOffset + 36, u32(8));
    },
  },
  {
    name: 'corrupt bit set on a consistent image',
    async corrupt(path) {
      await poke(path, 79, Buffer.from([0x02]));
    },
  },
  {
    name: 'refcount overflow with refcount_bits=1 (two L2 entries, one cluster)',
    options: { refcount_bits: 1 },
    async corrupt(path) {
      const { value } = await l2Entry(path, 0);
      await poke(path, (await l2Entry(path, 1)).at, u64(value));
    },
  },
  {
    name: 'extended L2: subcluster both allocated and zero',
    options: { extended_l2: true },
    async corrupt(path) {
      const at = (await l2Offset(path)) + 8;
      await poke(path, at, u64(0x0000000100000001n));
    },
  },
  {
    name: 'compat=0.10: refcount too high',
    options: { compat: '0.10' },
    async corrupt(path) {
      await poke(path, (await refblockOffset(path)) + 4 * 2, Buffer.from([0x00, 0x07]));
    },
  },
];

export async function makeScenarioImage(path: string, scenario: CheckScenario): Promise<void> {
  await makeBaseImage(path, scenario.options);
  if (scenario.snapshot === true) {
    const result = await qemuImg(['snapshot', '-c', 's1', path]);
    if (result.code !== 0) throw new Error(`qemu-img snapshot failed: ${result.stderr}`);
  }
  await scenario.corrupt(path);
}

export function intactRegions(scenario: CheckScenario): Region[] {
  return scenario.intact ?? ALL;
}
