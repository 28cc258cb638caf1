/**
 * The FUSE adapter without a mount: exactly-once answers, errno mapping of throws and rejections,
 * buffer copying for read and write, the in-flight count.
 */
import { constants as osConstants } from 'node:os';
import { constants } from 'node:fs';
import { describe, expect, it, vi } from 'vitest';
import { createFuseAdapter, type FuseNativeOps } from '../../../src/fuse/adapter.js';
import { createHandlers, type FsHandlers } from '../../../src/fuse/ops.js';
import { CodedError } from '../../../src/io/errors.js';
import { MemoryDevice } from './memory-device.js';

const E = osConstants.errno;

function realHandlers(device = new MemoryDevice(65536)): FsHandlers {
  return createHandlers(device, {
    readOnly: false, nogrow: false, rawName: 'disk.raw', statfsPath: '/', uid: 0, gid: 0,
    statVfs: async () => ({ f_bsize: 4096, f_frsize: 4096, f_blocks: 1, f_bfree: 1, f_bavail: 1, f_files: 1, f_ffree: 1, f_favail: 1, f_namemax: 255 }),
  });
}

/** Call a fuse-native op and collect every answer it gives (there must be exactly one). */
async function call(ops: FuseNativeOps, op: keyof FuseNativeOps, ...args: unknown[]): Promise<unknown[]> {
  const answers: unknown[][] = [];
  await new Promise<void>((resolve) => {
    (ops[op] as (...a: unknown[]) => void)(...args, (...answer: unknown[]) => {
      answers.push(answer);
      resolve();
    });
  });
  await new Promise((r) => setTimeout(r, 5));
  expect(answers).toHaveLength(1);
  return answers[0];
}

/** Handlers whose every method is `impl` (for error-path tests). */
function stubHandlers(impl: () => Promise<never>): FsHandlers {
  return new Proxy({} as FsHandlers, { get: () => impl });
}

describe('answers', () => {
  it('getattr answers 0 and the stat, unknown paths -ENOENT', async () => {
    const { ops } = createFuseAdapter(realHandlers());
    const [code, st] = await call(ops, 'getattr', '/disk.raw');
    expect(code).toBe(0);
    expect(st).toMatchObject({ size: 65536 });
    expect((await call(ops, 'getattr', '/nope'))[0]).toBe(-E.ENOENT);
  });

  it('read copies the data into the kernel buffer and answers the byte count', async () => {
    const device = new MemoryDevice(Buffer.from('0123456789abcdef'.repeat(64)));
    const { ops } = createFuseAdapter(realHandlers(device));
    const [, fh] = await call(ops, 'open', '/disk.raw', constants.O_RDONLY);
    const buf = Buffer.alloc(10, 0xee);
    expect(await call(ops, 'read', '/disk.raw', fh, buf, 10, 3)).toEqual([10]);
    expect(buf.toString()).toBe('3456789abc');
    const tail = Buffer.alloc(100, 0xee);
    expect(await call(ops, 'read', '/disk.raw', fh, tail, 100, 1020)).toEqual([4]);
    expect(tail.subarray(0, 4).toString()).toBe('cdef');
  });

  it('write copies the buffer before the handler runs (fuse-native reuses it)', async () => {
    const device = new MemoryDevice(4096);
    const release = device.hold('write');
    const { ops } = createFuseAdapter(realHandlers(device));
    const [, fh] = await call(ops, 'open', '/disk.raw', constants.O_RDWR);
    const buf = Buffer.from('payload!');
    let answer: unknown[] | undefined;
    ops.write('/disk.raw', fh as number, buf, buf.length, 100, (...a: unknown[]) => { answer = a; });
    buf.fill(0);
    release();
    await vi.waitFor(() => expect(answer).toEqual([8]));
    expect(device.data.subarray(100, 108).toString()).toBe('payload!');
  });

  it('maps coded errors, Node system errors, corruption and unknown throws', async () => {
    const cases: [unknown, number][] = [
      [new CodedError('ENOSPC', 'host full'), -E.ENOSPC],
      [new CodedError('EROFS', 'read-only'), -E.EROFS],
      [new CodedError('ERANGE', 'past the end'), -E.ERANGE],
      [new CodedError('ECORRUPT', 'bad L2'), -E.EIO],
      [Object.assign(new Error('disk gone'), { code: 'EIO', errno: -5 }), -E.EIO],
      [Object.assign(new Error('node internal'), { code: 'ERR_OUT_OF_RANGE' }), -E.EIO],
      [new TypeError('bug'), -E.EIO],
      ['a string', -E.EIO],
    ];
    for (const [thrown, errno] of cases) {
      // eslint-disable-next-line @typescript-eslint/prefer-promise-reject-errors -- rejections with non-Errors are what is tested
      const rejecting = createFuseAdapter(stubHandlers(() => Promise.reject(thrown)));
      expect((await call(rejecting.ops, 'getattr', '/x'))[0]).toBe(errno);
      const throwing = createFuseAdapter(stubHandlers(() => { throw thrown; }));
      expect((await call(throwing.ops, 'fsync', '/x', 0, 1))[0]).toBe(errno);
    }
  });

  it('answers read/write errors as the negative errno in the count position', async () => {
    const { ops } = createFuseAdapter(stubHandlers(() => Promise.reject(new CodedError('EFBIG', 'too big'))));
    expect(await call(ops, 'write', '/disk.raw', 1, Buffer.alloc(4), 4, 0)).toEqual([-E.EFBIG]);
    expect(await call(ops, 'read', '/disk.raw', 1, Buffer.alloc(4), 4, 0)).toEqual([-E.EFBIG]);
  });

  it('reports I/O failures to onError, not refusals', async () => {
    const onError = vi.fn<(op: string, path: string, err: unknown, errno: string) => void>();
    const device = new MemoryDevice(4096);
    const { ops } = createFuseAdapter(realHandlers(device), { onError });
    await call(ops, 'getattr', '/missing');
    expect(onError).not.toHaveBeenCalled();
    const [, fh] = await call(ops, 'open', '/disk.raw', constants.O_RDWR);
    device.failNext('write', 'ENOSPC');
    await call(ops, 'write', '/disk.raw', fh, Buffer.alloc(4), 4, 0);
    device.failNext('read', 'ECORRUPT');
    await call(ops, 'read', '/disk.raw', fh, Buffer.alloc(4), 4, 0);
    expect(onError.mock.calls.map((c) => [c[0], c[3]])).toEqual([['write', 'ENOSPC'], ['read', 'EIO']]);
  });

  it('refuses namespace changes with -EPERM', async () => {
    const { ops } = createFuseAdapter(realHandlers());
    expect(await call(ops, 'unlink', '/disk.raw')).toEqual([-E.EPERM]);
    expect(await call(ops, 'rename', '/disk.raw', '/x')).toEqual([-E.EPERM]);
    expect(await call(ops, 'mkdir', '/d', 0o755)).toEqual([-E.EPERM]);
    expect(await call(ops, 'create', '/new', 0o644)).toEqual([-E.EPERM]);
    expect(await call(ops, 'chown', '/disk.raw', 1, 1)).toEqual([-E.EPERM]);
  });

  it('reads utimens UTIME_NOW as now', async () => {
    const handlers = realHandlers();
    const { ops } = createFuseAdapter(handlers);
    const before = Date.now();
    expect(await call(ops, 'utimens', '/disk.raw', 1073, 1073)).toEqual([0]);
    expect((await handlers.getattr('/disk.raw')).mtime.getTime()).toBeGreaterThanOrEqual(before);
    expect(await call(ops, 'utimens', '/disk.raw', 1_600_000_000_000, 1_600_000_000_000)).toEqual([0]);
    expect((await handlers.getattr('/disk.raw')).mtime.getTime()).toBe(1_600_000_000_000);
  });
});

describe('in-flight tracking', () => {
  it('counts requests until answered and resolves drained() when idle', async () => {
    const device = new MemoryDevice(4096);
    const adapter = createFuseAdapter(realHandlers(device));
    const [, fh] = await call(adapter.ops, 'open', '/disk.raw', constants.O_RDONLY);
    const release = device.hold('read');
    let answered = 0;
    for (let i = 0; i < 3; i++) adapter.ops.read('/disk.raw', fh as number, Buffer.alloc(8), 8, 0, () => { answered++; });
    expect(adapter.inFlight()).toBe(3);
    let drained = false;
    const waiting = adapter.drained().then(() => { drained = true; });
    await new Promise((r) => setTimeout(r, 5));
    expect(drained).toBe(false);
    release();
    await waiting;
    expect([answered, adapter.inFlight()]).toEqual([3, 0]);
  });
});
