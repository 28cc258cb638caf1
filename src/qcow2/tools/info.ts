/**
 * `qemu-img info` (QEMU 7.2) for an open image: the same keys, values, omissions and key order as
 * `qemu-img info --output=json` prints.
 *
 * Key order: qemu-img builds a QDict (a hash table of 512 buckets, tdb_hash) and prints it bucket by
 * bucket, the newest insertion first within a bucket; `qemuDictOrder` rebuilds that order from the
 * QAPI field order, so a plain JSON.stringify of the result prints the keys as qemu-img does.
 *
 * "actual-size" is the image file's allocated host bytes (st_blocks × 512; an external data file is
 * not counted, as QEMU 7.2 does not); it comes from the HostAllocationProbe and is omitted without
 * one ("disk size: unavailable" in qemu-img's words).
 */
import type { HostAllocationProbe } from '../../io/host-allocation.js';
import { AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_EXTL2 } from '../format/constants.js';
import { Qcow2CorruptError } from '../format/errors.js';
import { hasBit, isCorrupt, isDirty } from '../format/header.js';
import { imageState, type Qcow2Image } from '../engine/image.js';
import type { ImageState } from '../engine/state.js';
import { pathCombine } from './map.js';
import { readU64, toSafeNumber } from '../format/safe-int.js';

export interface InfoOptions {
  probe?: HostAllocationProbe;
}

const QDICT_BUCKETS = 512;

/** QEMU's tdb_hash (qobject/qdict.c). */
function tdbHash(key: string): number {
  const bytes = Buffer.from(key, 'utf8');
  let value = Math.imul(0x238f13af, bytes.length) >>> 0;
  bytes.forEach((byte, i) => { value = (value + ((byte << ((i * 5) % 24)) >>> 0)) >>> 0; });
  return (Math.imul(1103515243, value) + 12345) >>> 0;
}

/**
 * An object whose keys iterate in the order QEMU prints a QDict built by inserting `entries` in
 * order (undefined values are left out, like absent optional QAPI members).
 */
export function qemuDictOrder(entries: [string, unknown][]): Record<string, unknown> {
  const present = entries.filter(([, v]) => v !== undefined).map(([key, value], index) => ({ key, value, index, bucket: tdbHash(key) % QDICT_BUCKETS }));
  present.sort((a, b) => a.bucket - b.bucket || b.index - a.index);
  const out: Record<string, unknown> = {};
  for (const { key, value } of present) out[key] = value;
  return out;
}

/** Flags of a bitmap directory entry as QEMU reports them (prepended in order in-use, auto). */
const BITMAP_IN_USE = 1;
const BITMAP_AUTO = 2;
const BITMAP_ENTRY_FIXED_BYTES = 24;
/** QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE. */
const MAX_BITMAP_DIRECTORY_BYTES = 64 * 1024 * 1024;

/** The persistent dirty bitmaps of the image (qcow2_get_bitmap_info_list), or undefined when none. */
async function bitmapInfo(image: ImageState): Promise<Record<string, unknown>[] | undefined> {
  const ext = image.header.bitmaps;
  if (!ext || ext.nbBitmaps === 0) return undefined;
  const where = { image: image.path, structure: 'bitmap-directory', hostOffset: ext.directoryOffset };
  if (ext.directoryBytes > MAX_BITMAP_DIRECTORY_BYTES || ext.directoryOffset % image.geometry.clusterSize !== 0) {
    throw new Qcow2CorruptError(`bitmap directory at ${ext.directoryOffset} (${ext.directoryBytes} bytes) is invalid`, where, false);
  }
  const dir = await image.readHost(ext.directoryOffset, ext.directoryBytes);
  const list: Record<string, unknown>[] = [];
  let pos = 0;
  for (let i = 0; i < ext.nbBitmaps; i++) {
    if (pos + BITMAP_ENTRY_FIXED_BYTES > dir.length) throw new Qcow2CorruptError(`bitmap directory entry ${i} lies past the directory's end`, where, false);
    const flags = dir.readUInt32BE(pos + 12);
    const granularityBits = dir.readUInt8(pos + 17);
    const nameBytes = dir.readUInt16BE(pos + 18);
    const extraBytes = dir.readUInt32BE(pos + 20);
    const nameStart = pos + BITMAP_ENTRY_FIXED_BYTES + extraBytes;
    if (nameStart + nameBytes > dir.length || granularityBits > 63 || toSafeNumber(readU64(dir, pos)) === undefined) {
      throw new Qcow2CorruptError(`bitmap directory entry ${i} is invalid`, where, false);
    }
    const reported: string[] = [];
    if ((flags & BITMAP_IN_USE) !== 0) reported.unshift('in-use');
    if ((flags & BITMAP_AUTO) !== 0) reported.unshift('auto');
    list.push(qemuDictOrder([
      ['name', dir.toString('utf8', nameStart, nameStart + nameBytes)],
      ['granularity', 2 ** granularityBits],
      ['flags', reported],
    ]));
    pos = Math.ceil((nameStart + nameBytes) / 8) * 8;
  }
  return list;
}

/** ImageInfoSpecificQCow2 (qcow2_get_specific_info). */
async function formatSpecific(image: ImageState): Promise<Record<string, unknown>> {
  const h = image.header;
  const data: [string, unknown][] = [];
  if (h.version === 2) {
    data.push(['compat', '0.10'], ['refcount-bits', image.geometry.refcountBits]);
  } else {
    data.push(
      ['compat', '1.1'],
      ['data-file', image.hasDataFile ? h.dataFile : undefined],
      ['data-file-raw', image.hasDataFile ? hasBit(h.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW) : undefined],
      ['extended-l2', hasBit(h.incompatibleFeatures, INCOMPAT_EXTL2)],
      ['lazy-refcounts', hasBit(h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS)],
      ['corrupt', isCorrupt(h)],
      ['refcount-bits', image.geometry.refcountBits],
      ['bitmaps', await bitmapInfo(image)],
    );
  }
  data.push(['compression-type', image.compressionType]);
  return qemuDictOrder([['type', 'qcow2'], ['data', qemuDictOrder(data)]]);
}

/** The snapshot list (bdrv_query_snapshot_info_list), or undefined when there is none. */
function snapshotInfo(image: ImageState): Record<string, unknown>[] | undefined {
  if (image.snapshots.length === 0) return undefined;
  return image.snapshots.map((s) => qemuDictOrder([
    ['id', s.id],
    ['name', s.name],
    ['vm-state-size', s.vmStateBytes],
    ['date-sec', s.dateSec],
    ['date-nsec', s.dateNsec],
    ['vm-clock-sec', Math.floor(s.vmClockNsec / 1e9)],
    ['vm-clock-nsec', s.vmClockNsec % 1e9],
    ['icount', s.icount === undefined || s.icount < 0 ? undefined : s.icount],
  ]));
}

/**
 * The object `qemu-img info --output=json IMAGE` prints, for an image opened as `image.path`
 * ("filename" and "full-backing-filename" are built from that path, as qemu-img builds them from
 * the name it was given).
 */
export async function imageInfo(qcow2: Qcow2Image, options: InfoOptions = {}): Promise<Record<string, unknown>> {
  const image = imageState(qcow2);
  const h = image.header;
  const actualSize = options.probe ? await options.probe.allocatedBytes(image.file.path) : undefined;
  return qemuDictOrder([
    ['filename', image.path],
    ['format', 'qcow2'],
    ['dirty-flag', isDirty(h)],
    ['actual-size', actualSize],
    ['virtual-size', image.virtualSize],
    ['cluster-size', image.geometry.clusterSize],
    ['backing-filename', h.backingFile],
    ['full-backing-filename', h.backingFile === undefined ? undefined : pathCombine(image.path, h.backingFile)],
    ['backing-filename-format', h.backingFile === undefined ? undefined : h.backingFormat],
    ['snapshots', snapshotInfo(image)],
    ['format-specific', await formatSpecific(image)],
  ]);
}
