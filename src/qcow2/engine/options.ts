/**
 * What an image is opened with (Qcow2Image.open).
 */
import type { AioMode, HostFile, HostFileOpener } from '../../io/host-file.js';
import type { CompressedWriterOptions } from './compressed-writer.js';
import type { ImageState } from './state.js';

export type CacheMode = 'writeback' | 'none' | 'writethrough';

export interface Qcow2OpenOptions {
  readOnly: boolean;
  /** Host I/O mode: writeback (default), none (O_DIRECT), writethrough (flush after every write). */
  cache?: CacheMode;
  /** How O_DIRECT I/O reaches the kernel (QEMU's aio=): native (Linux AIO, default) or threads. */
  aio?: AioMode;
  l2CacheBytes?: number;
  refcountCacheBytes?: number;
  /** Bytes of the decompressed-cluster LRU (default 16 MiB or 8 clusters, whichever is larger). */
  decompressedCacheBytes?: number;
  /** Take QEMU-compatible locks (default true). */
  lock?: boolean;
  /** Read-only opens: share every permission (qemu-img -U), down the backing chain too. */
  forceShare?: boolean;
  /** Do not open the backing chain (QEMU's BDRV_O_NO_BACKING, as qemu-img info): unallocated clusters read as zeros. */
  noBacking?: boolean;
  /**
   * How host files are opened (the image, its data file, backing files). src/qcow2 knows only the
   * HostFile interface: the Node opener (io/node-host-file) is passed by src/node.ts.
   */
  openHostFile: HostFileOpener;
  /**
   * Zero new clusters with fallocate instead of writing zero padding (seed 002); default true.
   * Disable to measure the difference.
   */
  preallocate?: boolean;
  /**
   * Leave out of uncompressed writes the whole clusters of zeros that already read as zero (QEMU's
   * `detect-zeroes`, restricted to what changes nothing the guest sees); default true. Off for
   * writers that decide themselves what to allocate (convert, `-S 0` included) and for bench.
   */
  detectZeroes?: boolean;
  /**
   * Open for check/repair (QEMU's BDRV_O_CHECK): a corrupt-marked image may be opened writable, the
   * snapshot table is left to the check to read, and a dirty image is not repaired on open.
   */
  check?: boolean;
  /** Store every full guest cluster written compressed (mount -o compress, convert -c). */
  compress?: boolean;
  /** Tuning of the compressed writer. */
  compressedWriter?: CompressedWriterOptions;
  /**
   * Repairs an image opened writable with the dirty bit set (lazy refcounts after a crash) before it
   * is used (check/dirty-repair.ts, passed by src/node.ts). Without it such an open fails with EIO.
   */
  repairDirtyImage?: (image: ImageState, options: Qcow2OpenOptions) => Promise<void>;
  /** Internal: the chain of images above this one (backing opens). */
  chain?: string[];
  /** Internal: an already opened host file for `path`. */
  file?: HostFile;
}

