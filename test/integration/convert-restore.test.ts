/**
 * Issue 13, restore: `convert -O raw` of qcow2 images compressed with every compression type, with
 * a backing chain and with a snapshot gives the bytes `qemu-img convert -O raw` gives (and as sparse);
 * `convert -O qcow2` without -c of a compressed image decompresses it into a clean, identical image.
 */
import { stat, writeFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { convertCli, dataExtentBytes, writeSourceDisk } from './convert-harness.js';
import { sha256File } from '../helpers/files.js';
import { qemuImg, qemuImgCheckClean, qemuImgCompare, qemuIoOk } from '../helpers/qemu.js';
import { useTempDir } from '../helpers/tmp.js';
import { requireTools } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const ready = requireTools('qemu-img', 'qemu-io');

async function qemuOk(args: string[]): Promise<void> {
  const r = await qemuImg(args);
  expect(r.code, `qemu-img ${args.join(' ')}: ${r.stderr}`).toBe(0);
}

/** Ours and qemu-img's raw output of `image` (extra args for both): same bytes, ours no less sparse. */
async function expectSameRaw(image: string, dir: string, extra: string[] = []): Promise<void> {
  await qemuOk(['convert', ...extra, '-O', 'raw', image, `${dir}/theirs.raw`]);
  await convertCli([...extra, '-O', 'raw', image, `${dir}/ours.raw`]);
  expect(await sha256File(`${dir}/ours.raw`), image).toBe(await sha256File(`${dir}/theirs.raw`));
  expect(await dataExtentBytes(`${dir}/ours.raw`), `${image}: data extents`).toBeLessThanOrEqual(await dataExtentBytes(`${dir}/theirs.raw`));
}

describe.skipIf(!ready)('convert: restore (qcow2 → raw)', () => {
  const tmp = useTempDir('convert-restore');

  it('compressed with zlib and zstd, cluster sizes 4 KiB–2 MiB: the bytes qemu-img writes', async () => {
    const disk = await writeSourceDisk(tmp.file('disk.raw'));
    const variants = [
      ['-c'], ['-c', '-o', 'compression_type=zstd'], ['-c', '-o', 'cluster_size=4k'], ['-c', '-o', 'cluster_size=2M,compression_type=zstd'],
      ['-c', '-o', 'extended_l2=on,compression_type=zstd'], [],
    ];
    for (const args of variants) {
      const image = tmp.file('image.qcow2');
      await qemuOk(['convert', '-f', 'raw', ...args, '-O', 'qcow2', disk.path, image]);
      await expectSameRaw(image, tmp.path);
      expect(await sha256File(tmp.file('ours.raw'))).toBe(await sha256File(disk.path));
      // Decompressed into a plain qcow2 image.
      await convertCli(['-O', 'qcow2', image, tmp.file('plain.qcow2')]);
      expect(await qemuImgCompare(disk.path, tmp.file('plain.qcow2'), { formatA: 'raw' }), args.join(' ')).toBe(true);
      const report = await qemuImgCheckClean(tmp.file('plain.qcow2'));
      expect(report['compressed-clusters'] ?? 0).toBe(0);
    }
  });

  it('a backing chain (compressed base, overlay with writes, zeroes and discards) and a snapshot', async () => {
    const disk = await writeSourceDisk(tmp.file('disk.raw'));
    await qemuOk(['convert', '-f', 'raw', '-c', '-o', 'compression_type=zstd', '-O', 'qcow2', disk.path, tmp.file('base.qcow2')]);
    await qemuOk(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', tmp.file('top.qcow2')]);
    await qemuIoOk(tmp.file('top.qcow2'), ['write -P 0x33 100k 300k', 'write -z 2M 128k', `discard ${12 * MiB} 1M`]);
    await qemuOk(['snapshot', '-c', 'snap', tmp.file('top.qcow2')]);
    await qemuIoOk(tmp.file('top.qcow2'), [`write -P 0x44 ${19 * MiB} 64k`, `write -c -P 0x55 ${6 * MiB} 64k`]);
    await expectSameRaw(tmp.file('top.qcow2'), tmp.path);
    await expectSameRaw(tmp.file('top.qcow2'), tmp.path, ['-l', 'snap']);
  });

  it('over an existing, larger raw file: its old bytes are gone and it takes the image\'s size', async () => {
    const disk = await writeSourceDisk(tmp.file('disk.raw'));
    const image = tmp.file('image.qcow2');
    await qemuOk(['convert', '-f', 'raw', '-c', '-O', 'qcow2', disk.path, image]);
    await writeFile(tmp.file('ours.raw'), Buffer.alloc(disk.sizeBytes + 3 * MiB, 0xff));
    await expectSameRaw(image, tmp.path);
    expect((await stat(tmp.file('ours.raw'))).size).toBe(disk.sizeBytes);
  });
});
