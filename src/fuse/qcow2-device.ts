/**
 * A qcow2 image as the InspectableDevice a mount serves: Qcow2Image for the data path, and the
 * driver's inspection functions (the same ones `qcow2fuse info/map/check` use, so the mount's
 * inspection files say what the commands say) for info.json, map.json, layout.txt, check.json and
 * the snapshot views. Host-file facts (actual-size, holes) come from one allocation probe per mount,
 * closed with the image. SEEK_DATA/SEEK_HOLE and exact zeroing (fallocate) come from the driver's
 * seek and zero-range tools, on the image and on snapshot views alike.
 */
import type { CheckReport, InspectableDevice, LayoutEntry, MapExtent, SeekableDevice, SeekTarget, SnapshotSummary } from '../qcow2/engine/block-device.js';
import { nodeHostAllocationProbe, type HostAllocationProbe } from '../io/host-allocation.js';
import { checkImage } from '../qcow2/check/check.js';
import { Qcow2Image } from '../qcow2/engine/image.js';
import { imageInfo } from '../qcow2/tools/info.js';
import { layout } from '../qcow2/tools/layout.js';
import { mapExtents } from '../qcow2/tools/map.js';
import { listSnapshots, openSnapshotView, type SnapshotView } from '../qcow2/engine/snapshot.js';
import { seekAllocation } from '../qcow2/tools/seek.js';
import { zeroRange } from '../qcow2/tools/zero-range.js';
import type { DeviceOpenOptions } from './options.js';
import { openImage } from '../node.js';

export class Qcow2Device implements InspectableDevice {
  private constructor(readonly image: Qcow2Image, private readonly probe: HostAllocationProbe) {}

  /** Open `path` with the mount's options (Qcow2Image.open: locks, cache mode, compression). */
  static async open(path: string, options: DeviceOpenOptions): Promise<Qcow2Device> {
    const image = await openImage(path, options);
    return new Qcow2Device(image, nodeHostAllocationProbe());
  }

  get virtualSize(): number {
    return this.image.virtualSize;
  }

  get readOnly(): boolean {
    return this.image.readOnly;
  }

  read(guestOffset: number, bytes: number): Promise<Buffer> {
    return this.image.read(guestOffset, bytes);
  }

  write(guestOffset: number, data: Uint8Array): Promise<void> {
    return this.image.write(guestOffset, data);
  }

  writeZeroes(guestOffset: number, bytes: number): Promise<void> {
    return this.image.writeZeroes(guestOffset, bytes);
  }

  discard(guestOffset: number, bytes: number): Promise<void> {
    return this.image.discard(guestOffset, bytes);
  }

  zeroRange(guestOffset: number, bytes: number, unmap: boolean): Promise<void> {
    return zeroRange(this.image, guestOffset, bytes, { unmap, probe: this.probe });
  }

  /** Pending compressed writes are linked first, so the tables describe everything written. */
  async seek(guestOffset: number, target: SeekTarget): Promise<number | undefined> {
    await this.image.settle();
    return seekAllocation(this.image, guestOffset, target, { probe: this.probe });
  }

  flush(): Promise<void> {
    return this.image.flush();
  }

  /** Growing reads as zeros even over a longer backing file (Qcow2Image.resize zeroes that range). */
  resize(newVirtualSize: number): Promise<void> {
    return this.image.resize(newVirtualSize);
  }

  allocatedBytes(): Promise<number> {
    return this.image.allocatedBytes();
  }

  async close(): Promise<void> {
    try {
      await this.image.close();
    } finally {
      this.probe.close();
    }
  }

  infoJson(): Promise<Record<string, unknown>> {
    return imageInfo(this.image, { probe: this.probe });
  }

  mapExtents(): AsyncIterable<MapExtent> {
    return mapExtents(this.image, { probe: this.probe });
  }

  layout(): AsyncIterable<LayoutEntry> {
    return layout(this.image);
  }

  check(): Promise<CheckReport> {
    return checkImage(this.image);
  }

  listSnapshots(): SnapshotSummary[] {
    return listSnapshots(this.image);
  }

  /** `ref` is an id or a name, ids first (QEMU's lookup order). */
  async openSnapshot(ref: string): Promise<SeekableDevice> {
    return new SeekableSnapshot(await openSnapshotView(this.image, ref), this.probe);
  }
}

/** A snapshot view that also answers SEEK_DATA/SEEK_HOLE from the snapshot's own L1 table. */
class SeekableSnapshot implements SeekableDevice {
  readonly readOnly = true;

  constructor(private readonly view: SnapshotView, private readonly probe: HostAllocationProbe) {}

  get virtualSize(): number {
    return this.view.virtualSize;
  }

  read(guestOffset: number, bytes: number): Promise<Buffer> { return this.view.read(guestOffset, bytes); }
  write(guestOffset: number, data: Uint8Array): Promise<void> { return this.view.write(guestOffset, data); }
  writeZeroes(guestOffset: number, bytes: number): Promise<void> { return this.view.writeZeroes(guestOffset, bytes); }
  discard(guestOffset: number, bytes: number): Promise<void> { return this.view.discard(guestOffset, bytes); }
  flush(): Promise<void> { return this.view.flush(); }
  resize(newVirtualSize: number): Promise<void> { return this.view.resize(newVirtualSize); }
  allocatedBytes(): Promise<number> { return this.view.allocatedBytes(); }
  close(): Promise<void> { return this.view.close(); }

  seek(guestOffset: number, target: SeekTarget): Promise<number | undefined> {
    return seekAllocation(this.view, guestOffset, target, { probe: this.probe, topMap: this.view.map, endBytes: this.view.virtualSize });
  }
}
