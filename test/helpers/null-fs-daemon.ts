/**
 * A null file served from JavaScript, for the transport benchmark (test/bench/transport.ts): "/f",
 * 64 GiB, reads answer zeros (one shared Buffer), writes are dropped — the handlers of ops.ts's
 * interface reduced to nothing, behind the same adapters and transports as a real mount.
 *
 * Usage: node null-fs-daemon.js session|fuse-native MOUNTPOINT   (prints "ready" once mounted;
 * SIGTERM unmounts and exits).
 */
import { fusermountUnmount, type TransportMount } from '../../src/fuse/transport.js';
import { createFuseAdapter } from '../../src/fuse/adapter.js';
import { mountFuse } from '../../src/fuse/fuse-native.js';
import type { FileStat, FsHandlers } from '../../src/fuse/ops.js';
import { libfuse3Options, libfuseOptions, parseMountOptions } from '../../src/fuse/options.js';
import { mountSession } from '../../src/fuse/session.js';
import { createSessionAdapter } from '../../src/fuse/session-adapter.js';
import { fsError } from '../../src/fuse/errno.js';

const FILE_BYTES = 64 * 2 ** 30;
const zeros = Buffer.alloc(1 << 20);
const at = new Date();

function stat(mode: number, size: number, nlink: number): FileStat {
  return { mode, uid: 0, gid: 0, size, blocks: 0, blksize: 131072, nlink, atime: at, mtime: at, ctime: at };
}

const nothing = async () => undefined;

const handlers: FsHandlers = {
  async getattr(path) {
    if (path === '/') return stat(0o040755, 4096, 2);
    if (path === '/f') return stat(0o100644, FILE_BYTES, 1);
    throw fsError('ENOENT', `${path}: no such file`);
  },
  readdir: async () => ['.', '..', 'f'],
  open: async () => 1,
  release: nothing,
  read: async (_path, _fh, length) => zeros.subarray(0, Math.min(length, zeros.length)),
  write: async (_path, _fh, data) => data.length,
  truncate: nothing,
  ftruncate: nothing,
  flush: nothing,
  fsync: nothing,
  statfs: async () => ({ bsize: 4096, frsize: 4096, blocks: 0, bfree: 0, bavail: 0, files: 0, ffree: 0, favail: 0, fsid: 0, flag: 0, namemax: 255 }),
  utimens: nothing,
  fallocate: nothing,
  lseek: async (_path, _fh, offset) => offset,
  refuse: async (op, path) => {
    throw fsError('EPERM', `${path}: ${op} refused`);
  },
  dispose: nothing,
  openHandles: () => 0,
};

const [transport, mountpoint] = process.argv.slice(2);
if ((transport !== 'session' && transport !== 'fuse-native') || mountpoint === undefined) {
  process.stderr.write('usage: null-fs-daemon session|fuse-native MOUNTPOINT\n');
  process.exit(2);
}
const options = parseMountOptions([`transport=${transport}`]);
let mount: TransportMount;
if (transport === 'session') {
  const adapter = createSessionAdapter(handlers, { attrTimeout: 0, entryTimeout: 1, kernelCache: 'default' });
  mount = await mountSession(mountpoint, adapter, libfuse3Options(options, 'nullfs'), 1024 * 1024);
} else {
  const adapter = createFuseAdapter(handlers);
  mount = await mountFuse(mountpoint, adapter.ops, libfuseOptions(options, 'nullfs'), 1024 * 1024);
}
process.stdout.write('ready\n');
process.on('SIGTERM', () => {
  void fusermountUnmount(mountpoint, true).catch(() => undefined).then(() => {
    mount.release();
    process.exit(0);
  });
});
