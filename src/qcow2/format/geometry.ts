import { QCOW_MAX_L1_SIZE_BYTES, SUBCLUSTERS_PER_CLUSTER } from './constants.js';

/**
 * All offset → index arithmetic of an image, in one place. Offsets are numbers (≤ 2^53), so only
 * division and multiplication are used — no bitwise operators on anything wider than 31 bits.
 */
export class Geometry {
  readonly clusterBits: number;
  readonly clusterSize: number;
  /** Bytes per L2 entry: 8, or 16 with extended L2. */
  readonly l2EntryBytes: number;
  readonly extendedL2: boolean;
  /** L2 entries per (full-cluster) L2 table. */
  readonly l2Entries: number;
  /** Bytes of an L2 cache slice (≤ cluster size). */
  readonly l2SliceBytes: number;
  readonly l2SliceEntries: number;
  readonly subclustersPerCluster: number;
  readonly subclusterSize: number;
  readonly refcountOrder: number;
  readonly refcountBits: number;
  /** Refcount entries per refcount block. */
  readonly refblockEntries: number;

  constructor(clusterBits: number, refcountOrder: number, extendedL2: boolean, l2SliceBytes?: number) {
    this.clusterBits = clusterBits;
    this.clusterSize = 2 ** clusterBits;
    this.extendedL2 = extendedL2;
    this.l2EntryBytes = extendedL2 ? 16 : 8;
    this.l2Entries = this.clusterSize / this.l2EntryBytes;
    this.l2SliceBytes = Math.min(this.clusterSize, l2SliceBytes ?? this.clusterSize);
    this.l2SliceEntries = this.l2SliceBytes / this.l2EntryBytes;
    this.subclustersPerCluster = extendedL2 ? SUBCLUSTERS_PER_CLUSTER : 1;
    this.subclusterSize = this.clusterSize / this.subclustersPerCluster;
    this.refcountOrder = refcountOrder;
    this.refcountBits = 2 ** refcountOrder;
    this.refblockEntries = (this.clusterSize * 8) / this.refcountBits;
  }

  /** Bytes of guest space one L2 table maps. */
  get l2CoverageBytes(): number {
    return this.l2Entries * this.clusterSize;
  }

  clusterIndex(offset: number): number {
    return Math.floor(offset / this.clusterSize);
  }

  offsetInCluster(offset: number): number {
    return offset % this.clusterSize;
  }

  startOfCluster(offset: number): number {
    return offset - (offset % this.clusterSize);
  }

  isClusterAligned(offset: number): boolean {
    return offset % this.clusterSize === 0;
  }

  sizeToClusters(bytes: number): number {
    return Math.ceil(bytes / this.clusterSize);
  }

  l1Index(guestOffset: number): number {
    return Math.floor(guestOffset / this.l2CoverageBytes);
  }

  l2Index(guestOffset: number): number {
    return Math.floor(guestOffset / this.clusterSize) % this.l2Entries;
  }

  /** Index of the L2 slice (within its table) that holds the entry for guestOffset. */
  l2SliceIndex(guestOffset: number): number {
    return Math.floor(this.l2Index(guestOffset) / this.l2SliceEntries);
  }

  /** Index of the entry within its slice. */
  l2IndexInSlice(guestOffset: number): number {
    return this.l2Index(guestOffset) % this.l2SliceEntries;
  }

  subclusterIndex(guestOffset: number): number {
    return Math.floor((guestOffset % this.clusterSize) / this.subclusterSize);
  }

  /** L1 entries needed to map a virtual disk of `virtualSize` bytes. */
  l1EntriesFor(virtualSize: number): number {
    return Math.ceil(virtualSize / this.l2CoverageBytes);
  }

  /** Largest L1 QEMU accepts, in entries. */
  get maxL1Entries(): number {
    return QCOW_MAX_L1_SIZE_BYTES / 8;
  }

  reftableIndex(clusterIndex: number): number {
    return Math.floor(clusterIndex / this.refblockEntries);
  }

  refblockIndex(clusterIndex: number): number {
    return clusterIndex % this.refblockEntries;
  }

  /** Bytes of host space one refcount block describes. */
  get refblockCoverageBytes(): number {
    return this.refblockEntries * this.clusterSize;
  }

  /** Largest refcount value an entry can hold. */
  get maxRefcount(): number {
    return this.refcountBits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** this.refcountBits - 1;
  }
}
