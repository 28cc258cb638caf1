/**
 * A user's resize of an image: `qcow2fuse resize` and a truncate of disk.raw on a mount.
 *
 * QEMU's truncate (bdrv_co_truncate) zeroes the grown area when the backing file is longer than the
 * old size, so its data does not show through there; qcow2 does that with zero clusters over the
 * whole new area. A v2 image has no zero clusters (qemu-img refuses that resize): we write zeros up
 * to the backing file's end instead, past which the area reads as zeros anyway. Qcow2Image.resize
 * itself leaves the backing file visible, as an image being created or a convert destination sized
 * up front needs (QEMU attaches their backing file after sizing them).
 */
import { imageState, type Qcow2Image } from '../engine/image.js';

/** Resize `image` to newVirtualSize as `qemu-img resize` does (see the module comment). */
export async function resizeImage(image: Qcow2Image, newVirtualSize: number): Promise<void> {
  const oldSize = image.virtualSize;
  await image.resize(newVirtualSize);
  const s = imageState(image);
  const backingSize = s.backing?.virtualSize ?? 0;
  if (newVirtualSize <= oldSize || backingSize <= oldSize) return;
  const zeroEnd = s.header.version >= 3 && !s.dataFileRaw ? newVirtualSize : Math.min(newVirtualSize, backingSize);
  await image.writeZeroes(oldSize, zeroEnd - oldSize);
}
