/**
 * qcow2 on-disk constants (reference/qcow2-spec.txt). Bit positions are given as numbers; masks on
 * 64-bit fields are applied to 32-bit halves or BigInts, never to a JS number above 2^32.
 */

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"

export const HEADER_V2_BYTES = 72;
export const HEADER_V3_MIN_BYTES = 104;
/** Length of the v3 header we write: up to and including compression_type, padded to 8. */
export const HEADER_V3_BYTES = 112;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const MAX_REFCOUNT_ORDER = 6;

/** QEMU's limits (block/qcow2.h). */
export const QCOW_MAX_L1_SIZE_BYTES = 32 * 1024 * 1024;
export const QCOW_MAX_REFTABLE_SIZE_BYTES = 8 * 1024 * 1024;
export const QCOW_MAX_SNAPSHOTS = 65536;
export const QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024;
/** QEMU refuses backing file names longer than this. */
export const QCOW_MAX_BACKING_FILE_NAME_BYTES = 1023;

/** Incompatible feature bits. */
export const INCOMPAT_DIRTY = 0;
export const INCOMPAT_CORRUPT = 1;
export const INCOMPAT_DATA_FILE = 2;
export const INCOMPAT_COMPRESSION = 3;
export const INCOMPAT_EXTL2 = 4;
export const INCOMPAT_KNOWN_MASK = 0b11111;

/** Compatible feature bits. */
export const COMPAT_LAZY_REFCOUNTS = 0;

/** Autoclear feature bits. */
export const AUTOCLEAR_BITMAPS = 0;
export const AUTOCLEAR_DATA_FILE_RAW = 1;

export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;

/** Header extension types. */
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

/** Entry flag bits in the high 32-bit word of a 64-bit L1/L2 entry. */
export const HI_COPIED = 0x80000000; // bit 63
export const HI_COMPRESSED = 0x40000000; // bit 62
/** Bit 0 of an L2 entry (in the low word): reads as zeros (v3). */
export const LO_ZERO = 0x1;
/** Bits 9–55 of an L1/L2 entry: the host offset (high word part: bits 32–55). */
export const HI_OFFSET_MASK = 0x00ffffff;
export const LO_OFFSET_MASK = 0xfffffe00;

/** Extended L2: subclusters per cluster. */
export const SUBCLUSTERS_PER_CLUSTER = 32;

/** Snapshot table entry fixed part. */
export const SNAPSHOT_HEADER_BYTES = 40;

/** QEMU's default cache limits. */
export const DEFAULT_L2_CACHE_MAX_BYTES = 32 * 1024 * 1024;
export const DEFAULT_L2_SLICE_BYTES = 4096;
export const MIN_REFCOUNT_CACHE_TABLES = 4;

/** The deepest backing chain we follow. */
export const MAX_BACKING_DEPTH = 16;
