/**
 * `qcow2fuse mount -o OPTS`: parsing, validation, and what each option turns into — the options the
 * image is opened with and the libfuse mount options.
 *
 *   ro                      read-only: the image is opened read-only, the mount is MS_RDONLY; the image
 *                           is refused while another process writes it, and keeps writers out (QEMU's locks)
 *   force-share             with ro: read an image another process writes (qemu-img -U), keep nobody out
 *   compress                store every full guest cluster written compressed (the driver's job)
 *   nogrow                  pin the virtual size: truncate → EPERM, writes wholly past the end → EFBIG
 *   direct_io | kernel_cache  how the kernel caches the mounted files (default: direct_io with compress,
 *                           else libfuse's default: cached while open, dropped on open)
 *   cache=writeback|none|writethrough   host I/O mode of the image file (none = O_DIRECT)
 *   aio=native|threads      how O_DIRECT I/O is submitted (cache=none, and compress's direct writes):
 *                           Linux AIO (default) or our I/O thread pool — QEMU's aio= of the same names
 *   l2-cache-size=SIZE, refcount-cache-size=SIZE   table cache sizes (K/M/G/T suffixes, powers of 1024)
 *   allow_other             let other users access the mount (checked against the file modes)
 *   name=NAME               the raw file's name (default disk.raw)
 *   attr_timeout=SECONDS, entry_timeout=SECONDS   kernel attribute/lookup cache (default 0 / 1)
 *   readahead=SIZE          the kernel's read-ahead on the mount (default 1M; libfuse 2 leaves 128K)
 *   writeback_cache | no_writeback_cache   the kernel caches writes and sends them coalesced (session
 *                           transport only); fsync, close and unmount still write them back to us first.
 *                           Default: on for read-write uncompressed mounts on the session transport
 *                           (without direct_io or nogrow), off otherwise (defaultWritebackCache)
 *   transport=session|fuse-native   how requests reach us: our own libfuse3 session on the event loop
 *                           (default; 1 MiB requests, async direct I/O, fallocate, SEEK_DATA/SEEK_HOLE)
 *                           or fuse-native on libfuse 2 (128 KiB requests, one thread hand-off per request)
 *
 * The options mount(8), mount.fuse3 and systemd add when mounting from fstab (`rw`, `dev`, `suid`,
 * `exec`, `noatime`, `_netdev`, `nofail`, `x-systemd.*`, `comment=` …: MOUNT8_OPTIONS) are accepted and
 * ignored, as mount.fuse3 documents for filesystems that have no use for them.
 *
 * The attribute timeout defaults to 0 because the inspection files change size every time they are
 * generated (on open), and the kernel must see the new size before it reads.
 *
 * Tracing: DEBUG=qcow2fuse:fuse traces every FUSE operation; DEBUG=qcow2fuse:libfuse adds libfuse's
 * own request log (its `debug` option).
 */
import type { AioMode } from '../io/host-file.js';
import { fsError } from './errno.js';

export type HostCacheMode = 'writeback' | 'none' | 'writethrough';
/** How the kernel page cache treats the mounted files (libfuse 2 options of the same names). */
export type KernelCacheMode = 'direct_io' | 'kernel_cache' | 'default';
/** How requests reach the daemon (session.ts, fuse-native.ts). */
export type Transport = 'session' | 'fuse-native';

export interface MountOptions {
  readOnly: boolean;
  /** With readOnly: share every permission (read while another process writes; keep nobody out). */
  forceShare: boolean;
  compress: boolean;
  nogrow: boolean;
  kernelCache: KernelCacheMode;
  /** Host I/O mode; undefined leaves the driver's default. */
  hostCache?: HostCacheMode;
  /** How O_DIRECT I/O is submitted; undefined leaves the driver's default (native). */
  aio?: AioMode;
  l2CacheBytes?: number;
  refcountCacheBytes?: number;
  allowOther: boolean;
  /** Name of the raw file in the mount's root. */
  name: string;
  /** Seconds the kernel may cache attributes (st_size, st_blocks …). */
  attrTimeout: number;
  /** Seconds the kernel may cache name lookups. */
  entryTimeout: number;
  /** Read-ahead of the mount's bdi, bytes (a multiple of 1024). */
  readaheadBytes: number;
  transport: Transport;
  /** The kernel's writeback cache (FUSE_CAP_WRITEBACK_CACHE; session transport only; see defaultWritebackCache). */
  writebackCache: boolean;
}

/** What the image is opened with (Qcow2Image.open's options). */
export interface DeviceOpenOptions {
  readOnly: boolean;
  forceShare?: boolean;
  cache?: HostCacheMode;
  aio?: AioMode;
  l2CacheBytes?: number;
  refcountCacheBytes?: number;
  compress?: boolean;
}

export const DEFAULT_RAW_NAME = 'disk.raw';
/** Names the mount's root uses besides the raw file (the raw file may not take one of them). */
export const RESERVED_NAMES: readonly string[] = ['info.json', 'map.json', 'layout.txt', 'check.json', 'snapshots'];
/**
 * Read-ahead for the mount: libfuse 2 leaves the kernel's 128 KiB, and each read-ahead window is one
 * FUSE round trip; 1 MiB windows made a cold sequential read of a 2 GiB image 1.55× faster here.
 */
export const DEFAULT_READAHEAD_BYTES = 1024 * 1024;
/** libfuse 2's largest write request (fuse-native); without big_writes the kernel sends 4 KiB writes (DESIGN §3). */
export const MAX_WRITE_BYTES = 131072;
/** fuse-native passes the whole option string in a 1024-byte buffer. */
const MAX_OPTION_STRING = 1000;

/**
 * Generic options of mount(8) (and what mount.fuse3 passes on from them) and its userspace-only
 * ones: accepted and ignored. `ro`/`rw` are not among them: they are ours.
 */
const MOUNT8_OPTIONS: ReadonlySet<string> = new Set([
  'defaults', 'auto', 'noauto', 'user', 'nouser', 'users', 'owner', 'group', 'nofail', '_netdev',
  'dev', 'nodev', 'suid', 'nosuid', 'exec', 'noexec', 'sync', 'async', 'dirsync', 'mand', 'nomand',
  'atime', 'noatime', 'diratime', 'nodiratime', 'relatime', 'norelatime', 'strictatime', 'nostrictatime',
  'lazytime', 'nolazytime', 'iversion', 'noiversion', 'silent', 'loud', 'symfollow', 'nosymfollow', 'default_permissions',
]);
/** Options with a value that mount(8), SELinux and systemd use (comment=, x-systemd.automount, X-mount.mkdir …). */
const MOUNT8_PREFIXES: readonly string[] = ['x-', 'X-', 'comment=', 'context=', 'fscontext=', 'defcontext=', 'rootcontext='];

/** True for an option of mount(8), systemd or SELinux that a qcow2fuse mount accepts and ignores. */
export function isIgnoredMountOption(item: string): boolean {
  return MOUNT8_OPTIONS.has(item) || MOUNT8_PREFIXES.some((prefix) => item.startsWith(prefix));
}

const SIZE_UNITS: Readonly<Record<string, number>> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

function invalid(message: string): Error {
  return fsError('EINVAL', message);
}

/** Parse a byte count with an optional K/M/G/T suffix (powers of 1024; a trailing B or iB is allowed). */
export function parseSize(text: string): number {
  const match = /^(\d+)([KMGT]?)(?:i?B)?$/i.exec(text.trim());
  if (match === null) throw invalid(`invalid size '${text}' (expected a number with an optional K, M, G or T suffix)`);
  const bytes = Number(match[1]) * SIZE_UNITS[match[2].toUpperCase()];
  if (!Number.isSafeInteger(bytes)) throw invalid(`size '${text}' is too large`);
  return bytes;
}

function parseSeconds(key: string, text: string): number {
  const seconds = Number(text);
  if (text.trim() === '' || !Number.isFinite(seconds) || seconds < 0) throw invalid(`invalid ${key} '${text}' (expected seconds ≥ 0)`);
  return seconds;
}

/** Throws unless `name` can be the raw file's name in the mount's root. */
export function validateRawName(name: string): string {
  if (name === '' || name === '.' || name === '..' || name.includes('/') || name.includes('\0')) {
    throw invalid(`invalid name '${name}' (a single file name is required)`);
  }
  if (RESERVED_NAMES.includes(name)) throw invalid(`name '${name}' is taken by an inspection file`);
  return name;
}

/**
 * Parse the `-o` arguments (each a comma-separated list; later ones override earlier ones).
 * Throws an EINVAL-coded error naming the offending option.
 */
export function parseMountOptions(specs: readonly string[]): MountOptions {
  const options: MountOptions = {
    readOnly: false, forceShare: false, compress: false, nogrow: false, kernelCache: 'default', allowOther: false,
    name: DEFAULT_RAW_NAME, attrTimeout: 0, entryTimeout: 1, readaheadBytes: DEFAULT_READAHEAD_BYTES, transport: 'session',
    writebackCache: false,
  };
  let directIo = false;
  let kernelCache = false;
  let writebackCache: boolean | undefined;
  for (const spec of specs) {
    for (const item of spec.split(',')) {
      if (item === '' || isIgnoredMountOption(item)) continue;
      const eq = item.indexOf('=');
      const key = eq < 0 ? item : item.slice(0, eq);
      const value = eq < 0 ? undefined : item.slice(eq + 1);
      const flag = (): true => {
        if (value !== undefined) throw invalid(`mount option '${key}' takes no value`);
        return true;
      };
      const required = (): string => {
        if (value === undefined || value === '') throw invalid(`mount option '${key}' needs a value (${key}=…)`);
        return value;
      };
      switch (key) {
        case 'ro': options.readOnly = flag(); break;
        case 'rw': options.readOnly = !flag(); break;
        case 'force-share': options.forceShare = flag(); break;
        case 'compress': options.compress = flag(); break;
        case 'nogrow': options.nogrow = flag(); break;
        case 'direct_io': directIo = flag(); break;
        case 'kernel_cache': kernelCache = flag(); break;
        case 'allow_other': options.allowOther = flag(); break;
        case 'writeback_cache': writebackCache = flag(); break;
        case 'no_writeback_cache': writebackCache = !flag(); break;
        case 'cache': {
          const mode = required();
          if (mode !== 'writeback' && mode !== 'none' && mode !== 'writethrough') {
            throw invalid(`invalid cache mode '${mode}' (expected writeback, none or writethrough)`);
          }
          options.hostCache = mode;
          break;
        }
        case 'aio': {
          const mode = required();
          if (mode !== 'native' && mode !== 'threads') throw invalid(`invalid aio mode '${mode}' (expected native or threads)`);
          options.aio = mode;
          break;
        }
        case 'l2-cache-size': options.l2CacheBytes = parseSize(required()); break;
        case 'refcount-cache-size': options.refcountCacheBytes = parseSize(required()); break;
        case 'name': options.name = validateRawName(required()); break;
        case 'attr_timeout': options.attrTimeout = parseSeconds(key, required()); break;
        case 'entry_timeout': options.entryTimeout = parseSeconds(key, required()); break;
        case 'readahead': {
          const bytes = parseSize(required());
          if (bytes % 1024 !== 0) throw invalid(`readahead must be a multiple of 1K, got ${bytes} bytes`);
          options.readaheadBytes = bytes;
          break;
        }
        case 'transport': {
          const transport = required();
          if (transport !== 'session' && transport !== 'fuse-native') throw invalid(`invalid transport '${transport}' (expected session or fuse-native)`);
          options.transport = transport;
          break;
        }
        default: throw invalid(`unknown mount option '${key}'`);
      }
    }
  }
  if (directIo && kernelCache) throw invalid('mount options direct_io and kernel_cache exclude each other');
  if (writebackCache === true && options.transport !== 'session') throw invalid('mount option writeback_cache needs transport=session');
  if (writebackCache === true && options.nogrow) {
    throw invalid('mount options writeback_cache and nogrow exclude each other (the kernel would take writes past the end into its cache and fail them only when writing them back)');
  }
  options.writebackCache = writebackCache ?? defaultWritebackCache(options, directIo);
  if (options.forceShare && !options.readOnly) throw invalid('mount option force-share needs ro (QEMU: force-share=on can only be used with read-only images)');
  // A compressed mount keeps no page cache: direct_io, or with the writeback cache cached pages that
  // the session drops once written back (session-cache.ts).
  options.kernelCache = directIo ? 'direct_io' : kernelCache ? 'kernel_cache' : options.compress && !options.writebackCache ? 'direct_io' : 'default';
  return options;
}

/**
 * Whether a mount has the kernel's writeback cache when no option says: on for read-write,
 * uncompressed mounts on the session transport that are neither direct_io nor nogrow. The kernel then turns small
 * writes into up to 1 MiB requests (`dd bs=4k` of 256 MiB into an empty image 7.7 s → 1.1 s here)
 * where every request would otherwise cost a round trip of its own. Off on a compressed mount,
 * where compressing, not requests, is the cost and the pages have to be dropped again (README has
 * the numbers), on a read-only one (nothing to cache), with nogrow (the kernel would accept writes
 * past the end and fail them only at write-back) and on fuse-native (libfuse 2 cannot).
 */
export function defaultWritebackCache(options: Pick<MountOptions, 'transport' | 'readOnly' | 'compress' | 'nogrow'>, directIo: boolean): boolean {
  return options.transport === 'session' && !options.readOnly && !options.compress && !options.nogrow && !directIo;
}

/** The options the image is opened with for a mount with `options`. */
export function deviceOpenOptions(options: MountOptions): DeviceOpenOptions {
  const open: DeviceOpenOptions = { readOnly: options.readOnly };
  if (options.forceShare) open.forceShare = true;
  if (options.hostCache !== undefined) open.cache = options.hostCache;
  if (options.aio !== undefined) open.aio = options.aio;
  if (options.l2CacheBytes !== undefined) open.l2CacheBytes = options.l2CacheBytes;
  if (options.refcountCacheBytes !== undefined) open.refcountCacheBytes = options.refcountCacheBytes;
  if (options.compress) open.compress = true;
  return open;
}

/** Escape a value for libfuse's option parser (commas separate options; backslash escapes). */
function escapeOptionValue(value: string): string {
  return value.replace(/[\\,]/g, (c) => `\\${c}`);
}

/**
 * The libfuse 2 mount options for `options`: big_writes and max_write always (DESIGN §3), the kernel
 * checks file modes (default_permissions), the mount shows as type fuse.qcow2fuse with the image path
 * as its source (dropped when it would overflow fuse-native's option buffer).
 */
export function libfuseOptions(options: MountOptions, imagePath: string): string[] {
  const list = ['big_writes', `max_write=${MAX_WRITE_BYTES}`, 'default_permissions', 'subtype=qcow2fuse',
    `attr_timeout=${options.attrTimeout}`, `entry_timeout=${options.entryTimeout}`];
  if (options.readOnly) list.push('ro');
  if (options.allowOther) list.push('allow_other');
  if (options.kernelCache !== 'default') list.push(options.kernelCache);
  const fsname = `fsname=${escapeOptionValue(imagePath)}`;
  return list.join(',').length + fsname.length + 1 <= MAX_OPTION_STRING ? [...list, fsname] : [...list, 'fsname=qcow2fuse'];
}

/**
 * The libfuse 3 mount options of our session for `options` (session.ts): the kernel checks file modes
 * (default_permissions), the mount shows as type fuse.qcow2fuse with the image path as its source.
 * Request size, read-ahead and async I/O are negotiated by the session at INIT; timeouts and
 * direct_io/keep_cache travel in each reply, so none of them is a mount option here.
 */
export function libfuse3Options(options: MountOptions, imagePath: string): string[] {
  const list = ['default_permissions', 'subtype=qcow2fuse', `fsname=${escapeOptionValue(imagePath)}`];
  if (options.readOnly) list.push('ro');
  if (options.allowOther) list.push('allow_other');
  return list;
}
