/**
 * On-disk codecs (DESIGN §4 "On-disk structures"): the header with its extensions, L1 and L2 entries
 * (standard and extended), the compressed-cluster descriptor for every cluster size, refcount table
 * entries and refcount block entries for every refcount_order 0–6.
 *
 * Each codec is checked three ways: round trips (decode(encode(x)) = x, including offsets above
 * 2^32), the bit layout the spec gives (computed independently with BigInt here), and images
 * qemu-img made: headers re-encode byte for byte, refcount blocks of every width count exactly the
 * clusters the file holds.
 */
import { describe, expect, it } from 'vitest';
import { readFile } from 'node:fs/promises';
import { Geometry } from '../../../../src/qcow2/format/geometry.js';
import { decodeHeader, encodeHeader, STANDARD_FEATURE_NAMES, type Qcow2Header } from '../../../../src/qcow2/format/header.js';
import {
  clusterKind, compressedClusterRange, decodeCompressed, decodeL1Entry, encodeL1Entry, hasReservedBits, isCompressed, isCopied,
  l2HostOffset, makeCompressedEntry, makeNormalEntry, makeZeroEntry, readL2Entry, subclusterKind, writeL2Entry, type RawL2Entry,
} from '../../../../src/qcow2/format/l2-entry.js';
import { decodeReftableEntry, encodeReftableEntry, getRefcount, setRefcount } from '../../../../src/qcow2/format/refcount-block.js';
import { Prng, seedFromEnv } from '../../../helpers/patterns.js';
import { qemuImgCreate, qemuImgInfo, qemuIoOk, type QemuOptionValue } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTools } from '../../../helpers/tools.js';

const hasQemu = requireTools('qemu-img', 'qemu-io');
const BIG_FILE = 2 ** 40;

/** The 64-bit entry as a BigInt (big-endian at `pos`). */
function u64(buf: Buffer, pos = 0): bigint {
  return buf.readBigUInt64BE(pos);
}

function baseHeader(overrides: Partial<Qcow2Header> = {}): Qcow2Header {
  return {
    version: 3, backingFileOffset: 0, backingFileBytes: 0, clusterBits: 16, virtualSize: 10 * 2 ** 30, cryptMethod: 0,
    l1Entries: 20, l1TableOffset: 3 * 65536, refcountTableOffset: 65536, refcountTableClusters: 1, nbSnapshots: 0, snapshotsOffset: 0,
    incompatibleFeatures: 0n, compatibleFeatures: 0n, autoclearFeatures: 0n, refcountOrder: 4, headerLength: 112, compressionType: 0,
    featureNames: STANDARD_FEATURE_NAMES, unknownExtensions: [], ...overrides,
  };
}

/** Decode what encodeHeader produced, as the first cluster of a large file. */
function roundTrip(h: Qcow2Header): { encoded: Qcow2Header; decoded: Qcow2Header } {
  const { bytes, header: encoded } = encodeHeader(h, 'test.qcow2');
  const cluster = Buffer.alloc(2 ** h.clusterBits);
  bytes.copy(cluster);
  return { encoded, decoded: decodeHeader(cluster, 'test.qcow2', BIG_FILE) };
}

describe('header codec', () => {
  const cases: [string, Partial<Qcow2Header>][] = [
    ['v3 defaults', {}],
    ['v2 with a backing file and format', { version: 2, headerLength: 72, featureNames: [], backingFile: 'base image.qcow2', backingFormat: 'qcow2' }],
    ['v2 without extensions', { version: 2, headerLength: 72, featureNames: [] }],
    ['v3 everything', {
      clusterBits: 21, refcountOrder: 6, virtualSize: 2 ** 50, l1Entries: 8192, l1TableOffset: 2 ** 33, refcountTableOffset: 2 ** 34, refcountTableClusters: 4,
      nbSnapshots: 3, snapshotsOffset: 2 ** 35, incompatibleFeatures: 0b11100n, compatibleFeatures: 1n, autoclearFeatures: 0b11n, compressionType: 1,
      backingFile: '/abs/path/to/backing.raw', backingFormat: 'raw', dataFile: 'data.bin',
      bitmaps: { nbBitmaps: 2, directoryBytes: 4096, directoryOffset: 2 ** 36 },
      unknownExtensions: [{ type: 0x12345678, data: Buffer.from('opaque extension data, 37 bytes long!') }],
    }],
    ['v3, 512-byte clusters, refcount_order 0', { clusterBits: 9, refcountOrder: 0, l1Entries: 2 ** 16, l1TableOffset: 3 * 512, refcountTableOffset: 512, virtualSize: 2 ** 30 }],
  ];
  for (const [name, overrides] of cases) {
    it(`decode(encode(h)) = h: ${name}`, () => {
      const { encoded, decoded } = roundTrip(baseHeader(overrides));
      expect(decoded).toEqual(encoded);
      for (const [key, value] of Object.entries(overrides)) {
        if (key !== 'headerLength') expect(decoded[key as keyof Qcow2Header], key).toEqual(value);
      }
    });
  }

  it('lays the fixed fields out where the spec says', () => {
    const h = baseHeader({ virtualSize: 0x1_2345_6789, l1TableOffset: 0x7_0000_0000, incompatibleFeatures: 0x10n, compressionType: 1, refcountOrder: 5 });
    const { bytes } = encodeHeader(h, 'x');
    expect(bytes.readUInt32BE(0)).toBe(0x514649fb);
    expect(bytes.readUInt32BE(4)).toBe(3);
    expect(bytes.readUInt32BE(20)).toBe(16);
    expect(u64(bytes, 24)).toBe(0x1_2345_6789n);
    expect(bytes.readUInt32BE(36)).toBe(20);
    expect(u64(bytes, 40)).toBe(0x7_0000_0000n);
    expect(u64(bytes, 48)).toBe(65536n);
    expect(u64(bytes, 72)).toBe(0x10n);
    expect(bytes.readUInt32BE(96)).toBe(5);
    expect(bytes.readUInt32BE(100)).toBe(112);
    expect(bytes[104]).toBe(1);
  });

  it('refuses what is not a valid header, with coded errors', () => {
    const { bytes } = encodeHeader(baseHeader(), 'x');
    const cluster = () => { const c = Buffer.alloc(65536); bytes.copy(c); return c; };
    const refuse = (mutate: (b: Buffer) => void, code: string, fileBytes = BIG_FILE) => {
      const b = cluster();
      mutate(b);
      expect(() => decodeHeader(b, 'x', fileBytes)).toThrow(expect.objectContaining({ code }) as Error);
    };
    refuse((b) => b.writeUInt32BE(0x514649fa, 0), 'EBADMAGIC');
    refuse((b) => b.writeUInt32BE(4, 4), 'EBADVERSION');
    refuse((b) => b.writeUInt32BE(8, 20), 'EBADHEADER');
    refuse((b) => b.writeUInt32BE(22, 20), 'EBADHEADER');
    refuse((b) => b.writeBigUInt64BE(1n << 5n, 72), 'EUNSUPPORTED');
    refuse((b) => b.writeUInt32BE(7, 96), 'EBADHEADER');
    refuse((b) => b.writeBigUInt64BE(2n ** 60n, 24), 'EBADHEADER');
    refuse((b) => b.writeBigUInt64BE(65536n + 8n, 40), 'EBADHEADER');
    refuse((b) => b.writeUInt32BE(0, 56), 'EBADHEADER');
    refuse(() => undefined, 'EBADHEADER', 3 * 65536); // the L1 table lies past the end of the file
    expect(() => decodeHeader(bytes.subarray(0, 60), 'x', BIG_FILE)).toThrow(expect.objectContaining({ code: 'ETRUNCATED' }) as Error);
  });
});

describe.skipIf(!hasQemu)('header codec vs qemu-img', () => {
  const tmp = useTempDir('codecs');
  const variants: [string, Record<string, QemuOptionValue>, boolean][] = [
    ['compat 1.1 defaults', {}, false],
    ['compat 0.10 with a backing file', { compat: '0.10' }, true],
    ['zstd, lazy refcounts, extended L2, refcount_bits 4, backing file', { compression_type: 'zstd', lazy_refcounts: true, extended_l2: true, refcount_bits: 4 }, true],
    ['512-byte clusters, refcount_bits 64', { cluster_size: 512, refcount_bits: 64 }, false],
    ['2 MiB clusters, refcount_bits 1', { cluster_size: 2 * 1024 * 1024, refcount_bits: 1 }, false],
  ];
  for (const [name, options, backing] of variants) {
    it(`decodes and re-encodes byte for byte what qemu-img writes (${name})`, async () => {
      const path = tmp.file('image.qcow2');
      if (backing) await qemuImgCreate(tmp.file('base.qcow2'), 2 * 1024 * 1024);
      await qemuImgCreate(path, 3 * 1024 * 1024 + 512, options, backing ? { backing: 'base.qcow2', backingFormat: 'qcow2' } : {});
      const file = await readFile(path);
      const clusterBits = file.readUInt32BE(20);
      const first = file.subarray(0, Math.min(file.length, 2 ** clusterBits));
      const h = decodeHeader(first, path, file.length);
      const info = await qemuImgInfo(path);
      const specific = info['format-specific']?.data;
      expect({
        virtualSize: h.virtualSize, clusterSize: 2 ** h.clusterBits, version: h.version, refcountBits: 2 ** h.refcountOrder,
        backingFile: h.backingFile, backingFormat: h.backingFormat,
      }).toEqual({
        virtualSize: info['virtual-size'], clusterSize: info['cluster-size'], version: specific?.compat === '0.10' ? 2 : 3, refcountBits: specific?.['refcount-bits'],
        backingFile: info['backing-filename'], backingFormat: info['backing-filename-format'],
      });
      if (h.version === 3) {
        expect({ lazy: (h.compatibleFeatures & 1n) === 1n, extendedL2: (h.incompatibleFeatures & 0x10n) !== 0n, compression: h.compressionType === 1 ? 'zstd' : 'zlib' })
          .toEqual({ lazy: specific?.['lazy-refcounts'], extendedL2: specific?.['extended-l2'] ?? false, compression: specific?.['compression-type'] });
      }
      const { bytes } = encodeHeader(h, path);
      expect(bytes.toString('hex')).toBe(first.subarray(0, bytes.length).toString('hex'));
      expect(first.subarray(bytes.length).every((b) => b === 0), 'nothing follows the header area in the first cluster').toBe(true);
    });
  }
});

describe('L1 entries', () => {
  it('round-trip offsets up to 2^56 - 512 with and without COPIED, and flag reserved bits', () => {
    const buf = Buffer.alloc(8 * 6);
    const offsets = [0, 512, 65536, 2 ** 32, 2 ** 40 + 2 ** 20, 2 ** 53 - 2 ** 21];
    offsets.forEach((offset, i) => encodeL1Entry(buf, i, offset, i % 2 === 1));
    offsets.forEach((offset, i) => {
      expect(decodeL1Entry(buf, i)).toEqual({ l2Offset: offset, copied: i % 2 === 1, reservedBits: false });
      expect(u64(buf, i * 8)).toBe(BigInt(offset) | (i % 2 === 1 ? 1n << 63n : 0n));
    });
    for (const bit of [1n, 8n, 56n, 62n]) {
      buf.writeBigUInt64BE((1n << 16n) | (1n << bit), 0);
      expect(decodeL1Entry(buf, 0).reservedBits, `bit ${bit}`).toBe(true);
    }
  });
});

describe('L2 entries', () => {
  const standard = new Geometry(16, 4, false);
  const extended = new Geometry(16, 4, true);

  it('round-trip standard and extended entries through a table, at the spec bit positions', () => {
    const rng = new Prng(seedFromEnv());
    for (const g of [standard, extended]) {
      const table = Buffer.alloc(g.clusterSize);
      const entries: RawL2Entry[] = [];
      for (let i = 0; i < g.l2Entries; i++) {
        const host = rng.int(2 ** 37) * 65536;
        const e = rng.chance(0.5) ? makeNormalEntry(host, rng.chance(0.5), g.extendedL2 ? rng.u32() : 0, g.extendedL2 ? rng.u32() : 0) : makeZeroEntry(g, rng.chance(0.5) ? host : 0, rng.chance(0.3));
        entries.push(e);
        writeL2Entry(table, i, g, e);
      }
      entries.forEach((e, i) => {
        expect(readL2Entry(table, i, g)).toEqual(e);
        const word = u64(table, i * g.l2EntryBytes);
        expect(word & 0x00ff_ffff_ffff_fe00n, 'bits 9-55: host offset').toBe(BigInt(l2HostOffset(e)));
        expect(word >> 63n === 1n, 'bit 63: COPIED').toBe(isCopied(e));
        if (g.extendedL2) {
          const bitmap = u64(table, i * 16 + 8);
          expect({ alloc: Number(bitmap & 0xffff_ffffn), zero: Number(bitmap >> 32n) }, 'second word: alloc bits 0-31, zero bits 32-63').toEqual({ alloc: e.allocBitmap, zero: e.zeroBitmap });
        }
      });
    }
  });

  it('classifies cluster kinds as QEMU does', () => {
    const entry = (word: bigint, bitmap = 0n): RawL2Entry => ({ hi: Number(word >> 32n), lo: Number(word & 0xffff_ffffn), allocBitmap: Number(bitmap & 0xffff_ffffn), zeroBitmap: Number(bitmap >> 32n) });
    expect(clusterKind(entry(0n), standard, false)).toBe('unallocated');
    expect(clusterKind(entry(1n), standard, false)).toBe('zero-plain');
    expect(clusterKind(entry(0x30000n | 1n), standard, false)).toBe('zero-alloc');
    expect(clusterKind(entry(0x30000n | (1n << 63n)), standard, false)).toBe('normal');
    expect(clusterKind(entry(1n << 62n), standard, false)).toBe('compressed');
    expect(clusterKind(entry(1n << 63n), standard, true), 'data file: offset 0 with COPIED is data').toBe('normal');
    expect(clusterKind(entry(0n), standard, true)).toBe('unallocated');
    expect(hasReservedBits(entry(0x30000n | 2n), standard)).toBe(true);
    expect(hasReservedBits(entry(0x30000n | (1n << 56n)), standard)).toBe(true);
    expect(hasReservedBits(entry(0x30000n | 1n), standard)).toBe(false);
    expect(hasReservedBits(entry(0x30000n | 1n), extended), 'bit 0 is reserved with extended L2').toBe(true);
    // Extended L2: per-subcluster kinds from the two bitmaps.
    const host = 0x50000n | (1n << 63n);
    expect(subclusterKind(entry(host, 0b01n), 0, extended, false)).toBe('normal');
    expect(subclusterKind(entry(host, 0b01n), 1, extended, false)).toBe('unallocated');
    expect(subclusterKind(entry(host, 1n << 33n), 1, extended, false)).toBe('zero');
    expect(subclusterKind(entry(host, (1n << 32n) | 1n), 0, extended, false), 'allocated and zero at once').toBe('invalid');
    expect(subclusterKind(entry(0n, 1n << 63n), 31, extended, false)).toBe('zero');
    expect(subclusterKind(entry(0n, 1n), 0, extended, false), 'allocated without a host cluster').toBe('invalid');
    expect(subclusterKind(entry(1n << 62n), 5, extended, false)).toBe('compressed');
    expect(subclusterKind(entry(1n << 62n, 1n), 0, extended, false), 'compressed with a bitmap').toBe('invalid');
    expect(subclusterKind(entry(0x50000n | 1n), 0, standard, false)).toBe('zero');
  });

  it('compressed descriptors match the spec layout for every cluster size', () => {
    const rng = new Prng(seedFromEnv());
    for (let clusterBits = 9; clusterBits <= 21; clusterBits++) {
      const g = new Geometry(clusterBits, 4, false);
      const x = BigInt(62 - (clusterBits - 8));
      const maxOffset = 2 ** Math.min(Number(x), 53) - 1;
      for (let i = 0; i < 200; i++) {
        const hostOffset = i === 0 ? maxOffset - 2 ** clusterBits : rng.int(maxOffset - 2 ** clusterBits);
        const compressedBytes = 1 + rng.int(2 ** clusterBits);
        const e = makeCompressedEntry(hostOffset, compressedBytes, g);
        expect(isCompressed(e) && !isCopied(e)).toBe(true);
        const word = (BigInt(e.hi >>> 0) << 32n) | BigInt(e.lo >>> 0);
        const extraSectors = Math.floor((hostOffset + compressedBytes - 1) / 512) - Math.floor(hostOffset / 512);
        expect(word & ((1n << x) - 1n), `cluster_bits ${clusterBits}: offset field`).toBe(BigInt(hostOffset));
        expect((word >> x) & ((1n << BigInt(clusterBits - 8)) - 1n), `cluster_bits ${clusterBits}: sector count field`).toBe(BigInt(extraSectors));
        const d = decodeCompressed(e, g);
        expect(d.hostOffset).toBe(hostOffset);
        expect(d.nbSectors).toBe(extraSectors + 1);
        // The bytes to read run from the offset to the end of the last sector: they cover the stream.
        expect(d.compressedBytes).toBe(d.nbSectors * 512 - (hostOffset % 512));
        expect(d.compressedBytes).toBeGreaterThanOrEqual(compressedBytes);
        expect(d.compressedBytes - compressedBytes).toBeLessThan(512);
        const { firstHostCluster, lastHostCluster } = compressedClusterRange(d, g);
        expect(firstHostCluster).toBe(Math.floor(hostOffset / 2 ** clusterBits));
        expect(lastHostCluster).toBe(Math.floor((Math.floor(hostOffset / 512) * 512 + d.nbSectors * 512 - 1) / 2 ** clusterBits));
      }
    }
  });
});

describe('refcount entries', () => {
  it('refcount table entries round-trip; reserved bits and offsets past 2^53 are invalid', () => {
    const buf = Buffer.alloc(32);
    for (const offset of [0, 512, 2 ** 32, 2 ** 52]) {
      encodeReftableEntry(buf, 1, offset);
      expect(decodeReftableEntry(buf, 1)).toEqual({ refblockOffset: offset, invalid: false });
      expect(u64(buf, 8)).toBe(BigInt(offset));
    }
    buf.writeBigUInt64BE(0x10000n | 0x100n, 0);
    expect(decodeReftableEntry(buf, 0).invalid).toBe(true);
    buf.writeBigUInt64BE(1n << 60n, 0);
    expect(decodeReftableEntry(buf, 0).invalid).toBe(true);
  });

  for (let order = 0; order <= 6; order++) {
    const bits = 2 ** order;
    it(`refcount_order ${order} (${bits}-bit entries): values round-trip, neighbours untouched, spec bit layout`, () => {
      const rng = new Prng(seedFromEnv());
      const entries = (512 * 8) / bits;
      const block = Buffer.alloc(512);
      const expected: number[] = new Array<number>(entries).fill(0);
      const max = bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
      for (let i = 0; i < 2000; i++) {
        const index = rng.int(entries);
        const value = rng.chance(0.2) ? max : rng.int(Math.min(max, 2 ** 32) + 1);
        setRefcount(block, index, order, value);
        expected[index] = value;
      }
      expected.forEach((value, index) => expect(getRefcount(block, index, order)).toBe(value));
      // Independent decoding of the spec layout: entry i occupies bits [i*bits, (i+1)*bits); sub-byte
      // entries count from the least significant bit of their byte, wider ones are big-endian.
      const whole = BigInt(`0x${block.toString('hex')}`);
      expected.forEach((value, index) => {
        let field: bigint;
        if (bits < 8) {
          const byte = block[Math.floor((index * bits) / 8)];
          field = BigInt((byte >> ((index * bits) % 8)) & (2 ** bits - 1));
        } else {
          field = (whole >> BigInt((entries - 1 - index) * bits)) & ((1n << BigInt(bits)) - 1n);
        }
        expect(field, `entry ${index}`).toBe(BigInt(value));
      });
    });
  }

  it('a 64-bit refcount beyond 2^53 reads as Infinity, never truncated', () => {
    const block = Buffer.alloc(64);
    block.writeBigUInt64BE(2n ** 60n, 8);
    expect(getRefcount(block, 1, 6)).toBe(Number.POSITIVE_INFINITY);
  });
});

describe.skipIf(!hasQemu)('refcount blocks qemu-img wrote', () => {
  const tmp = useTempDir('codecs-refcount');
  for (let order = 0; order <= 6; order++) {
    it(`count every cluster of the file exactly once (refcount_bits ${2 ** order})`, async () => {
      const path = tmp.file('image.qcow2');
      await qemuImgCreate(path, 4 * 1024 * 1024, { cluster_size: 4096, refcount_bits: 2 ** order });
      await qemuIoOk(path, ['write -P 0x11 0 64k', 'write -P 0x22 1M 12k', 'write -P 0x33 3M 4k']);
      const file = await readFile(path);
      const g = new Geometry(12, order, false);
      const reftableOffset = Number(u64(file, 48));
      const reftableClusters = file.readUInt32BE(56);
      const counts: number[] = [];
      for (let ri = 0; ri < (reftableClusters * g.clusterSize) / 8; ri++) {
        const { refblockOffset, invalid } = decodeReftableEntry(file.subarray(reftableOffset), ri);
        expect(invalid).toBe(false);
        if (refblockOffset === 0) continue;
        const block = file.subarray(refblockOffset, refblockOffset + g.clusterSize);
        for (let i = 0; i < g.refblockEntries; i++) {
          const value = getRefcount(block, i, order);
          if (value !== 0) counts[ri * g.refblockEntries + i] = value;
        }
      }
      const fileClusters = Math.ceil(file.length / g.clusterSize);
      expect(counts.length, 'highest cluster with a refcount').toBe(fileClusters);
      expect(counts.filter((c) => c === 1).length, 'clusters with refcount 1').toBe(fileClusters);
    });
  }
});
