/**
 * qcow2fuse library API: open, create and check qcow2 images (with Node's host files, or any
 * HostFile opener such as MemoryHostFile's); the FUSE mount lives in src/fuse. Qcow2Image is the
 * BlockDevice of an open image; its internals (caches, tables) are not part of the API.
 */
export { openImage, createImage, type OpenOptions, type CreateOptions, type Preallocation } from './node.js';
export { Qcow2Image, type Qcow2OpenOptions, type CacheMode } from './qcow2/engine/image.js';
export type { BlockDevice, InspectableDevice, MapExtent, LayoutEntry, CheckReport, SnapshotSummary } from './qcow2/engine/block-device.js';
export { checkImage, CheckFailedError, type CheckOptions, type CheckResult, type RepairMode } from './qcow2/check/check.js';
export { CodedError } from './io/errors.js';
export { Qcow2CorruptError, Qcow2FormatError, Qcow2UnsupportedError, Qcow2ReadOnlyError, Qcow2RangeError } from './qcow2/format/errors.js';
export type { HostFile, HostFileOpener, HostFileOpenOptions } from './io/host-file.js';
export { MemoryHostFile } from './io/memory-host-file.js';
export { imageInfo, qemuDictOrder, type InfoOptions } from './qcow2/tools/info.js';
export { mapEntries, mapExtents, mapEntryJson, mapJsonChunks, type MapEntry, type MapOptions } from './qcow2/tools/map.js';
export { findSnapshot, listSnapshots, openSnapshotView, SnapshotView, type SnapshotRef, type SnapshotViewOptions } from './qcow2/engine/snapshot.js';
export { createSnapshot, deleteSnapshot, applySnapshot } from './qcow2/tools/snapshot-ops.js';
export { nodeHostAllocationProbe, type HostAllocationProbe, type HostExtent } from './io/host-allocation.js';
export {
  convertImage, convertFiles, openConvertSource, openConvertSink, ConvertError, ProgressReporter,
  type ConvertOptions, type ConvertResult, type ConvertFilesOptions, type ConvertSource, type ConvertSink, type ConvertCacheMode, type ImageFormat,
} from './convert/index.js';

