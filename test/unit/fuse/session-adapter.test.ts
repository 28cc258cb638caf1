/**
 * The session adapter without a mount: requests dispatched by op code and inode, answered through
 * recorded reply functions — stable inodes for paths, setattr carrying truncate/utimens/chmod,
 * readdir entries with offsets, errnos for errors and unknown inodes, exactly one answer per request;
 * with the kernel's writeback cache, session-cache.ts's rules (inode per size and direct_io for the
 * generated files, write-back before lseek, page drops on compressed mounts).
 */
import { constants as osConstants } from 'node:os';
import { describe, expect, it } from 'vitest';
import { createHandlers, type FsHandlers } from '../../../src/fuse/ops.js';
import { createSessionAdapter, SET_ATTR, type KernelCache, type SessionAdapterOptions, type SessionReplies } from '../../../src/fuse/session-adapter.js';
import { READ_BEHIND_BYTES } from '../../../src/fuse/session-cache.js';
import { fuseSession } from '../../../src/io/native.js';
import { MemoryDevice } from './memory-device.js';

const E = osConstants.errno;
const OP = fuseSession.OP;
const ROOT = 1;

function realHandlers(device = new MemoryDevice(65536)): FsHandlers {
  return createHandlers(device, {
    readOnly: false, nogrow: false, rawName: 'disk.raw', statfsPath: '/', uid: 0, gid: 0,
    statVfs: async () => ({ f_bsize: 4096, f_frsize: 4096, f_blocks: 1, f_bfree: 1, f_bavail: 1, f_files: 1, f_ffree: 1, f_favail: 1, f_namemax: 255 }),
  });
}

/** An adapter whose replies are recorded per request id; `call` dispatches one request and waits for its answer. */
function harness(handlers: FsHandlers, extra: Partial<SessionAdapterOptions> = {}) {
  const answers = new Map<number, [string, unknown[]][]>();
  const record = (name: string) => (id: number, ...args: unknown[]) => {
    answers.set(id, [...(answers.get(id) ?? []), [name, args]]);
    return 0;
  };
  const replies = Object.fromEntries(['replyErr', 'replyAttr', 'replyEntry', 'replyOpen', 'replyData', 'replyWrite', 'replyLseek',
    'replyStatfs', 'replyDirents'].map((name) => [name, record(name)])) as unknown as SessionReplies;
  const adapter = createSessionAdapter(handlers, { attrTimeout: 0, entryTimeout: 1, kernelCache: 'default', ...extra }, replies);
  let nextId = 1;
  async function call(op: number, ino: number, fh = 0, n1 = 0, n2 = 0, n3 = 0, extra?: string | Buffer | number): Promise<[string, unknown[]]> {
    const id = nextId++;
    adapter.dispatch(op, id, ino, fh, n1, n2, n3, extra);
    await adapter.drained();
    await new Promise((resolve) => setTimeout(resolve, 2));
    const got = answers.get(id) ?? [];
    expect(got).toHaveLength(1);
    return got[0];
  }
  return { adapter, call };
}

describe('session adapter', () => {
  it('looks names up into stable inodes and answers getattr by inode', async () => {
    const { call } = harness(realHandlers());
    const [kind, entry] = await call(OP.LOOKUP, ROOT, 0, 0, 0, 0, 'disk.raw');
    expect(kind).toBe('replyEntry');
    const ino = entry[2] as number;
    expect(ino).toBeGreaterThan(ROOT);
    expect(entry[7]).toBe(65536);
    expect((await call(OP.LOOKUP, ROOT, 0, 0, 0, 0, 'disk.raw'))[1][2]).toBe(ino);
    const [attrKind, attr] = await call(OP.GETATTR, ino);
    expect([attrKind, attr[1], attr[6]]).toEqual(['replyAttr', ino, 65536]);
    expect(await call(OP.LOOKUP, ROOT, 0, 0, 0, 0, 'nope')).toEqual(['replyErr', [E.ENOENT]]);
    expect(await call(OP.GETATTR, 999)).toEqual(['replyErr', [E.ESTALE]]);
  });

  it('opens, reads, writes and releases disk.raw', async () => {
    const device = new MemoryDevice(Buffer.from('0123456789abcdef'.repeat(4096)));
    const { call } = harness(realHandlers(device));
    const ino = (await call(OP.LOOKUP, ROOT, 0, 0, 0, 0, 'disk.raw'))[1][2] as number;
    const [openKind, open] = await call(OP.OPEN, ino, 0, 2 /* O_RDWR */);
    expect(openKind).toBe('replyOpen');
    const fh = open[0] as number;
    expect(open.slice(1)).toEqual([false, false]);
    const [readKind, read] = await call(OP.READ, ino, fh, 10, 3);
    expect(readKind).toBe('replyData');
    expect((read[0] as Buffer).subarray(0, read[1] as number).toString()).toBe('3456789abc');
    expect(await call(OP.WRITE, ino, fh, 4, 100, 0, Buffer.from('WXYZ'))).toEqual(['replyWrite', [4]]);
    expect(device.data.subarray(100, 104).toString()).toBe('WXYZ');
    expect(await call(OP.FSYNC, ino, fh, 1)).toEqual(['replyErr', [0]]);
    expect(await call(OP.RELEASE, ino, fh)).toEqual(['replyErr', [0]]);
    expect(await call(OP.READ, ino, fh, 10, 0)).toEqual(['replyErr', [E.EBADF]]);
  });

  it('setattr truncates (by handle or path), sets times and refuses chmod/chown', async () => {
    const { call } = harness(realHandlers());
    const ino = (await call(OP.LOOKUP, ROOT, 0, 0, 0, 0, 'disk.raw'))[1][2] as number;
    const [kind, attr] = await call(OP.SETATTR, ino, 0, SET_ATTR.SIZE, 100_000);
    expect(kind).toBe('replyAttr');
    expect(attr[6]).toBeGreaterThanOrEqual(100_000);
    const when = Date.UTC(2020, 0, 2);
    const [, timed] = await call(OP.SETATTR, ino, 0, SET_ATTR.MTIME, 0, 0, when);
    expect(timed[10]).toBe(when);
    expect(await call(OP.SETATTR, ino, 0, SET_ATTR.MODE)).toEqual(['replyErr', [E.EPERM]]);
    expect(await call(OP.SETATTR, ino, 0, SET_ATTR.UID)).toEqual(['replyErr', [E.EPERM]]);
  });

  it('lists directories with inodes and resumes at the offset', async () => {
    const { call } = harness(realHandlers());
    expect(await call(OP.OPENDIR, ROOT)).toEqual(['replyOpen', [0, false, false]]);
    const [kind, dirents] = await call(OP.READDIR, ROOT, 0, 4096, 2);
    expect(kind).toBe('replyDirents');
    expect(dirents[0]).toBe(4096);
    expect(dirents[1]).toBe(2);
    expect(dirents[2]).toEqual(['.', '..', 'disk.raw', 'info.json', 'map.json', 'layout.txt', 'check.json', 'snapshots']);
    const inos = dirents[3] as number[];
    expect(inos.slice(0, 2)).toEqual([ROOT, ROOT]);
    expect(new Set(inos.slice(2)).size).toBe(6);
    const diskIno = (await call(OP.LOOKUP, ROOT, 0, 0, 0, 0, 'disk.raw'))[1][2];
    expect(inos[2]).toBe(diskIno);
    const ino = inos[2];
    expect(await call(OP.OPENDIR, ino)).toEqual(['replyErr', [E.ENOTDIR]]);
  });

  it('refuses creating and removing entries with EPERM, and answers statfs', async () => {
    const { call } = harness(realHandlers());
    for (const op of [OP.CREATE, OP.MKNOD, OP.MKDIR, OP.UNLINK, OP.RMDIR, OP.SYMLINK, OP.RENAME, OP.LINK]) {
      expect(await call(op, ROOT, 0, 0, 0, 0, 'x')).toEqual(['replyErr', [E.EPERM]]);
    }
    const [kind, statfs] = await call(OP.STATFS, ROOT);
    expect([kind, statfs[0]]).toEqual(['replyStatfs', 4096]);
  });

  it('answers EIO for an unexpected throw and counts requests in flight', async () => {
    const { adapter, call } = harness(new Proxy({} as FsHandlers, { get: () => () => { throw new Error('bug'); } }));
    expect(await call(OP.GETATTR, ROOT)).toEqual(['replyErr', [E.EIO]]);
    expect(adapter.inFlight()).toBe(0);
  });
});

/** A KernelCache that records what the adapter asks of it (write-backs end at once). */
function recordingKernel(): KernelCache & { log: string[] } {
  const log: string[] = [];
  return {
    log,
    dropPages: (ino, offset, length) => void log.push(`drop ${ino} ${offset} ${length}`),
    writeBack: async (path, offset) => void log.push(`writeBack ${path} ${offset}`),
  };
}

describe('session adapter with the kernel writeback cache', () => {
  const wb = { writebackCache: true, rawPath: '/disk.raw' };

  it('gives a generated file an inode per size, uncached lookups and direct_io; disk.raw keeps one inode and the page cache', async () => {
    const device = new MemoryDevice(4 * 65536);
    const { call } = harness(realHandlers(device), wb);
    const raw = await call(OP.LOOKUP, ROOT, 0, 0, 0, 0, 'disk.raw');
    expect(raw[1][0]).toBe(1);
    const rawIno = raw[1][2] as number;
    const first = (await call(OP.LOOKUP, ROOT, 0, 0, 0, 0, 'map.json'))[1];
    expect(first[0]).toBe(0);
    expect((await call(OP.LOOKUP, ROOT, 0, 0, 0, 0, 'map.json'))[1][2]).toBe(first[2]);
    const fh = (await call(OP.OPEN, rawIno, 0, 2))[1][0] as number;
    expect(await call(OP.WRITE, rawIno, fh, 4, 2 * 65536, 0, Buffer.from('WXYZ'))).toEqual(['replyWrite', [4]]);
    const second = (await call(OP.LOOKUP, ROOT, 0, 0, 0, 0, 'map.json'))[1];
    expect(second[7]).toBeGreaterThan(first[7] as number);
    expect(second[2]).not.toBe(first[2]);
    expect((await call(OP.LOOKUP, ROOT, 0, 0, 0, 0, 'disk.raw'))[1][2]).toBe(rawIno);
    const dirents = (await call(OP.READDIR, ROOT, 0, 4096, 0))[1];
    expect((dirents[3] as number[])[(dirents[2] as string[]).indexOf('map.json')]).toBe(second[2]);
    expect((await call(OP.OPEN, second[2] as number, 0, 0))[1].slice(1)).toEqual([true, false]);
    expect((await call(OP.OPEN, rawIno, 0, 0))[1].slice(1)).toEqual([false, false]);
  });

  it('has the kernel write its dirty pages of disk.raw back before answering SEEK_DATA/SEEK_HOLE', async () => {
    const { adapter, call } = harness(realHandlers(new MemoryDevice(4 * 65536)), wb);
    const kernel = recordingKernel();
    adapter.attachKernelCache(kernel);
    const rawIno = (await call(OP.LOOKUP, ROOT, 0, 0, 0, 0, 'disk.raw'))[1][2] as number;
    const fh = (await call(OP.OPEN, rawIno, 0, 2))[1][0] as number;
    expect(await call(OP.LSEEK, rawIno, fh, 65536 + 7, 4 /* SEEK_HOLE */)).toEqual(['replyLseek', [65536 + 7]]);
    expect(kernel.log).toEqual([`writeBack /disk.raw ${65536 + 7}`]);
  });

  it('on a compressed mount drops pages once written, read pages READ_BEHIND_BYTES later, and everything on release', async () => {
    const { adapter, call } = harness(realHandlers(new MemoryDevice(4 * READ_BEHIND_BYTES)), { ...wb, dropCachedData: true });
    const kernel = recordingKernel();
    adapter.attachKernelCache(kernel);
    const ino = (await call(OP.LOOKUP, ROOT, 0, 0, 0, 0, 'disk.raw'))[1][2] as number;
    const fh = (await call(OP.OPEN, ino, 0, 2))[1][0] as number;
    await call(OP.WRITE, ino, fh, 8192, 4096, 0, Buffer.alloc(8192, 1));
    expect(kernel.log).toEqual([`drop ${ino} 4096 8192`]);
    kernel.log.length = 0;
    const chunk = 1024 * 1024;
    for (let pos = 0; pos < READ_BEHIND_BYTES + 2 * chunk; pos += chunk) await call(OP.READ, ino, fh, chunk, pos);
    expect(kernel.log).toEqual([`drop ${ino} 0 ${chunk}`, `drop ${ino} ${chunk} ${chunk}`]);
    kernel.log.length = 0;
    await call(OP.RELEASE, ino, fh);
    expect(kernel.log).toEqual([`drop ${ino} 0 0`]);
  });
});
