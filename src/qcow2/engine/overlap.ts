/**
 * Metadata region map and the pre-write overlap check (QEMU's qcow2_check_metadata_overlap): no data
 * or table write may land on live metadata other than the structure it is meant for.
 */
export type MetadataKind = 'header' | 'l1' | 'l2' | 'reftable' | 'refblock' | 'snapshot-table' | 'snapshot-l1';

export class MetadataMap {
  private readonly clusterSize: number;
  /** Cluster index → kind, for every cluster that holds live metadata. */
  private readonly clusters = new Map<number, MetadataKind>();

  constructor(clusterSize: number) {
    this.clusterSize = clusterSize;
  }

  add(kind: MetadataKind, hostOffset: number, bytes: number): void {
    const first = Math.floor(hostOffset / this.clusterSize);
    const last = Math.floor((hostOffset + Math.max(bytes, 1) - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) this.clusters.set(c, kind);
  }

  remove(hostOffset: number, bytes: number): void {
    const first = Math.floor(hostOffset / this.clusterSize);
    const last = Math.floor((hostOffset + Math.max(bytes, 1) - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) this.clusters.delete(c);
  }

  /** The metadata kind overlapping [hostOffset, +bytes), ignoring `allowed`; undefined when none. */
  overlaps(hostOffset: number, bytes: number, allowed?: MetadataKind): { kind: MetadataKind; clusterOffset: number } | undefined {
    if (this.clusters.size === 0) return undefined;
    const first = Math.floor(hostOffset / this.clusterSize);
    const last = Math.floor((hostOffset + Math.max(bytes, 1) - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) {
      const kind = this.clusters.get(c);
      if (kind !== undefined && kind !== allowed) return { kind, clusterOffset: c * this.clusterSize };
    }
    return undefined;
  }

  /** Forget every region (before re-registering all metadata after a repair). */
  clear(): void {
    this.clusters.clear();
  }

  kindAt(clusterIndex: number): MetadataKind | undefined {
    return this.clusters.get(clusterIndex);
  }
}
