/**
 * Internal snapshots, read side: list them, and open a read-only view of one — the guest contents as
 * they were when it was taken — by reading through the snapshot's own L1 table (QEMU's
 * qcow2_snapshot_load_tmp, which `qemu-img convert -l` uses).
 *
 * A view shares everything else with its image: the file, the L2 cache (a table shared with a
 * snapshot is never changed in place: the active layer copies it before a write), the metadata lock,
 * the decompressed-cluster cache and the backing chain. Ranges the snapshot's L1 does not map read
 * from the backing file, or as zeros.
 */
import type { BlockDevice, SnapshotSummary } from './block-device.js';
import { ClusterMap, type L1Table } from './cluster-map.js';
import { readIntoMap } from './read.js';
import { QCOW_MAX_L1_SIZE_BYTES } from '../format/constants.js';
import { CodedError, Qcow2FormatError, Qcow2RangeError, Qcow2ReadOnlyError } from '../format/errors.js';
import { imageState, type Qcow2Image } from './image.js';
import type { ImageState } from './state.js';
import { clusterKind, compressedClusterRange, decodeCompressed, readL2Entry } from '../format/l2-entry.js';
import type { SnapshotEntry } from '../format/snapshot-table.js';

/** The snapshots of an image, in table order; the size is the guest size recorded at snapshot time. */
export function listSnapshots(qcow2: Qcow2Image): SnapshotSummary[] {
  const image = imageState(qcow2);
  return image.snapshots.map((s) => ({ id: s.id, name: s.name, virtualSize: s.diskSize ?? image.virtualSize }));
}

/** Which snapshot: an id or a name (a plain string: the id if one matches, else the name, as QEMU looks up). */
export type SnapshotRef = string | { id: string } | { name: string };

function describeRef(ref: SnapshotRef): string {
  if (typeof ref === 'string') return `id or name '${ref}'`;
  return 'id' in ref ? `id '${ref.id}'` : `name '${ref.name}'`;
}

/** The snapshot `ref` designates, or undefined. */
export function findSnapshot(image: Qcow2Image, ref: SnapshotRef): SnapshotEntry | undefined {
  return findSnapshotEntry(imageState(image).snapshots, ref);
}

/** The entry of `snapshots` that `ref` designates, or undefined. */
export function findSnapshotEntry(snapshots: readonly SnapshotEntry[], ref: SnapshotRef): SnapshotEntry | undefined {
  if (typeof ref !== 'string') return snapshots.find((s) => ('id' in ref ? s.id === ref.id : s.name === ref.name));
  return snapshots.find((s) => s.id === ref) ?? snapshots.find((s) => s.name === ref);
}

export interface SnapshotViewOptions {
  /**
   * Guest size of the view. Default: the size recorded in the snapshot (else the image's). `qemu-img
   * convert -l` keeps the image's current size; pass `image.virtualSize` to read exactly as it does.
   */
  virtualSizeBytes?: number;
}

/** A read-only BlockDevice over one internal snapshot. */
const viewStates = new WeakMap<SnapshotView, ImageState>();

/** The state of the image a snapshot view reads, for the code of src/qcow2 (seek, map); not public API. */
export function snapshotViewState(view: SnapshotView): ImageState {
  const s = viewStates.get(view);
  if (s === undefined) throw new TypeError('not a SnapshotView');
  return s;
}

export class SnapshotView implements BlockDevice {
  private readonly image: ImageState;
  readonly snapshot: SnapshotEntry;
  readonly map: ClusterMap;
  readonly virtualSize: number;
  readonly readOnly = true;
  private closed = false;

  constructor(image: ImageState, snapshot: SnapshotEntry, map: ClusterMap, virtualSizeBytes: number) {
    this.image = image;
    viewStates.set(this, image);
    this.snapshot = snapshot;
    this.map = map;
    this.virtualSize = virtualSizeBytes;
  }

  private checkOpen(): void {
    if (this.closed) throw new CodedError('EBADF', `${this.image.path}: snapshot view '${this.snapshot.name}' is closed`, { image: this.image.path });
  }

  async read(guestOffset: number, bytes: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(bytes);
    await this.readInto(guestOffset, buf);
    return buf;
  }

  /** Fill `buf` with the snapshot's guest bytes at `guestOffset` (inside the view's size). */
  async readInto(guestOffset: number, buf: Buffer): Promise<void> {
    this.checkOpen();
    if (!Number.isSafeInteger(guestOffset) || guestOffset < 0 || guestOffset + buf.length > this.virtualSize) {
      throw new Qcow2RangeError(this.image.path, `request [${guestOffset}, +${buf.length}) outside snapshot '${this.snapshot.name}' (${this.virtualSize} bytes)`);
    }
    if (buf.length > 0) await readIntoMap(this.image, this.map, guestOffset, buf, false);
  }

  private refuse(): never {
    throw new Qcow2ReadOnlyError(this.image.path, `snapshot '${this.snapshot.name}' is a read-only view`);
  }

  async write(_guestOffset: number, _data: Uint8Array): Promise<void> { this.refuse(); }
  async writeZeroes(_guestOffset: number, _bytes: number): Promise<void> { this.refuse(); }
  async discard(_guestOffset: number, _bytes: number): Promise<void> { this.refuse(); }
  async resize(_newVirtualSize: number): Promise<void> { this.refuse(); }
  async flush(): Promise<void> { this.checkOpen(); }

  /** Host bytes the snapshot references: its L1 and L2 tables and its data clusters (compressed: their sectors). */
  async allocatedBytes(): Promise<number> {
    this.checkOpen();
    const image = this.image;
    const g = image.geometry;
    let bytes = Math.ceil((this.map.l1.entries * 8) / g.clusterSize) * g.clusterSize;
    for (const { l2Offset } of this.map.l2Tables()) {
      bytes += g.clusterSize;
      for (let slice = 0; slice < g.l2Entries / g.l2SliceEntries; slice++) {
        bytes += await image.lock.run(async () => {
          const h = await image.l2Cache.get(l2Offset + slice * g.l2SliceBytes);
          try {
            let n = 0;
            for (let i = 0; i < g.l2SliceEntries; i++) {
              const e = readL2Entry(h.buf, i, g);
              const kind = clusterKind(e, g, image.hasDataFile);
              if (kind === 'compressed') {
                const range = compressedClusterRange(decodeCompressed(e, g), g);
                n += (range.lastHostCluster - range.firstHostCluster + 1) * g.clusterSize;
              } else if ((kind === 'normal' || kind === 'zero-alloc') && !image.hasDataFile) {
                n += g.clusterSize;
              }
            }
            return n;
          } finally {
            image.l2Cache.release(h);
          }
        });
      }
    }
    return bytes;
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}

/**
 * Open a read-only view of snapshot `ref`. Its L1 table is validated
 * as QEMU does (size limit, cluster alignment, inside the file) and read once.
 */
export async function openSnapshotView(image: Qcow2Image, ref: SnapshotRef, options: SnapshotViewOptions = {}): Promise<SnapshotView> {
  return openSnapshotViewOf(imageState(image), ref, options);
}

/** openSnapshotView on the image's state (snapshot operations, under the image's drained section). */
export async function openSnapshotViewOf(image: ImageState, ref: SnapshotRef, options: SnapshotViewOptions = {}): Promise<SnapshotView> {
  const snapshot = findSnapshotEntry(image.snapshots, ref);
  if (!snapshot) {
    throw new CodedError('ENOENT', `${image.path}: no snapshot with ${describeRef(ref)}`, { image: image.path, snapshot: describeRef(ref) });
  }
  const g = image.geometry;
  const l1Bytes = snapshot.l1Entries * 8;
  const where = { image: image.path, structure: 'snapshot-l1', hostOffset: snapshot.l1TableOffset, field: 'l1_table_offset', value: snapshot.l1TableOffset };
  if (l1Bytes > QCOW_MAX_L1_SIZE_BYTES) {
    throw new Qcow2FormatError('EBADSNAPSHOT', `snapshot '${snapshot.name}': L1 table too large (${snapshot.l1Entries} entries)`, where);
  }
  if (snapshot.l1TableOffset % g.clusterSize !== 0) {
    throw new Qcow2FormatError('EBADSNAPSHOT', `snapshot '${snapshot.name}': L1 table offset ${snapshot.l1TableOffset} is not cluster aligned`, where);
  }
  const fileBytes = await image.file.size();
  if (l1Bytes > 0 && snapshot.l1TableOffset + l1Bytes > fileBytes) {
    throw new Qcow2FormatError('EBADSNAPSHOT', `snapshot '${snapshot.name}': L1 table lies past the end of the file (${fileBytes} bytes)`, where);
  }
  const buf = Buffer.alloc(Math.max(l1Bytes, 8));
  if (l1Bytes > 0) (await image.readHost(snapshot.l1TableOffset, l1Bytes)).copy(buf);
  const l1: L1Table = { offset: snapshot.l1TableOffset, entries: snapshot.l1Entries, buf };
  const map = new ClusterMap(image.activeMap.ctx, l1, false);
  const virtualSizeBytes = options.virtualSizeBytes ?? snapshot.diskSize ?? image.virtualSize;
  return new SnapshotView(image, snapshot, map, virtualSizeBytes);
}
