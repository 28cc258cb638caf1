/**
 * What the host filesystem knows about a file's allocation, as QEMU's file-posix driver asks it:
 * allocated bytes (st_blocks × 512, qemu-img's "actual-size" / "disk size") and data/hole extents
 * (lseek SEEK_DATA / SEEK_HOLE, file-posix's find_allocation). `qemu-img info` and `qemu-img map`
 * report these, so matching them needs the same questions asked of the same files.
 *
 * The qcow2 layer never touches node:fs; it takes a HostAllocationProbe. `nodeHostAllocationProbe()`
 * answers from the real files (fstat, fs-ext's lseek with SEEK_DATA/SEEK_HOLE) and keeps one
 * read-only descriptor per path until close().
 */
import { closeSync, fstatSync, openSync, constants as fsConstants } from 'node:fs';
import { createRequire } from 'node:module';

/** One answer of find_allocation at a host offset. */
export type HostExtent =
  /** [offset, endBytes) holds data (endBytes = the next hole, at most the file size). */
  | { kind: 'data'; endBytes: number }
  /** [offset, endBytes) is a hole followed by data at endBytes. */
  | { kind: 'hole'; endBytes: number }
  /** No data from offset to the end of the file (lseek SEEK_DATA failed ENXIO). */
  | { kind: 'trailing-hole' }
  /** The filesystem cannot tell (treated as data, as QEMU does). */
  | { kind: 'unknown' };

export interface HostAllocationProbe {
  /** Bytes the host allocated for the file (st_blocks × 512); undefined when it cannot be known. */
  allocatedBytes(path: string): Promise<number | undefined>;
  /** The file's size in bytes. */
  sizeBytes(path: string): Promise<number>;
  /** The data/hole extent that starts at `hostOffset` (file-posix find_allocation). */
  extentAt(path: string, hostOffset: number): Promise<HostExtent>;
  /** Close every descriptor the probe opened. */
  close(): void;
}

const SEEK_DATA = 3;
const SEEK_HOLE = 4;

interface FsExtSeek {
  seekSync(fd: number, offset: number, whence: number): number;
}

let fsExt: FsExtSeek | undefined;

function seek(fd: number, offset: number, whence: number): number {
  fsExt ??= createRequire(import.meta.url)('fs-ext') as FsExtSeek;
  return fsExt.seekSync(fd, offset, whence);
}

function errnoCode(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}

/** A probe over the real files (paths are opened read-only on first use). */
export function nodeHostAllocationProbe(): HostAllocationProbe {
  const fds = new Map<string, number>();
  const fdOf = (path: string): number => {
    let fd = fds.get(path);
    if (fd === undefined) {
      fd = openSync(path, fsConstants.O_RDONLY);
      fds.set(path, fd);
    }
    return fd;
  };
  return {
    async allocatedBytes(path) {
      try {
        return fstatSync(fdOf(path)).blocks * 512;
      } catch {
        return undefined;
      }
    },
    async sizeBytes(path) {
      return fstatSync(fdOf(path)).size;
    },
    async extentAt(path, hostOffset) {
      const fd = fdOf(path);
      let data: number;
      try {
        data = seek(fd, hostOffset, SEEK_DATA);
      } catch (error) {
        return errnoCode(error) === 'ENXIO' ? { kind: 'trailing-hole' } : { kind: 'unknown' };
      }
      if (data < hostOffset) return { kind: 'unknown' };
      if (data > hostOffset) return { kind: 'hole', endBytes: data };
      let hole: number;
      try {
        hole = seek(fd, hostOffset, SEEK_HOLE);
      } catch {
        return { kind: 'unknown' };
      }
      return hole > hostOffset ? { kind: 'data', endBytes: hole } : { kind: 'unknown' };
    },
    close() {
      for (const fd of fds.values()) closeSync(fd);
      fds.clear();
    },
  };
}
