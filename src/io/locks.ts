/**
 * Image locking, compatible with QEMU's (block/file-posix.c `raw_apply_lock_bytes` /
 * `raw_check_lock_bytes`) plus an exclusive flock between writers.
 *
 * QEMU's scheme, on the image file, with OFD byte-range locks (fcntl F_OFD_SETLK), always F_RDLCK:
 *   - byte 100 + i is read-locked while the opener HOLDS permission bit i;
 *   - byte 200 + i is read-locked while the opener does NOT SHARE permission bit i ("unshare").
 * Permission bits (QEMU's BLK_PERM_*): 0 consistent read, 1 write, 2 write unchanged, 3 resize.
 * An opener first takes its bytes, then tests for conflicts with F_OFD_GETLK (asking for F_WRLCK,
 * which any other description's read lock blocks):
 *   - for each bit it wants to hold, byte 200 + i ("Failed to get \"write\" lock");
 *   - for each bit it does not share, byte 100 + i ("Failed to get shared \"write\" lock").
 * Because the locks belong to the open file description, an opener never conflicts with itself —
 * but two descriptions of one process do conflict, exactly as two processes.
 *
 * What the QEMU tools take on a qcow2 file (measured with /proc/locks on qemu 7.2):
 *   read-write (qemu-io, qemu-img commit/resize…): bytes 100 101 103, 201 203
 *     (holds consistent read, write, resize; shares consistent read and write unchanged);
 *   read-only (qemu-img info/check/map/convert source, qemu-io -r): bytes 100, 201 203
 *     (holds consistent read; does not share write nor resize);
 *   read-only with -U / force-share: byte 100 only (shares everything);
 *   the backing files of any of these: as the read-only opener (100, 201 203), or 100 alone when
 *     the top image is opened with force-share (QEMU passes force-share down the chain);
 *   the backing file `qemu-img create -b` reads for its size: force-share.
 * We take the same bytes in each case (QEMU_WRITER, QEMU_READER, QEMU_SHARED_READER), so a writer
 * refuses readers and writers, a reader refuses writers (and is refused by them), and force-share
 * readers read anyway and keep nobody out.
 */
import { closeSync, openSync } from 'node:fs';
import { createRequire } from 'node:module';

import createDebug from 'debug';

import { CodedError, HostIoError, LockError } from './errors.js';
import { errorCodeOf, ofdGetLock, ofdSetLock } from './native.js';

const debug = createDebug('qcow2fuse:io');

/** QEMU's BLK_PERM_* bits (include/block/block-common.h). */
export const QEMU_PERM = Object.freeze({
  CONSISTENT_READ: 0x1,
  WRITE: 0x2,
  WRITE_UNCHANGED: 0x4,
  RESIZE: 0x8,
});
export const QEMU_PERM_ALL = 0xf;
/** QEMU's names for the bits, as its error messages print them. */
export const QEMU_PERM_NAMES: readonly string[] = ['consistent read', 'write', 'write unchanged', 'resize'];
const QEMU_PERM_COUNT = QEMU_PERM_NAMES.length;

/** First lock byte of the held-permission bytes (RAW_LOCK_PERM_BASE). */
export const QEMU_LOCK_PERM_BASE = 100;
/** First lock byte of the unshared-permission bytes (RAW_LOCK_SHARED_BASE). */
export const QEMU_LOCK_SHARED_BASE = 200;

/** Permissions an opener holds (`perm`) and lets others hold (`sharedPerm`), as QEMU bit masks. */
export interface QemuPermissions {
  perm: number;
  sharedPerm: number;
}

/** A writer of the image, as qemu-io/qemu-img open a qcow2 read-write. */
export const QEMU_WRITER: QemuPermissions = Object.freeze({
  perm: QEMU_PERM.CONSISTENT_READ | QEMU_PERM.WRITE | QEMU_PERM.RESIZE,
  sharedPerm: QEMU_PERM.CONSISTENT_READ | QEMU_PERM.WRITE_UNCHANGED,
});

/** A read-only opener, as `qemu-img info` and the backing files of a writer: shares neither write nor resize. */
export const QEMU_READER: QemuPermissions = Object.freeze({
  perm: QEMU_PERM.CONSISTENT_READ,
  sharedPerm: QEMU_PERM.CONSISTENT_READ | QEMU_PERM.WRITE_UNCHANGED,
});

/** A read-only opener sharing every permission, as `qemu-img info -U` (force-share). */
export const QEMU_SHARED_READER: QemuPermissions = Object.freeze({
  perm: QEMU_PERM.CONSISTENT_READ,
  sharedPerm: QEMU_PERM_ALL,
});

function permName(bit: number): string {
  return QEMU_PERM_NAMES[bit] ?? `permission bit ${bit}`;
}

function hasBit(mask: number, bit: number): boolean {
  return Math.floor(mask / 2 ** bit) % 2 === 1;
}

/** Lock bytes an opener with `permissions` takes: 100+i for held bits, 200+i for unshared bits. */
export function qemuLockBytes(permissions: QemuPermissions): number[] {
  const bytes: number[] = [];
  for (let bit = 0; bit < QEMU_PERM_COUNT; bit++) {
    if (hasBit(permissions.perm, bit)) {
      bytes.push(QEMU_LOCK_PERM_BASE + bit);
    }
  }
  for (let bit = 0; bit < QEMU_PERM_COUNT; bit++) {
    if (!hasBit(permissions.sharedPerm, bit)) {
      bytes.push(QEMU_LOCK_SHARED_BASE + bit);
    }
  }
  return bytes;
}

/** What other openers hold on the file: permissions held and permissions they refuse to share. */
export interface QemuLockState {
  held: string[];
  unshared: string[];
}

/** Inspect the QEMU lock bytes held through other open file descriptions (diagnostics, tests). */
export function queryQemuLocks(fd: number): QemuLockState {
  const state: QemuLockState = { held: [], unshared: [] };
  for (let bit = 0; bit < QEMU_PERM_COUNT; bit++) {
    if (ofdGetLock(fd, 'write', QEMU_LOCK_PERM_BASE + bit, 1) !== null) {
      state.held.push(permName(bit));
    }
    if (ofdGetLock(fd, 'write', QEMU_LOCK_SHARED_BASE + bit, 1) !== null) {
      state.unshared.push(permName(bit));
    }
  }
  return state;
}

/** Release every QEMU lock byte this open file description holds. */
export function releaseQemuLocks(fd: number): void {
  ofdSetLock(fd, 'unlock', QEMU_LOCK_PERM_BASE, QEMU_PERM_COUNT);
  ofdSetLock(fd, 'unlock', QEMU_LOCK_SHARED_BASE, QEMU_PERM_COUNT);
}

function isLockConflict(error: unknown): boolean {
  const code = errorCodeOf(error);
  return code === 'EAGAIN' || code === 'EACCES' || code === 'EWOULDBLOCK';
}

/** What to do about a conflict, appended to its message. */
const FORCE_SHARE_HINT = 'to read it anyway, use -U (--force-share), or -o ro,force-share for a mount (what is read may be stale)';

function remedy(readOnly: boolean, otherIsWriter: boolean): string {
  if (otherIsWriter) return readOnly ? `stop that process first, or ${FORCE_SHARE_HINT}` : `stop that process first; ${FORCE_SHARE_HINT}`;
  return readOnly ? 'stop that process first' :
    'wait for it to finish or stop it (readers without -U/force-share keep writers out, as QEMU\'s do)';
}

/**
 * The QEMU permissions of an opener: writer, reader, or force-share reader. Force-share is for
 * read-only opens only (QEMU: "force-share=on can only be used with read-only images").
 */
export function qemuPermissionsFor(path: string, readOnly: boolean, forceShare: boolean): QemuPermissions {
  if (forceShare && !readOnly) {
    throw new CodedError('EINVAL', `${path}: force-share can only be used with read-only images (QEMU: force-share=on can only be used ` +
      'with read-only images); open it read-only (mount -o ro,force-share)', { path });
  }
  return readOnly ? (forceShare ? QEMU_SHARED_READER : QEMU_READER) : QEMU_WRITER;
}

/**
 * What other processes hold on the QEMU lock bytes of `path` (through a description of our own,
 * opened and closed here; OFD locks of other descriptions are not touched). For the force-share
 * warning: is someone writing the image we are about to read?
 */
export function probeQemuLocks(path: string): QemuLockState {
  const fd = openSync(path, 'r');
  try {
    return queryQemuLocks(fd);
  } finally {
    closeSync(fd);
  }
}

/** A conflict found by QEMU's checks: the permission in dispute and which check found it. */
interface QemuConflict {
  bit: number;
  lockByte: number;
  /** 'unshared': another opener refuses to share a permission we need; 'held': it holds one we do not share. */
  kind: 'unshared' | 'held';
}

/** QEMU's raw_check_lock_bytes, in its order: needed-but-unshared first, then held-but-not-shared. */
function findQemuConflict(fd: number, permissions: QemuPermissions): QemuConflict | undefined {
  for (let bit = 0; bit < QEMU_PERM_COUNT; bit++) {
    const lockByte = QEMU_LOCK_SHARED_BASE + bit;
    if (hasBit(permissions.perm, bit) && ofdGetLock(fd, 'write', lockByte, 1) !== null) {
      return { bit, lockByte, kind: 'unshared' };
    }
  }
  for (let bit = 0; bit < QEMU_PERM_COUNT; bit++) {
    const lockByte = QEMU_LOCK_PERM_BASE + bit;
    if (!hasBit(permissions.sharedPerm, bit) && ofdGetLock(fd, 'write', lockByte, 1) !== null) {
      return { bit, lockByte, kind: 'held' };
    }
  }
  return undefined;
}

/**
 * The LockError for a conflict, in QEMU's terms (its message is kept in the details and quoted).
 * When the other process holds the write permission (a running VM, qemu-io, a qcow2fuse mount) and
 * we do not share it, that is what the message names, whichever check tripped first.
 */
function conflictError(fd: number, path: string, permissions: QemuPermissions, conflict: QemuConflict): LockError {
  const readOnly = !hasBit(permissions.perm, 1);
  const others = queryQemuLocks(fd);
  const otherIsWriter = others.held.includes('write') && !hasBit(permissions.sharedPerm, 1);
  const name = otherIsWriter ? 'write' : permName(conflict.bit);
  const kind = otherIsWriter ? (readOnly ? 'held' : 'unshared') : conflict.kind;
  const qemuMessage = kind === 'unshared' ? `Failed to get "${name}" lock` : `Failed to get shared "${name}" lock`;
  const details = { lockByte: conflict.lockByte, permission: name, qemuMessage, otherHolders: others };
  const quote = `(QEMU: ${qemuMessage}; is another process using the image?)`;
  if (otherIsWriter) {
    return new LockError(path, `image is in use by another process that is writing it ${quote}; ${remedy(readOnly, true)}`, details);
  }
  if (kind === 'held') {
    return new LockError(path, `image is in use by another process that holds the '${name}' permission ${quote}; ${remedy(readOnly, false)}`, details);
  }
  return new LockError(path, `image is in use by another process that does not share the '${name}' permission ${quote}; ` +
    remedy(readOnly, false), details);
}

/**
 * Take QEMU's lock bytes for `permissions` on `fd`, then check for conflicts exactly as QEMU does.
 * On conflict every byte taken is released and a LockError names the permission in dispute; any
 * other failure (filesystem without OFD locks …) is a HostIoError.
 */
export function applyQemuLocks(fd: number, path: string, permissions: QemuPermissions): void {
  try {
    for (const byte of qemuLockBytes(permissions)) {
      try {
        ofdSetLock(fd, 'read', byte, 1);
      } catch (error) {
        if (isLockConflict(error)) {
          throw new LockError(path, `image is in use by another process (it holds a write lock on QEMU lock byte ${byte}); ` +
            remedy(!hasBit(permissions.perm, 1), false), { lockByte: byte });
        }
        throw error;
      }
    }
    const conflict = findQemuConflict(fd, permissions);
    if (conflict !== undefined) {
      throw conflictError(fd, path, permissions, conflict);
    }
    debug('qemu locks taken on %s: bytes %o', path, qemuLockBytes(permissions));
  } catch (error) {
    try {
      releaseQemuLocks(fd);
    } catch (releaseError) {
      debug('releasing qemu locks on %s after a failure failed: %o', path, releaseError);
    }
    if (error instanceof LockError) {
      throw error;
    }
    throw new HostIoError(errorCodeOf(error) ?? 'EIO', path, 'lock (QEMU OFD lock bytes)', undefined,
      error instanceof Error ? error.message : String(error));
  }
}

interface FsExt {
  flockSync(fd: number, flags: 'sh' | 'ex' | 'shnb' | 'exnb' | 'un'): void;
}

let fsExt: FsExt | undefined;

function loadFsExt(): FsExt {
  if (fsExt === undefined) {
    const require = createRequire(import.meta.url);
    fsExt = require('fs-ext') as FsExt;
  }
  return fsExt;
}

/**
 * Exclusive, non-blocking flock on `fd` (between writers that use flock, e.g. two qcow2fuse
 * mounts). Throws LockError when another open file holds a flock on the file.
 */
export function takeExclusiveFlock(fd: number, path: string): void {
  try {
    loadFsExt().flockSync(fd, 'exnb');
  } catch (error) {
    if (isLockConflict(error)) {
      throw new LockError(path, 'image is in use by another process that is writing it (an exclusive flock is held, e.g. by ' +
        `another qcow2fuse mount); ${remedy(false, true)}`, { lock: 'flock' });
    }
    throw new HostIoError(errorCodeOf(error) ?? 'EIO', path, 'flock', undefined, error instanceof Error ? error.message : String(error));
  }
}

/** Release the flock taken by takeExclusiveFlock (closing the file also releases it). */
export function releaseFlock(fd: number): void {
  loadFsExt().flockSync(fd, 'un');
}
