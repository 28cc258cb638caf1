/**
 * What the session adapter does about the kernel's page cache when the mount has the kernel's
 * writeback cache (-o writeback_cache). The kernel then owns each regular file's size and data until
 * it writes them back, which takes three rules:
 *
 * - Generated files (the inspection files in the root: info.json, map.json …) change size behind the
 *   kernel's back, and with the writeback cache the kernel never takes a regular file's size from
 *   the daemon again once it has an inode. So each (path, size) gets an inode of its own and its
 *   lookups are not cached (entry timeout 0): a stat after a change looks the name up again, sees a
 *   new inode and its true size. They are opened direct_io, so reads go to the daemon, not stopping
 *   at an inode's first-seen size.
 * - The raw file's attributes are cached WRITEBACK_ATTR_TIMEOUT_S at least (see there).
 * - SEEK_DATA/SEEK_HOLE on the raw file are answered from the image's map, which cannot see the
 *   kernel's dirty pages: the kernel writes them back (from the seek offset on) first.
 * - A compressed mount must leave no page cache behind (its data is written to the image once, and
 *   reading it back goes to the image): pages are dropped once written back (after the WRITE is
 *   answered), read pages once READ_BEHIND_BYTES more have been read after them (so read-ahead is
 *   consumed before it is dropped), and a file's whole cache on its release.
 *
 * Drops and write-backs are made by the session's kernel thread (KernelCache): from the thread that
 * serves requests they could deadlock against pages under writeback that wait for that thread.
 */
const S_IFMT = 0o170000;
const S_IFREG = 0o100000;

/**
 * Attribute timeout of the raw file with the writeback cache, seconds (at least). The kernel refreshes
 * the attributes before every write(2) once they time out — with the default of 0 a GETATTR round trip
 * per 4 KiB write, as costly as the WRITE the cache saves — while size and times are the kernel's own
 * in this mode; what a GETATTR still brings is st_blocks, so `du` may lag this long.
 */
export const WRITEBACK_ATTR_TIMEOUT_S = 1;

/** Bytes read after a read range before that range's pages are dropped (compressed mounts). */
export const READ_BEHIND_BYTES = 8 * 1024 * 1024;

/** The kernel's page cache of a mount, as the session can drive it (session.ts). */
export interface KernelCache {
  /** Drop the cached pages of `ino` in [offset, offset + length) (length 0: to the end); queued, not awaited. */
  dropPages(ino: number, offsetBytes: number, lengthBytes: number): void;
  /** Resolves once the kernel's dirty pages of `path` from `offsetBytes` on are written back to the daemon. */
  writeBack(path: string, offsetBytes: number): Promise<void>;
}

export interface KernelCacheRulesOptions {
  /** The mount has the kernel's writeback cache: all rules apply; without it, none does. */
  writebackCache: boolean;
  /** Also drop written-back and read pages (compressed mounts). */
  dropCachedData: boolean;
  /** Path of the raw file ("/disk.raw"). */
  rawPath: string;
}

/** Read ranges of one inode not dropped yet, oldest first. */
class ReadBehind {
  private readonly ranges: [number, number][] = [];
  private bytes = 0;

  /** Note [pos, pos + length) read; returns the ranges now READ_BEHIND_BYTES behind, to drop. */
  add(pos: number, length: number): [number, number][] {
    const last = this.ranges[this.ranges.length - 1];
    if (last !== undefined && last[1] === pos) last[1] += length;
    else this.ranges.push([pos, pos + length]);
    this.bytes += length;
    const drops: [number, number][] = [];
    while (this.bytes > READ_BEHIND_BYTES) {
      const first = this.ranges[0];
      const take = Math.min(first[1] - first[0], this.bytes - READ_BEHIND_BYTES);
      drops.push([first[0], take]);
      first[0] += take;
      this.bytes -= take;
      if (first[0] === first[1]) this.ranges.shift();
    }
    return drops;
  }
}

/** The adapter's page-cache rules for one mount (see the file comment). */
export class KernelCacheRules {
  private kernel: KernelCache | undefined;
  private readonly readBehind = new Map<number, ReadBehind>();

  constructor(private readonly options: KernelCacheRulesOptions) {}

  /** The session's kernel cache (attached once mounted). */
  attach(kernel: KernelCache): void {
    this.kernel = kernel;
  }

  /** A generated file: a regular file in the root other than the raw file (mode unknown: by path alone). */
  isGenerated(path: string, mode?: number): boolean {
    return this.options.writebackCache && path !== this.options.rawPath && path.lastIndexOf('/') === 0 &&
      (mode === undefined || (mode & S_IFMT) === S_IFREG);
  }

  /** How long the kernel may cache `path`'s attributes, given the mount's attr_timeout. */
  attrTimeout(path: string, mountSeconds: number): number {
    return this.options.writebackCache && path === this.options.rawPath ? Math.max(mountSeconds, WRITEBACK_ATTR_TIMEOUT_S) : mountSeconds;
  }

  /** A WRITE of [pos, pos + bytes) to `ino` was answered (its pages are written back). */
  written(ino: number, pos: number, bytes: number): void {
    if (this.options.dropCachedData && bytes > 0) this.kernel?.dropPages(ino, pos, bytes);
  }

  /** A READ of [pos, pos + bytes) of `ino` was answered. */
  read(ino: number, pos: number, bytes: number): void {
    if (!this.options.dropCachedData || bytes === 0 || this.kernel === undefined) return;
    let behind = this.readBehind.get(ino);
    if (behind === undefined) {
      behind = new ReadBehind();
      this.readBehind.set(ino, behind);
    }
    for (const [offset, length] of behind.add(pos, bytes)) this.kernel.dropPages(ino, offset, length);
  }

  /** A file handle of `ino` was released. */
  released(ino: number): void {
    if (!this.options.dropCachedData) return;
    this.readBehind.delete(ino);
    this.kernel?.dropPages(ino, 0, 0);
  }

  /** Before SEEK_DATA/SEEK_HOLE on `path` from `offset`: the kernel's dirty pages there written back. */
  async beforeSeek(path: string, offset: number): Promise<void> {
    if (this.options.writebackCache && path === this.options.rawPath && this.kernel !== undefined) {
      await this.kernel.writeBack(path, offset);
    }
  }
}
