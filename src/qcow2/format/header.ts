/**
 * qcow2 header (v2 and v3) and header extensions: decode, validate, encode.
 *
 *   0  magic "QFI\xfb"              4  version (2|3)
 *   8  backing_file_offset (u64)   16  backing_file_size (u32)
 *  20  cluster_bits                24  size (u64, virtual bytes)
 *  32  crypt_method                36  l1_size (entries)
 *  40  l1_table_offset (u64)       48  refcount_table_offset (u64)
 *  56  refcount_table_clusters     60  nb_snapshots
 *  64  snapshots_offset (u64)
 *  v3: 72 incompatible_features (u64)  80 compatible_features (u64)  88 autoclear_features (u64)
 *      96 refcount_order  100 header_length  104 compression_type (u8, when header_length > 104)
 * Extensions follow the header (at header_length for v3, 72 for v2): {type u32, length u32, data
 * padded to 8}, ended by type 0. The backing file name follows them (backing_file_offset).
 */
import {
  COMPRESSION_ZLIB, COMPRESSION_ZSTD, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, EXT_END,
  EXT_FEATURE_TABLE, HEADER_V2_BYTES, HEADER_V3_BYTES, HEADER_V3_MIN_BYTES, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2, INCOMPAT_KNOWN_MASK, MAX_CLUSTER_BITS, MAX_REFCOUNT_ORDER,
  MIN_CLUSTER_BITS, QCOW2_MAGIC, QCOW_MAX_BACKING_FILE_NAME_BYTES, QCOW_MAX_L1_SIZE_BYTES,
  QCOW_MAX_REFTABLE_SIZE_BYTES, QCOW_MAX_SNAPSHOTS,
} from './constants.js';
import { Qcow2FormatError, Qcow2UnsupportedError } from './errors.js';
import { readU64, toSafeNumber, writeU64, hex } from './safe-int.js';

/** Byte offset of each header field (the table above), for code that rewrites one field in place. */
export const HEADER_FIELD = {
  magic: 0, version: 4, backingFileOffset: 8, backingFileBytes: 16, clusterBits: 20, virtualSize: 24, cryptMethod: 32,
  l1Entries: 36, l1TableOffset: 40, refcountTableOffset: 48, refcountTableClusters: 56, nbSnapshots: 60, snapshotsOffset: 64,
  incompatibleFeatures: 72, compatibleFeatures: 80, autoclearFeatures: 88, refcountOrder: 96, headerLength: 100, compressionType: 104,
} as const;

export interface FeatureName {
  type: 'incompatible' | 'compatible' | 'autoclear';
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  directoryBytes: number;
  directoryOffset: number;
}

export interface UnknownExtension {
  type: number;
  data: Buffer;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileBytes: number;
  clusterBits: number;
  virtualSize: number;
  cryptMethod: number;
  l1Entries: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  /** Feature bit sets, all 64 bits (an unknown incompatible bit refuses the open; autoclear bits we do not maintain are cleared on the first write). */
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  // Extensions
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  featureNames: FeatureName[];
  bitmaps?: BitmapsExtension;
  /** Crypto header extension (offset, length) when present. */
  crypto?: { offset: number; length: number };
  unknownExtensions: UnknownExtension[];
}

export function hasBit(features: bigint, bit: number): boolean {
  return ((features >> BigInt(bit)) & 1n) === 1n;
}

export function withBit(features: bigint, bit: number, on: boolean): bigint {
  const mask = 1n << BigInt(bit);
  return on ? features | mask : features & ~mask;
}

function u64Field(buf: Buffer, pos: number, image: string, field: string): number {
  const raw = readU64(buf, pos);
  const value = toSafeNumber(raw);
  if (value === undefined) {
    throw new Qcow2FormatError('EBADHEADER', `header field ${field} is out of range (${hex(raw)})`, { image, structure: 'header', field, value: hex(raw) });
  }
  return value;
}

function bad(image: string, field: string, value: unknown, message: string): Qcow2FormatError {
  return new Qcow2FormatError('EBADHEADER', `${message} (header field ${field} = ${String(value)})`, { image, structure: 'header', field, value });
}

/**
 * Decode the header from the first bytes of the image (at least the header and extension area: pass
 * the first cluster, or the whole file when shorter). `fileBytes` is the image file size.
 */
export function decodeHeader(buf: Buffer, image: string, fileBytes: number): Qcow2Header {
  if (buf.length < HEADER_V2_BYTES) {
    throw new Qcow2FormatError('ETRUNCATED', `file too short for a qcow2 header (${buf.length} bytes)`, { image, structure: 'header' });
  }
  const magic = buf.readUInt32BE(HEADER_FIELD.magic);
  if (magic !== QCOW2_MAGIC) {
    throw new Qcow2FormatError('EBADMAGIC', `not a qcow2 image (magic ${hex(magic)})`, { image, structure: 'header', field: 'magic', value: hex(magic) });
  }
  const version = buf.readUInt32BE(HEADER_FIELD.version);
  if (version !== 2 && version !== 3) {
    throw new Qcow2UnsupportedError('EBADVERSION', `unsupported qcow2 version ${version}`, { image, structure: 'header', field: 'version', value: version });
  }
  const clusterBits = buf.readUInt32BE(HEADER_FIELD.clusterBits);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw bad(image, 'cluster_bits', clusterBits, `unsupported cluster size 2^${clusterBits}`);
  }
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64Field(buf, HEADER_FIELD.backingFileOffset, image, 'backing_file_offset'),
    backingFileBytes: buf.readUInt32BE(HEADER_FIELD.backingFileBytes),
    clusterBits,
    virtualSize: u64Field(buf, HEADER_FIELD.virtualSize, image, 'size'),
    cryptMethod: buf.readUInt32BE(HEADER_FIELD.cryptMethod),
    l1Entries: buf.readUInt32BE(HEADER_FIELD.l1Entries),
    l1TableOffset: u64Field(buf, HEADER_FIELD.l1TableOffset, image, 'l1_table_offset'),
    refcountTableOffset: u64Field(buf, HEADER_FIELD.refcountTableOffset, image, 'refcount_table_offset'),
    refcountTableClusters: buf.readUInt32BE(HEADER_FIELD.refcountTableClusters),
    nbSnapshots: buf.readUInt32BE(HEADER_FIELD.nbSnapshots),
    snapshotsOffset: u64Field(buf, HEADER_FIELD.snapshotsOffset, image, 'snapshots_offset'),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: HEADER_V2_BYTES,
    compressionType: COMPRESSION_ZLIB,
    featureNames: [],
    unknownExtensions: [],
  };
  if (version === 3) {
    if (buf.length < HEADER_V3_MIN_BYTES) {
      throw new Qcow2FormatError('ETRUNCATED', `file too short for a qcow2 v3 header (${buf.length} bytes)`, { image, structure: 'header' });
    }
    h.incompatibleFeatures = readU64(buf, HEADER_FIELD.incompatibleFeatures);
    h.compatibleFeatures = readU64(buf, HEADER_FIELD.compatibleFeatures);
    h.autoclearFeatures = readU64(buf, HEADER_FIELD.autoclearFeatures);
    h.refcountOrder = buf.readUInt32BE(HEADER_FIELD.refcountOrder);
    h.headerLength = buf.readUInt32BE(HEADER_FIELD.headerLength);
    if (h.headerLength < HEADER_V3_MIN_BYTES) throw bad(image, 'header_length', h.headerLength, 'qcow2 header too short');
    if (h.headerLength > clusterSize) throw bad(image, 'header_length', h.headerLength, 'qcow2 header exceeds cluster size');
    if (h.headerLength % 8 !== 0) throw bad(image, 'header_length', h.headerLength, 'qcow2 header length is not a multiple of 8');
    if (h.headerLength > buf.length) throw new Qcow2FormatError('ETRUNCATED', `file too short for header_length ${h.headerLength}`, { image, structure: 'header' });
    if (h.headerLength > HEADER_V3_MIN_BYTES) h.compressionType = buf.readUInt8(HEADER_FIELD.compressionType);
  }
  if (h.backingFileOffset > clusterSize) throw bad(image, 'backing_file_offset', h.backingFileOffset, 'invalid backing file offset');
  decodeExtensions(buf, h, image, clusterSize);
  if (h.backingFileOffset !== 0) {
    if (h.backingFileBytes > QCOW_MAX_BACKING_FILE_NAME_BYTES || h.backingFileBytes > clusterSize - h.backingFileOffset) {
      throw bad(image, 'backing_file_size', h.backingFileBytes, 'backing file name too long');
    }
    if (h.backingFileOffset + h.backingFileBytes > buf.length) {
      throw new Qcow2FormatError('ETRUNCATED', 'backing file name lies past the end of the file', { image, structure: 'header', field: 'backing_file_offset' });
    }
    h.backingFile = buf.toString('utf8', h.backingFileOffset, h.backingFileOffset + h.backingFileBytes);
  }
  validateHeader(h, image, fileBytes);
  return h;
}

function decodeExtensions(buf: Buffer, h: Qcow2Header, image: string, clusterSize: number): void {
  const endBytes = Math.min(buf.length, h.backingFileOffset !== 0 ? h.backingFileOffset : clusterSize);
  let pos = h.version === 3 ? h.headerLength : HEADER_V2_BYTES;
  const seen = new Set<number>();
  while (pos + 8 <= endBytes) {
    const type = buf.readUInt32BE(pos);
    const length = buf.readUInt32BE(pos + 4);
    if (type === EXT_END) return;
    const dataPos = pos + 8;
    if (length > endBytes - dataPos) {
      throw new Qcow2FormatError('EBADHEADER', `header extension ${hex(type)} too large (${length} bytes)`, { image, structure: 'header-extension', hostOffset: pos, field: 'length', value: length });
    }
    const data = buf.subarray(dataPos, dataPos + length);
    if (seen.has(type) && type !== 0) {
      throw new Qcow2FormatError('EBADHEADER', `duplicate header extension ${hex(type)}`, { image, structure: 'header-extension', hostOffset: pos });
    }
    seen.add(type);
    switch (type) {
      case EXT_BACKING_FORMAT:
        h.backingFormat = data.toString('utf8').replace(/\0+$/, '');
        break;
      case EXT_DATA_FILE:
        h.dataFile = data.toString('utf8').replace(/\0+$/, '');
        break;
      case EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= length; i += 48) {
          const t = data.readUInt8(i);
          const name = data.toString('utf8', i + 2, i + 48).replace(/\0.*$/s, '');
          h.featureNames.push({ type: t === 0 ? 'incompatible' : t === 1 ? 'compatible' : 'autoclear', bit: data.readUInt8(i + 1), name });
        }
        break;
      case EXT_BITMAPS: {
        if (length < 24) throw new Qcow2FormatError('EBADHEADER', 'bitmaps extension too short', { image, structure: 'header-extension', hostOffset: pos });
        const directoryBytes = toSafeNumber(readU64(data, 8));
        const directoryOffset = toSafeNumber(readU64(data, 16));
        if (directoryBytes === undefined || directoryOffset === undefined) {
          throw new Qcow2FormatError('EBADHEADER', 'bitmaps extension out of range', { image, structure: 'header-extension', hostOffset: pos });
        }
        h.bitmaps = { nbBitmaps: data.readUInt32BE(0), directoryBytes, directoryOffset };
        break;
      }
      case EXT_CRYPTO: {
        if (length < 16) throw new Qcow2FormatError('EBADHEADER', 'crypto extension too short', { image, structure: 'header-extension', hostOffset: pos });
        h.crypto = { offset: toSafeNumber(readU64(data, 0)) ?? -1, length: toSafeNumber(readU64(data, 8)) ?? -1 };
        break;
      }
      default:
        h.unknownExtensions.push({ type, data: Buffer.from(data) });
    }
    pos = dataPos + Math.ceil(length / 8) * 8;
  }
}

/** The name of a feature bit from the image's feature name table, or a generic description. */
export function featureName(h: Qcow2Header, type: FeatureName['type'], bit: number): string {
  return h.featureNames.find((f) => f.type === type && f.bit === bit)?.name ?? `unknown ${type} feature bit ${bit}`;
}

function validateTable(image: string, field: string, offset: number, bytes: number, maxBytes: number, clusterSize: number, fileBytes: number): void {
  if (bytes > maxBytes) throw bad(image, field, offset, `${field.replace(/_offset$/, '')} too large (${bytes} bytes)`);
  if (offset % clusterSize !== 0) throw bad(image, field, offset, `${field} is not cluster aligned`);
  if (bytes > 0 && offset + bytes > fileBytes) throw bad(image, field, offset, `${field.replace(/_offset$/, '')} lies past the end of the file (${fileBytes} bytes)`);
}

/** QEMU's open-time checks (qcow2_do_open), each failure a coded error naming the field. */
function validateHeader(h: Qcow2Header, image: string, fileBytes: number): void {
  const clusterSize = 2 ** h.clusterBits;
  const unknownIncompat = h.incompatibleFeatures & ~BigInt(INCOMPAT_KNOWN_MASK);
  if (unknownIncompat !== 0n) {
    const names: string[] = [];
    for (let bit = 0; bit < 64; bit++) if (hasBit(unknownIncompat, bit)) names.push(featureName(h, 'incompatible', bit));
    throw new Qcow2UnsupportedError('EUNSUPPORTED', `unsupported qcow2 feature(s): ${names.join(', ')}`, { image, structure: 'header', field: 'incompatible_features', value: hex(h.incompatibleFeatures) });
  }
  if (h.cryptMethod !== 0 || h.crypto) {
    throw new Qcow2UnsupportedError('EUNSUPPORTED', `encrypted images are not supported (crypt_method ${h.cryptMethod})`, { image, structure: 'header', field: 'crypt_method', value: h.cryptMethod });
  }
  if (h.refcountOrder > MAX_REFCOUNT_ORDER) throw bad(image, 'refcount_order', h.refcountOrder, 'refcount order too large');
  if (h.version === 2 && h.refcountOrder !== 4) throw bad(image, 'refcount_order', h.refcountOrder, 'version 2 images need 16-bit refcounts');
  if (hasBit(h.incompatibleFeatures, INCOMPAT_COMPRESSION)) {
    if (h.compressionType !== COMPRESSION_ZSTD) throw bad(image, 'compression_type', h.compressionType, 'unknown compression type');
  } else if (h.compressionType !== COMPRESSION_ZLIB) {
    throw bad(image, 'compression_type', h.compressionType, 'compression type set without the compression incompatible bit');
  }
  if (hasBit(h.incompatibleFeatures, INCOMPAT_EXTL2) && h.clusterBits < 14) {
    throw bad(image, 'cluster_bits', h.clusterBits, 'extended L2 entries need clusters of 16 KiB or more');
  }
  if (hasBit(h.incompatibleFeatures, INCOMPAT_DATA_FILE) && h.dataFile === undefined) {
    // QEMU accepts a missing name when the user supplies one; we have no such option.
    throw new Qcow2UnsupportedError('EUNSUPPORTED', 'image uses an external data file but has no data file name extension', { image, structure: 'header', field: 'data_file' });
  }
  if (h.virtualSize > 2 ** 53 - clusterSize) throw bad(image, 'size', h.virtualSize, 'virtual size too large');
  const l2CoverageBytes = (clusterSize / (hasBit(h.incompatibleFeatures, INCOMPAT_EXTL2) ? 16 : 8)) * clusterSize;
  if (h.l1Entries > QCOW_MAX_L1_SIZE_BYTES / 8) throw bad(image, 'l1_size', h.l1Entries, 'active L1 table too large');
  if (h.l1Entries < Math.ceil(h.virtualSize / l2CoverageBytes)) throw bad(image, 'l1_size', h.l1Entries, 'L1 table is too small for the virtual size');
  validateTable(image, 'l1_table_offset', h.l1TableOffset, h.l1Entries * 8, QCOW_MAX_L1_SIZE_BYTES, clusterSize, fileBytes);
  if (h.refcountTableClusters === 0) throw bad(image, 'refcount_table_clusters', 0, 'image does not contain a reference count table');
  validateTable(image, 'refcount_table_offset', h.refcountTableOffset, h.refcountTableClusters * clusterSize, QCOW_MAX_REFTABLE_SIZE_BYTES, clusterSize, fileBytes);
  if (h.nbSnapshots > QCOW_MAX_SNAPSHOTS) throw bad(image, 'nb_snapshots', h.nbSnapshots, 'too many snapshots');
  if (h.nbSnapshots > 0) {
    if (h.snapshotsOffset % clusterSize !== 0) throw bad(image, 'snapshots_offset', h.snapshotsOffset, 'snapshot table is not cluster aligned');
    if (h.snapshotsOffset + 40 > fileBytes) throw bad(image, 'snapshots_offset', h.snapshotsOffset, 'snapshot table lies past the end of the file');
  }
  if (h.bitmaps && !hasBit(h.autoclearFeatures, 0)) delete h.bitmaps; // stale extension: ignored, as QEMU does
}

export function isDirty(h: Qcow2Header): boolean {
  return hasBit(h.incompatibleFeatures, INCOMPAT_DIRTY);
}

export function isCorrupt(h: Qcow2Header): boolean {
  return hasBit(h.incompatibleFeatures, INCOMPAT_CORRUPT);
}

function pushExtension(parts: Buffer[], type: number, data: Buffer): void {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(type, 0);
  head.writeUInt32BE(data.length, 4);
  parts.push(head, data, Buffer.alloc((8 - (data.length % 8)) % 8));
}

/**
 * Encode the header, its extensions and the backing file name as QEMU lays them out in the first
 * cluster. Updates `backingFileOffset/backingFileBytes` in the returned header copy. Throws if the
 * result does not fit in one cluster.
 */
export function encodeHeader(header: Qcow2Header, image: string): { bytes: Buffer; header: Qcow2Header } {
  const h = { ...header };
  const clusterSize = 2 ** h.clusterBits;
  const fixedBytes = h.version === 3 ? HEADER_V3_BYTES : HEADER_V2_BYTES;
  if (h.version === 3) h.headerLength = HEADER_V3_BYTES;
  const parts: Buffer[] = [];
  const fixed = Buffer.alloc(fixedBytes);
  parts.push(fixed);
  if (h.version === 3) {
    if (h.backingFormat !== undefined) pushExtension(parts, EXT_BACKING_FORMAT, Buffer.from(h.backingFormat, 'utf8'));
    if (h.dataFile !== undefined) pushExtension(parts, EXT_DATA_FILE, Buffer.from(h.dataFile, 'utf8'));
    if (h.featureNames.length > 0) {
      const table = Buffer.alloc(48 * h.featureNames.length);
      h.featureNames.forEach((f, i) => {
        table.writeUInt8(f.type === 'incompatible' ? 0 : f.type === 'compatible' ? 1 : 2, i * 48);
        table.writeUInt8(f.bit, i * 48 + 1);
        table.write(f.name.slice(0, 46), i * 48 + 2, 'utf8');
      });
      pushExtension(parts, EXT_FEATURE_TABLE, table);
    }
    if (h.bitmaps) {
      const d = Buffer.alloc(24);
      d.writeUInt32BE(h.bitmaps.nbBitmaps, 0);
      writeU64(d, 8, h.bitmaps.directoryBytes);
      writeU64(d, 16, h.bitmaps.directoryOffset);
      pushExtension(parts, EXT_BITMAPS, d);
    }
    for (const ext of h.unknownExtensions) pushExtension(parts, ext.type, ext.data);
  } else if (h.backingFormat !== undefined) {
    pushExtension(parts, EXT_BACKING_FORMAT, Buffer.from(h.backingFormat, 'utf8'));
  }
  pushExtension(parts, EXT_END, Buffer.alloc(0));
  const name = h.backingFile !== undefined ? Buffer.from(h.backingFile, 'utf8') : undefined;
  const extensionsEnd = parts.reduce((n, p) => n + p.length, 0);
  h.backingFileOffset = name ? extensionsEnd : 0;
  h.backingFileBytes = name ? name.length : 0;
  if (name) parts.push(name);
  if (extensionsEnd + h.backingFileBytes > clusterSize) {
    throw new Qcow2FormatError('EBADHEADER', `header and extensions (${extensionsEnd + h.backingFileBytes} bytes) do not fit in one cluster`, { image, structure: 'header' });
  }
  fixed.writeUInt32BE(QCOW2_MAGIC, HEADER_FIELD.magic);
  fixed.writeUInt32BE(h.version, HEADER_FIELD.version);
  writeU64(fixed, HEADER_FIELD.backingFileOffset, h.backingFileOffset);
  fixed.writeUInt32BE(h.backingFileBytes, HEADER_FIELD.backingFileBytes);
  fixed.writeUInt32BE(h.clusterBits, HEADER_FIELD.clusterBits);
  writeU64(fixed, HEADER_FIELD.virtualSize, h.virtualSize);
  fixed.writeUInt32BE(h.cryptMethod, HEADER_FIELD.cryptMethod);
  fixed.writeUInt32BE(h.l1Entries, HEADER_FIELD.l1Entries);
  writeU64(fixed, HEADER_FIELD.l1TableOffset, h.l1TableOffset);
  writeU64(fixed, HEADER_FIELD.refcountTableOffset, h.refcountTableOffset);
  fixed.writeUInt32BE(h.refcountTableClusters, HEADER_FIELD.refcountTableClusters);
  fixed.writeUInt32BE(h.nbSnapshots, HEADER_FIELD.nbSnapshots);
  writeU64(fixed, HEADER_FIELD.snapshotsOffset, h.snapshotsOffset);
  if (h.version === 3) {
    writeU64(fixed, HEADER_FIELD.incompatibleFeatures, h.incompatibleFeatures);
    writeU64(fixed, HEADER_FIELD.compatibleFeatures, h.compatibleFeatures);
    writeU64(fixed, HEADER_FIELD.autoclearFeatures, h.autoclearFeatures);
    fixed.writeUInt32BE(h.refcountOrder, HEADER_FIELD.refcountOrder);
    fixed.writeUInt32BE(h.headerLength, HEADER_FIELD.headerLength);
    fixed.writeUInt8(h.compressionType, HEADER_FIELD.compressionType);
  }
  return { bytes: Buffer.concat(parts), header: h };
}

/** Feature names QEMU writes into new images (so tools can name bits they do not know). */
export const STANDARD_FEATURE_NAMES: FeatureName[] = [
  { type: 'incompatible', bit: INCOMPAT_DIRTY, name: 'dirty bit' },
  { type: 'incompatible', bit: INCOMPAT_CORRUPT, name: 'corrupt bit' },
  { type: 'incompatible', bit: INCOMPAT_DATA_FILE, name: 'external data file' },
  { type: 'incompatible', bit: INCOMPAT_COMPRESSION, name: 'compression type' },
  { type: 'incompatible', bit: INCOMPAT_EXTL2, name: 'extended L2 entries' },
  { type: 'compatible', bit: 0, name: 'lazy refcounts' },
  { type: 'autoclear', bit: 0, name: 'bitmaps' },
  { type: 'autoclear', bit: 1, name: 'raw external data' },
];
