/**
 * What convert needs to know about a host file or block device given as SOURCE or DEST: its kind,
 * its size (a block device's from lseek SEEK_END, as BLKGETSIZE64 would say — fstat reports 0), the
 * identity used to refuse copying a file onto itself, and whether a block device is mounted
 * read-write somewhere (/proc/self/mountinfo), which makes a copy of it possibly inconsistent.
 */
import { closeSync, openSync, statSync, constants as fsConstants, type Stats } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';

const SEEK_END = 2;

interface FsExtSeek {
  seekSync(fd: number, offset: number, whence: number): number;
}

let fsExt: FsExtSeek | undefined;

/** The size in bytes of a regular file or a block device (lseek to the end of the device). */
export function hostSizeBytes(path: string, stats: Stats = statSync(path)): number {
  if (!stats.isBlockDevice()) return stats.size;
  fsExt ??= createRequire(import.meta.url)('fs-ext') as FsExtSeek;
  const fd = openSync(path, fsConstants.O_RDONLY);
  try {
    return fsExt.seekSync(fd, 0, SEEK_END);
  } finally {
    closeSync(fd);
  }
}

/** Whether two existing paths name the same file or device (same inode, or same device number). */
export function sameHostObject(a: Stats, b: Stats): boolean {
  if (a.isBlockDevice() && b.isBlockDevice()) return a.rdev === b.rdev;
  return a.dev === b.dev && a.ino === b.ino;
}

/** Mount points of block device `rdev` that are mounted read-write, from a mountinfo text. */
export function readWriteMountsOf(mountinfo: string, rdev: number): string[] {
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | ((Math.floor(rdev / 4096) & 0xfff00));
  const mounts: string[] = [];
  for (const line of mountinfo.split('\n')) {
    // id parent major:minor root mountpoint options … - fstype source superoptions
    const fields = line.split(' ');
    if (fields.length < 6 || fields[2] !== `${major}:${minor}`) continue;
    if (fields[5].split(',').includes('rw')) mounts.push(fields[4].replace(/\\040/g, ' '));
  }
  return mounts;
}

/** Where block device `path` is mounted read-write (empty when it is not a block device or not mounted so). */
export async function readWriteMounts(path: string): Promise<string[]> {
  const stats = statSync(path);
  if (!stats.isBlockDevice()) return [];
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8').catch(() => '');
  return readWriteMountsOf(mountinfo, stats.rdev);
}
