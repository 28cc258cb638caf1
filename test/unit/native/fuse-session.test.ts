/**
 * native/fuse_session.c through its binding (src/io/native.ts fuseSession), without the adapter: a
 * tiny file system served from the test's own event loop (the test touches the mount only through
 * Node's asynchronous fs, whose threadpool blocks instead of the loop). Covers libfuse's own reason
 * on a refused mount, requests answered out of order, answer-once request ids, readdir entries, the
 * 'exited' event on an external unmount; with the writeback cache, the kernel worker's write-back
 * (dirty pages reach us as WRITEs, then 'written-back' with the token) and inval notifications.
 */
import { mkdir, open, readdir, rm, stat } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { fuseSession, type FuseDispatch, type FuseSessionHandle, type StatFields } from '../../../src/io/native.js';
import { run } from '../../helpers/exec.js';
import { tempDir } from '../../helpers/tmp.js';
import { requireFuse } from '../../helpers/tools.js';

const OP = fuseSession.OP;
const E = osConstants.errno;
const FILE_INO = 2;
const FILE_BYTES = 1 << 20;
const ready = requireFuse();

function attr(ino: number): StatFields {
  const now = Date.now();
  return ino === FILE_INO ? [ino, 0o100644, 1, 0, 0, FILE_BYTES, 0, 4096, now, now, now] : [ino, 0o040755, 2, 0, 0, 4096, 0, 4096, now, now, now];
}

interface Mounted {
  mnt: string;
  handle: FuseSessionHandle;
  events: [string, string][];
}

let current: Mounted | undefined;

/** Mount `dispatch` on a new directory and wait for INIT. */
async function mountWith(dispatch: FuseDispatch, writebackCache = false): Promise<Mounted> {
  const mnt = join(await tempDir('fuse-session'), 'mnt');
  await mkdir(mnt);
  const events: [string, string][] = [];
  const handle = fuseSession.mount(mnt, ['-o', 'subtype=qcow2fuse-test'], dispatch,
    (kind, detail, token, errno) => events.push(kind === 'written-back' ? [kind, `${token} ${errno}`] : [kind, detail]), writebackCache);
  current = { mnt, handle, events };
  for (let i = 0; i < 500 && !events.some(([kind]) => kind === 'init'); i++) await sleep(10);
  expect(events[0]?.[0]).toBe('init');
  return current;
}

afterEach(async () => {
  if (current === undefined) return;
  // Never a synchronous child here: umount stats the mountpoint, which this very loop serves.
  await run('umount', ['-l', current.mnt]);
  fuseSession.close(current.handle);
  await rm(join(current.mnt, '..'), { recursive: true, force: true });
  current = undefined;
});

/** A file system with one file "f" whose reads answer its offset's low byte, each after `delayMs(offset)`. */
function simpleFs(delayMs: (offset: number) => number = () => 0): FuseDispatch {
  return (op, id, ino, _fh, n1, n2, _n3, extra) => {
    switch (op) {
      case OP.LOOKUP:
        if (ino === 1 && extra === 'f') fuseSession.replyEntry(id, 1, 1, ...attr(FILE_INO));
        else fuseSession.replyErr(id, E.ENOENT);
        return;
      case OP.GETATTR: return void fuseSession.replyAttr(id, 1, ...attr(ino));
      case OP.OPEN: return void fuseSession.replyOpen(id, 7, true, false);
      case OP.OPENDIR: return void fuseSession.replyOpen(id, 0, false, false);
      case OP.READDIR: return void fuseSession.replyDirents(id, n1, n2, ['.', '..', 'f'], [1, 1, FILE_INO], [0o040000, 0o040000, 0o100000]);
      case OP.READ:
        setTimeout(() => fuseSession.replyData(id, Buffer.alloc(n1, n2 & 0xff), n1), delayMs(n2));
        return;
      case OP.FLUSH:
      case OP.RELEASE:
        return void fuseSession.replyErr(id, 0);
      default: fuseSession.replyErr(id, E.ENOSYS);
    }
  };
}

describe.skipIf(!ready)('FUSE session (native)', () => {
  it('refuses a mount with libfuse\'s own reason', async () => {
    const mnt = await tempDir('fuse-session-bad');
    expect(() => fuseSession.mount(mnt, ['-o', 'no_such_option'], () => undefined, () => undefined))
      .toThrow(/unknown option.*no_such_option/);
    await rm(mnt, { recursive: true, force: true });
  });

  it('serves lookups, attributes, directory entries and reads answered out of order', async () => {
    const { mnt } = await mountWith(simpleFs((offset) => (offset === 0 ? 60 : 0)));
    expect((await readdir(mnt)).sort()).toEqual(['f']);
    expect((await stat(join(mnt, 'f'))).size).toBe(FILE_BYTES);
    const file = await open(join(mnt, 'f'), 'r');
    try {
      const order: number[] = [];
      const reads = [0, 4096, 8192].map(async (offset) => {
        const buf = Buffer.alloc(4096);
        await file.read(buf, 0, 4096, offset);
        order.push(offset);
        return buf[0];
      });
      expect(await Promise.all(reads)).toEqual([0, 0, 0]);
      expect(order.at(-1)).toBe(0);
    } finally {
      await file.close();
    }
  });

  it('answers each request once: a second answer throws EALREADY', async () => {
    const seen: number[] = [];
    const { mnt } = await mountWith((op, id, ino, fh, n1, n2, n3, extra) => {
      if (op === OP.GETATTR) seen.push(id);
      simpleFs()(op, id, ino, fh, n1, n2, n3, extra);
    });
    await stat(mnt);
    expect(seen.length).toBeGreaterThan(0);
    expect(() => fuseSession.replyErr(seen[0], 0)).toThrow(expect.objectContaining({ code: 'EALREADY' }));
    expect(() => fuseSession.replyErr(123456789, 0)).toThrow(expect.objectContaining({ code: 'EALREADY' }));
  });

  it('reports an external unmount as exited', async () => {
    const mounted = await mountWith(simpleFs());
    expect((await run('umount', [mounted.mnt])).code).toBe(0);
    for (let i = 0; i < 500 && !mounted.events.some(([kind]) => kind === 'exited'); i++) await sleep(10);
    expect(mounted.events.map(([kind]) => kind)).toEqual(['init', 'exited']);
  });

  it('with the writeback cache, writes back dirty pages on request (written-back event with the token) and sends inval notifications', async () => {
    const writes: [number, number][] = [];
    const base = simpleFs();
    const mounted = await mountWith((op, id, ino, fh, n1, n2, n3, extra) => {
      if (op === OP.OPEN) return void fuseSession.replyOpen(id, 7, false, false);
      if (op === OP.WRITE) {
        writes.push([n2, n1]);
        expect((extra as Buffer).subarray(n3, n3 + n1).every((b) => b === 0x5a)).toBe(true);
        return void fuseSession.replyWrite(id, n1);
      }
      base(op, id, ino, fh, n1, n2, n3, extra);
    }, true);
    const file = await open(join(mounted.mnt, 'f'), 'r+');
    try {
      await file.write(Buffer.alloc(8192, 0x5a), 0, 8192, 65536);
      expect(writes).toEqual([]);
      expect(fuseSession.writeBack(mounted.handle, '/f', 0, 42)).toBe(true);
      for (let i = 0; i < 500 && !mounted.events.some(([kind]) => kind === 'written-back'); i++) await sleep(10);
      expect(mounted.events.filter(([kind]) => kind === 'written-back')).toEqual([['written-back', '42 0']]);
      expect(writes.reduce((bytes, [, length]) => bytes + length, 0)).toBeGreaterThanOrEqual(8192);
      expect(writes.every(([pos]) => pos >= 65536 && pos < 65536 + 8192)).toBe(true);
      expect(fuseSession.notifyInval(mounted.handle, FILE_INO, 0, 0)).toBe(true);
    } finally {
      await file.close();
    }
    expect(fuseSession.writeBack(mounted.handle, '/missing', 0, 43)).toBe(true);
    for (let i = 0; i < 500 && mounted.events.filter(([kind]) => kind === 'written-back').length < 2; i++) await sleep(10);
    expect(mounted.events.filter(([kind]) => kind === 'written-back')[1]).toEqual(['written-back', `43 ${E.ENOENT}`]);
  });

  it('without the writeback cache has no kernel worker: inval and write-back are not queued', async () => {
    const mounted = await mountWith(simpleFs());
    expect(fuseSession.notifyInval(mounted.handle, FILE_INO, 0, 0)).toBe(false);
    expect(fuseSession.writeBack(mounted.handle, '/f', 0, 1)).toBe(false);
  });
});
