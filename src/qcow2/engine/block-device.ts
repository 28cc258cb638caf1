/**
 * BlockDevice: what the FUSE layer and the CLI see of an open image (Qcow2Image implements it).
 * Guest offsets and lengths in bytes.
 */
export interface BlockDevice {
  /** Virtual (guest) size in bytes. */
  readonly virtualSize: number;
  readonly readOnly: boolean;
  /** Read `bytes` at `guestOffset`; ranges past the end are an error (ERANGE-coded). */
  read(guestOffset: number, bytes: number): Promise<Buffer>;
  /** Write `data` at `guestOffset`. */
  write(guestOffset: number, data: Uint8Array): Promise<void>;
  /** Make [guestOffset, +bytes) read as zeros. */
  writeZeroes(guestOffset: number, bytes: number): Promise<void>;
  /** Hint that [guestOffset, +bytes) is unused; reads afterwards return zeros (or backing data). */
  discard(guestOffset: number, bytes: number): Promise<void>;
  /** Make everything written so far durable. */
  flush(): Promise<void>;
  /** Change the virtual size (shrinking frees clusters past the new end). */
  resize(newVirtualSize: number): Promise<void>;
  /** Bytes of host storage allocated for this image (for st_blocks / du). */
  allocatedBytes(): Promise<number>;
  /** Flush, unlock and close. Idempotent. */
  close(): Promise<void>;
}

/** What lseek(2) SEEK_DATA / SEEK_HOLE look for. */
export type SeekTarget = 'data' | 'hole';

/** A block device that can tell where its data and its holes are. */
export interface SeekableDevice extends BlockDevice {
  /**
   * The first guest offset ≥ `guestOffset` where `target` starts: data is what `qemu-img map` shows
   * as "data": true (a backing file's data included), holes are zero or unallocated ranges with
   * nothing below. Undefined when no data follows; the virtual size when no hole comes before it.
   */
  seek(guestOffset: number, target: SeekTarget): Promise<number | undefined>;
}

/** One extent as `qemu-img map --output=json` prints it. */
export interface MapExtent {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  compressed: boolean;
  /** Host offset, present only for uncompressed allocated data in the top-level file (qemu's "offset"). */
  offset?: number;
}

/** What one host cluster (or run of clusters) of the image file holds, for layout.txt. */
export interface LayoutEntry {
  hostOffset: number;
  bytes: number;
  kind: 'header' | 'l1' | 'l2' | 'reftable' | 'refblock' | 'snapshot-table' | 'snapshot-l1' | 'data' | 'compressed' | 'free' | 'extension' | 'unknown';
  /** Guest offset served by this data cluster (or the first guest cluster of a compressed host cluster). */
  guestOffset?: number;
  /** Free-form detail (e.g. "3 chunks", "refcount 2"). */
  note?: string;
}

/** The result of a consistency check, with qemu-img check's JSON keys. */
export interface CheckReport {
  filename: string;
  format: 'qcow2';
  'check-errors': number;
  'corruptions'?: number;
  'leaks'?: number;
  'corruptions-fixed'?: number;
  'leaks-fixed'?: number;
  'image-end-offset'?: number;
  'total-clusters'?: number;
  'allocated-clusters'?: number;
  'fragmented-clusters'?: number;
  'compressed-clusters'?: number;
}

export interface SnapshotSummary {
  id: string;
  name: string;
  virtualSize: number;
}

/** A block device that can also describe itself (what the mount's inspection files show). */
export interface InspectableDevice extends SeekableDevice {
  /**
   * Make [guestOffset, +bytes) read as zeros, exactly there (partial clusters at the edges keep the
   * rest of their bytes); with `unmap`, release the storage where the format allows (a punched hole),
   * without it keep the range described as zeros. Never lets a backing file show through.
   */
  zeroRange(guestOffset: number, bytes: number, unmap: boolean): Promise<void>;
  /** The same object `qemu-img info --output=json` prints. */
  infoJson(): Promise<Record<string, unknown>>;
  /** Extents as `qemu-img map --output=json`, in guest order, streamed. */
  mapExtents(): AsyncIterable<MapExtent>;
  /** Every host cluster of the image file, in host order, streamed. */
  layout(): AsyncIterable<LayoutEntry>;
  /** Run a read-only consistency check on the live image. */
  check(): Promise<CheckReport>;
  listSnapshots(): SnapshotSummary[];
  /** A read-only view of an internal snapshot's guest contents. */
  openSnapshot(name: string): Promise<SeekableDevice>;
}
