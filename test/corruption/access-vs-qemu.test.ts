/**
 * qemu-iotests 060/080 style: poke bytes at known offsets of qemu-made images, then open, read and
 * write with qemu-io and with our driver. For every scenario both refuse or accept the open alike,
 * a read or write fails or succeeds alike, and the corrupt bit ends up set alike — except where our
 * driver is deliberately stricter (tables and clusters past the end of the file, which QEMU reads
 * as zeros): there ours refuses with a coded error and never changes a file it opened read-only.
 */
import { copyFile, readFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { CodedError } from '../../src/io/errors.js';
import { Qcow2Image } from '../../src/qcow2/engine/image.js';
import { sha256 } from '../helpers/files.js';
import { qemuIo } from '../helpers/qemu.js';
import { useTempDir } from '../helpers/tmp.js';
import { requireTools } from '../helpers/tools.js';
import { COPIED, header, l2Offset, makeBaseImage, peekU64, poke, u32, u64 } from './poke.js';
import { openImage } from '../../src/node.js';

const hasQemu = requireTools('qemu-img', 'qemu-io');

type Outcome = 'ok' | 'refused' | 'failed';
type Op = { kind: 'read' | 'write'; offset: number; bytes: number };

interface AccessScenario {
  name: string;
  compat?: string;
  corrupt(path: string): Promise<void>;
  ops: Op[];
  /**
   * 'stricter': where qemu-io succeeds, ours refuses (corruption or bad header).
   * 'marks-corrupt': same outcomes, but ours also sets the corrupt bit on a writable image.
   */
  deviation?: 'stricter' | 'marks-corrupt';
}

const read = (offset: number, bytes = 4096): Op => ({ kind: 'read', offset, bytes });
const write = (offset: number, bytes = 4096): Op => ({ kind: 'write', offset, bytes });

async function setL2(path: string, index: number, make: (old: bigint) => bigint): Promise<void> {
  const at = (await l2Offset(path)) + index * 8;
  await poke(path, at, u64(make(await peekU64(path, at))));
}

async function setL1(path: string, make: (old: bigint, l1Offset: number) => bigint): Promise<void> {
  const h = await header(path);
  await poke(path, h.l1Offset, u64(make(await peekU64(path, h.l1Offset), h.l1Offset)));
}

const MIB = 1 << 20;
const COMPRESSED_MASK = (1n << 54n) - 1n;

const SCENARIOS: AccessScenario[] = [
  { name: 'L1 entry pointing at the L1 table', corrupt: (p) => setL1(p, (_old, l1) => COPIED | BigInt(l1)), ops: [read(0, 65536), write(0)] },
  { name: 'L2 table offset unaligned', corrupt: (p) => setL1(p, (old) => old + 0x200n), ops: [read(0), write(0)] },
  { name: 'data cluster offset unaligned', corrupt: (p) => setL2(p, 1, (old) => old + 0x200n), ops: [read(65536), write(65536)] },
  { name: 'data cluster on the L1 table', corrupt: async (p) => { const { l1Offset } = await header(p); await setL2(p, 1, () => COPIED | BigInt(l1Offset)); }, ops: [read(65536), write(65536)] },
  { name: 'data cluster on the refcount table', corrupt: async (p) => { const { reftableOffset } = await header(p); await setL2(p, 1, () => COPIED | BigInt(reftableOffset)); }, ops: [read(65536), write(65536)] },
  {
    name: 'compressed cluster with garbage data',
    corrupt: async (p) => poke(p, Number((await peekU64(p, (await l2Offset(p)) + 32 * 8)) & COMPRESSED_MASK), Buffer.alloc(8)),
    ops: [read(2 * MIB), write(2 * MIB + 512, 512)],
  },
  { name: 'refcount block offset unaligned', corrupt: async (p) => poke(p, (await header(p)).reftableOffset, u64(0x20200)), ops: [read(0), write(4 * MIB)] },
  { name: 'refcount table entry pointing at an L2 table', corrupt: async (p) => poke(p, (await header(p)).reftableOffset, u64(await l2Offset(p))), ops: [read(0), write(4 * MIB)] },
  { name: 'refcount table entry cleared', corrupt: async (p) => poke(p, (await header(p)).reftableOffset, u64(0)), ops: [read(0), write(4 * MIB)] },
  { name: 'zero flag in a compat=0.10 image', compat: '0.10', corrupt: (p) => setL2(p, 1, (old) => old | 1n), ops: [read(65536), write(65536)] },
  { name: 'corrupt bit set', corrupt: (p) => poke(p, 79, Buffer.from([0x02])), ops: [read(0), write(0)] },
  { name: 'L1 table too large (l1_size)', corrupt: (p) => poke(p, 36, u32(0x1000000)), ops: [read(0)] },
  { name: 'no refcount table (refcount_table_clusters = 0)', corrupt: (p) => poke(p, 56, u32(0)), ops: [read(0)] },
  { name: 'refcount table too large', corrupt: (p) => poke(p, 56, u32(0x1000000)), ops: [read(0)] },
  { name: 'snapshot table offset unaligned', corrupt: async (p) => { await poke(p, 60, u32(1)); await poke(p, 64, u64(0x10200)); }, ops: [read(0)] },
  { name: 'cluster_bits 8', corrupt: (p) => poke(p, 20, u32(8)), ops: [read(0)] },
  { name: 'unknown incompatible feature bit', corrupt: (p) => poke(p, 72, u64(0x100n)), ops: [read(0)] },
  { name: 'refcount_order 7', corrupt: (p) => poke(p, 96, u32(7)), ops: [read(0)] },
  { name: 'header_length too short', corrupt: (p) => poke(p, 100, u32(50)), ops: [read(0)] },
  { name: 'virtual size 2^62', corrupt: (p) => poke(p, 24, u64(1n << 62n)), ops: [read(0)] },
  { name: 'backing file offset past the header cluster', corrupt: async (p) => { await poke(p, 8, u64(0x20000)); await poke(p, 16, u32(10)); }, ops: [read(0)] },
  {
    name: 'compressed cluster past the end of the file',
    corrupt: (p) => setL2(p, 32, (old) => (old & ~COMPRESSED_MASK) | ((old & COMPRESSED_MASK) + 0x10000000n)),
    ops: [read(2 * MIB), write(2 * MIB)],
    deviation: 'marks-corrupt',
  },
  { name: 'L2 table past the end of the file', corrupt: (p) => setL1(p, () => COPIED | 0x10000000n), ops: [read(0), write(0)], deviation: 'stricter' },
  { name: 'data cluster past the end of the file', corrupt: (p) => setL2(p, 1, () => COPIED | 0x100000000n), ops: [read(65536), write(65536)], deviation: 'stricter' },
  { name: 'L1 table past the end of the file', corrupt: (p) => poke(p, 40, u64(0x10000000)), ops: [read(0)], deviation: 'stricter' },
  { name: 'refcount table past the end of the file', corrupt: (p) => poke(p, 48, u64(0x10000000)), ops: [read(0)], deviation: 'stricter' },
  { name: 'snapshot table past the end of the file', corrupt: async (p) => { await poke(p, 60, u32(1)); await poke(p, 64, u64(0x10000000)); }, ops: [read(0)], deviation: 'stricter' },
];

async function qemuOutcome(path: string, op: Op, readOnly: boolean): Promise<Outcome> {
  const command = op.kind === 'read' ? `read ${op.offset} ${op.bytes}` : `write -P 0x55 ${op.offset} ${op.bytes}`;
  const result = await qemuIo(path, [command], { readOnly });
  const text = result.stdout + result.stderr;
  if (/can't open device|Could not open/.test(text)) return 'refused';
  return result.code === 0 && !/failed/.test(text) ? 'ok' : 'failed';
}

async function ourOutcome(path: string, op: Op, readOnly: boolean): Promise<{ outcome: Outcome; code?: string }> {
  let image: Qcow2Image;
  try {
    image = await openImage(path, { readOnly });
  } catch (err) {
    expect(err).toBeInstanceOf(CodedError);
    return { outcome: 'refused', code: (err as CodedError).code };
  }
  let result: { outcome: Outcome; code?: string } = { outcome: 'ok' };
  try {
    if (op.kind === 'read') {
      await image.read(op.offset, op.bytes);
    } else {
      // A write counts once durable: QEMU may refuse the write itself where ours refuses writing back its metadata.
      await image.write(op.offset, Buffer.alloc(op.bytes, 0x55));
      await image.flush();
    }
  } catch (err) {
    expect(err).toBeInstanceOf(CodedError);
    result = { outcome: 'failed', code: (err as CodedError).code };
  }
  await image.close();
  return result;
}

async function corruptBit(path: string): Promise<boolean> {
  const b = await readFile(path);
  return b.readUInt32BE(4) >= 3 && (b[79] & 0x02) !== 0;
}

describe.skipIf(!hasQemu)('open/read/write of corrupted images match qemu-io', () => {
  const tmp = useTempDir('access-vs-qemu');

  for (const scenario of SCENARIOS) {
    it(scenario.name, async () => {
      for (const op of scenario.ops) {
        for (const readOnly of op.kind === 'write' ? [false] : [true, false]) {
          const original = tmp.file('original.qcow2');
          await makeBaseImage(original, scenario.compat !== undefined ? { compat: scenario.compat } : {});
          await scenario.corrupt(original);
          const theirs = tmp.file('qemu.qcow2');
          const ours = tmp.file('ours.qcow2');
          await copyFile(original, theirs);
          await copyFile(original, ours);
          const before = sha256(await readFile(ours));
          const qemu = await qemuOutcome(theirs, op, readOnly);
          const own = await ourOutcome(ours, op, readOnly);
          const label = `${op.kind} ${readOnly ? 'ro' : 'rw'}`;
          if (scenario.deviation === 'stricter') {
            expect({ label, qemu }).toEqual({ label, qemu: 'ok' });
            expect({ label, outcome: own.outcome }).not.toEqual({ label, outcome: 'ok' });
            expect(['ECORRUPT', 'EBADHEADER']).toContain(own.code);
          } else {
            expect({ label, outcome: own.outcome }).toEqual({ label, outcome: qemu });
            const qemuCorrupt = await corruptBit(theirs);
            const ourCorrupt = await corruptBit(ours);
            if (scenario.deviation === 'marks-corrupt' && !readOnly) expect({ label, ourCorrupt }).toEqual({ label, ourCorrupt: true });
            else expect({ label, ourCorrupt }).toEqual({ label, ourCorrupt: qemuCorrupt });
          }
          if (readOnly) expect(sha256(await readFile(ours))).toBe(before);
        }
      }
    });
  }
});
