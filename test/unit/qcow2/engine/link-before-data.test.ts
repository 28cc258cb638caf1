/**
 * Linking preallocated clusters before their data (ClusterMap.linkZeroedBeforeData): a write into
 * a new cluster that reads as zero on disk, replacing contents that read as zero, links the cluster
 * under the lock, so other writes to the same cluster go straight to it instead of waiting for the
 * first one's data. One allocating data write is held at a gate to see the interleavings:
 * - a second write to the cluster completes while the first is held (and must wait when the old
 *   contents come from a backing file, where the first write copies them in);
 * - an image copied while the first write is held, after a flush (what a crash leaves), is clean
 *   and shows the second write's data and zeros for the first;
 * - the first write failing leaves an allocated, zero cluster holding the second write: clean, no leak.
 */
import { copyFile } from 'node:fs/promises';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { ForwardingHostFile, type HostFile, type HostFileOpener, type WritePoint } from '../../../../src/io/host-file.js';
import { HostIoError } from '../../../../src/io/errors.js';
import { openNodeHostFile } from '../../../../src/io/node-host-file.js';
import { Qcow2Image } from '../../../../src/qcow2/engine/image.js';
import { patternBuffer } from '../../../helpers/patterns.js';
import { qemuImgCheckClean, qemuImgCreate } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTool } from '../../../helpers/tools.js';
import { openImage } from '../../../../src/node.js';

const hasQemu = requireTool('qemu-img');
const KiB = 1024;
const MiB = 1024 * KiB;

/** Forwards to a real file; the first guest-data write is held until `release()` (or `fail()`). */
class GateFile extends ForwardingHostFile {
  private held = false;
  private open!: () => void;
  private reject!: (error: Error) => void;
  private readonly gate = new Promise<void>((resolve, reject) => { this.open = resolve; this.reject = reject; });
  /** Resolves when the held write has reached the gate. */
  readonly reached: Promise<void>;
  private markReached!: () => void;

  constructor(inner: HostFile) {
    super(inner);
    this.reached = new Promise((resolve) => { this.markReached = resolve; });
  }

  release(): void { this.open(); }
  fail(): void { this.reject(new HostIoError('EIO', this.path, 'pwrite', undefined, 'injected')); }

  override async pwrite(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<void> {
    if (point === 'data' && !this.held) {
      this.held = true;
      this.markReached();
      await this.gate;
    }
    return this.inner.pwrite(buf, hostOffset, point);
  }
}

const FIRST = patternBuffer(4 * KiB, 1, 0);
const SECOND = patternBuffer(4 * KiB, 2, 0);

/**
 * Open `path` writable with the image file behind a gate (backing files open normally) and start
 * the allocating write of FIRST at 0; resolves once that write's data is held at the gate.
 */
async function startHeldWrite(path: string, preallocate = true): Promise<{ image: Qcow2Image; gate: GateFile; first: Promise<void> }> {
  let gate: GateFile | undefined;
  const opener: HostFileOpener = async (p, options) => {
    const file = await openNodeHostFile(p, options);
    if (p !== path) return file;
    gate = new GateFile(file);
    return gate;
  };
  const image = await openImage(path, { readOnly: false, openHostFile: opener, preallocate });
  const first = image.write(0, FIRST);
  await gate!.reached;
  return { image, gate: gate!, first };
}

/** The first 64 KiB of the guest: `fill`, with SECOND at 8 KiB and, when `withFirst`, FIRST at 0. */
function firstCluster(fill: number, withFirst: boolean): Buffer {
  const expected = Buffer.alloc(64 * KiB, fill);
  if (withFirst) FIRST.copy(expected, 0);
  SECOND.copy(expected, 8 * KiB);
  return expected;
}

/**
 * True when `promise` settles within `ms` milliseconds. With the allocating write held at the gate,
 * a write that waits for it never settles: the positive checks give a slow machine 20 s, the
 * negative ones wait 300 ms, far longer than an unblocked 4 KiB write takes.
 */
async function settlesWithin(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(false), ms); });
  try {
    return await Promise.race([promise.then(() => true, () => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

describe.skipIf(!hasQemu)('linking zero-preallocated clusters before their data', () => {
  const tmp = useTempDir('link-before-data');

  it('lets a second write into the cluster complete while the allocating write is still in flight', async () => {
    const path = join(tmp.path, 'a.qcow2');
    await qemuImgCreate(path, 16 * MiB);
    const { image, gate, first } = await startHeldWrite(path);
    const second = image.write(8 * KiB, SECOND);
    expect(await settlesWithin(second, 20_000)).toBe(true);
    await second;
    expect((await image.read(8 * KiB, 4 * KiB)).equals(SECOND)).toBe(true);
    gate.release();
    await first;
    expect((await image.read(0, 4 * KiB)).equals(FIRST)).toBe(true);
    expect(await image.allocatedBytes()).toBeGreaterThan(0);
    await image.close();
    await qemuImgCheckClean(path);
  });

  it('keeps the second write waiting when the old contents come from a backing file', async () => {
    const base = join(tmp.path, 'base.qcow2');
    const path = join(tmp.path, 'top.qcow2');
    await qemuImgCreate(base, 16 * MiB);
    const baseImage = await openImage(base, { readOnly: false });
    await baseImage.write(0, Buffer.alloc(64 * KiB, 0x5a));
    await baseImage.close();
    await qemuImgCreate(path, 16 * MiB, {}, { backing: base, backingFormat: 'qcow2' });
    const { image, gate, first } = await startHeldWrite(path);
    const second = image.write(8 * KiB, SECOND);
    expect(await settlesWithin(second, 300)).toBe(false);
    gate.release();
    await Promise.all([first, second]);
    expect((await image.read(0, 64 * KiB)).equals(firstCluster(0x5a, true))).toBe(true);
    await image.close();
    await qemuImgCheckClean(path);
  });

  it('leaves a clean image with zeros for a write that never reached the disk (crash after a flush)', async () => {
    const path = join(tmp.path, 'crash.qcow2');
    const copy = join(tmp.path, 'crash-copy.qcow2');
    await qemuImgCreate(path, 16 * MiB);
    const { image, gate, first } = await startHeldWrite(path);
    await image.write(8 * KiB, SECOND);
    await image.flush();
    await copyFile(path, copy);
    gate.release();
    await first;
    await image.close();
    await qemuImgCheckClean(path);

    const report = await qemuImgCheckClean(copy);
    expect(report.leaks ?? 0).toBe(0);
    const crashed = await openImage(copy, { readOnly: true, lock: false });
    expect((await crashed.read(0, 64 * KiB)).equals(firstCluster(0, false))).toBe(true);
    await crashed.close();
  });

  it('keeps the cluster, zero and allocated, when the allocating write fails', async () => {
    const path = join(tmp.path, 'fail.qcow2');
    await qemuImgCreate(path, 16 * MiB);
    const { image, gate, first } = await startHeldWrite(path);
    await image.write(8 * KiB, SECOND);
    gate.fail();
    await expect(first).rejects.toMatchObject({ code: 'EIO' });
    expect((await image.read(0, 64 * KiB)).equals(firstCluster(0, false))).toBe(true);
    await image.close();
    const report = await qemuImgCheckClean(path);
    expect(report.leaks ?? 0).toBe(0);
  });

  it('does not link first without preallocation (the data goes first, as usual)', async () => {
    const path = join(tmp.path, 'noprealloc.qcow2');
    await qemuImgCreate(path, 16 * MiB);
    const { image, gate, first } = await startHeldWrite(path, false);
    const second = image.write(8 * KiB, SECOND);
    expect(await settlesWithin(second, 300)).toBe(false);
    gate.release();
    await Promise.all([first, second]);
    await image.close();
    await qemuImgCheckClean(path);
  });
});
