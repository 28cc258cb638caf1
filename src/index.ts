/**
 * qcow2fuse library API: open, create and check qcow2 images; the FUSE mount lives in src/fuse.
 */
export { Qcow2Image, type Qcow2OpenOptions, type CacheMode } from './qcow2/engine/image.js';
export type { BlockDevice, InspectableDevice, MapExtent, LayoutEntry, CheckReport, SnapshotSummary } from './qcow2/engine/block-device.js';
export { CodedError } from './io/errors.js';
export { Qcow2CorruptError, Qcow2FormatError, Qcow2UnsupportedError, Qcow2ReadOnlyError, Qcow2RangeError } from './qcow2/format/errors.js';
export type { HostFile, HostFileOpenOptions } from './io/host-file.js';
export { imageInfo, qemuDictOrder, type InfoOptions } from './qcow2/tools/info.js';
export { mapEntries, mapExtents, mapEntryJson, mapJsonChunks, type MapEntry, type MapOptions } from './qcow2/tools/map.js';
export { findSnapshot, listSnapshots, openSnapshotView, SnapshotView, type SnapshotRef, type SnapshotViewOptions } from './qcow2/engine/snapshot.js';
export { createSnapshot, deleteSnapshot, applySnapshot } from './qcow2/tools/snapshot-ops.js';
export { createImage, type CreateOptions, type Preallocation } from './qcow2/tools/create.js';
export { nodeHostAllocationProbe, type HostAllocationProbe, type HostExtent } from './io/host-allocation.js';
export {
  convertImage, convertFiles, openConvertSource, openConvertSink, ConvertError, ProgressReporter,
  type ConvertOptions, type ConvertResult, type ConvertFilesOptions, type ConvertSource, type ConvertSink, type ConvertCacheMode, type ImageFormat,
} from './convert/index.js';

import { Qcow2Image, type Qcow2OpenOptions } from './qcow2/engine/image.js';

/** Open a qcow2 image (read-only unless `readOnly: false`). */
export function openImage(path: string, options: Partial<Qcow2OpenOptions> = {}): Promise<Qcow2Image> {
  return Qcow2Image.open(path, { readOnly: true, ...options });
}
