import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { formattingLine, parseCreateArgs } from '../../../../src/cli/commands/create.js';
import { qemuImg, qemuImgCheck, qemuImgInfo, qemuIoOk } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTool } from '../../../helpers/tools.js';
import { createImage, type CreateOptions, openImage } from '../../../../src/node.js';

const hasQemu = requireTool('qemu-img');

/** qemu-img create option strings and the same request as our CLI arguments. */
const CASES: { name: string; size: string; opts: string }[] = [
  { name: 'defaults', size: '64M', opts: '' },
  { name: 'v2', size: '1G', opts: 'compat=0.10' },
  { name: '512-byte clusters, 1-bit refcounts', size: '8M', opts: 'cluster_size=512,refcount_bits=1' },
  { name: '2M clusters, 64-bit refcounts', size: '10G', opts: 'cluster_size=2M,refcount_bits=64' },
  { name: 'lazy refcounts, zstd', size: '100M', opts: 'lazy_refcounts=on,compression_type=zstd' },
  { name: 'extended L2', size: '1G', opts: 'extended_l2=on,cluster_size=128k' },
  { name: 'preallocation=metadata', size: '64M', opts: 'preallocation=metadata' },
  { name: 'preallocation=falloc', size: '16M', opts: 'preallocation=falloc,cluster_size=4k' },
  { name: 'preallocation=full', size: '16M', opts: 'preallocation=full' },
  { name: '4k clusters, big disk', size: '20G', opts: 'cluster_size=4k' },
];

function comparable(info: Record<string, unknown>): Record<string, unknown> {
  const { filename: _f, 'actual-size': _a, ...rest } = info;
  return rest;
}

describe.skipIf(!hasQemu)('create', () => {
  const tmp = useTempDir('create');
  for (const c of CASES) {
    it(`matches qemu-img create (${c.name})`, async () => {
      const theirs = join(tmp.path, 'theirs.qcow2');
      const ours = join(tmp.path, 'ours.qcow2');
      await qemuImg(['create', '-q', '-f', 'qcow2', ...(c.opts ? ['-o', c.opts] : []), theirs, c.size]);
      const { path, options } = parseCreateArgs([...(c.opts ? ['-o', c.opts] : []), ours, c.size]);
      await createImage(path, options);
      const [a, b] = [await qemuImgInfo(theirs), await qemuImgInfo(ours)];
      expect(comparable(b as unknown as Record<string, unknown>)).toEqual(comparable(a as unknown as Record<string, unknown>));
      const check = await qemuImgCheck(ours);
      expect(check.code).toBe(0);
      await qemuIoOk(ours, ['write -P 0x5a 0 1M', 'read -P 0x5a 0 1M']);
      expect((await qemuImgCheck(ours)).code).toBe(0);
    });
  }

  it('prints qemu-img create\'s "Formatting" line, option for option', async () => {
    await qemuImg(['create', '-q', '-f', 'qcow2', tmp.file('base.qcow2'), '3M']);
    const cases: { flags: string[]; size?: string }[] = [
      { flags: [], size: '1000' }, { flags: ['-o', 'compat=0.10'], size: '1M' },
      { flags: ['-o', 'compat=1.1,cluster_size=16k,refcount_bits=64,lazy_refcounts=on,extended_l2=on,compression_type=zstd'], size: '1G' },
      { flags: ['-b', 'base.qcow2', '-F', 'qcow2'] }, { flags: ['-o', 'preallocation=metadata,data_file=x.data'], size: '1M' },
      { flags: ['-o', 'data_file=y.data,data_file_raw=on'], size: '2M' },
    ];
    for (const { flags, size } of cases) {
      const args = [...flags, 'img.qcow2', ...(size === undefined ? [] : [size])];
      const theirs = await qemuImg(['create', '-f', 'qcow2', ...args], { cwd: tmp.path });
      expect([args, theirs.code]).toEqual([args, 0]);
      const { path, options } = parseCreateArgs(args);
      expect(formattingLine(path, options, options.virtualSize ?? 3 * 1024 * 1024)).toBe(theirs.stdout.trim());
    }
  });

  it('creates an overlay on a backing file, sized like it', async () => {
    const base = join(tmp.path, 'base.qcow2');
    const top = join(tmp.path, 'top.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', base, '48M']);
    await qemuIoOk(base, ['write -P 0x11 0 2M']);
    const opts: CreateOptions = { backingFile: 'base.qcow2', backingFormat: 'qcow2' };
    await createImage(top, opts);
    const info = await qemuImgInfo(top);
    expect(info['virtual-size']).toBe(48 * 1024 * 1024);
    expect(info['backing-filename']).toBe('base.qcow2');
    const image = await openImage(top, { readOnly: true });
    expect((await image.read(0, 4096)).every((b) => b === 0x11)).toBe(true);
    await image.close();
    expect((await qemuImgCheck(top)).code).toBe(0);
  });

  it('refuses invalid combinations like qemu-img', async () => {
    await expect(createImage(join(tmp.path, 'x.qcow2'), { virtualSize: 1 << 20, compat: '0.10', refcountBits: 1 })).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(createImage(join(tmp.path, 'x.qcow2'), { virtualSize: 1 << 20, extendedL2: true, clusterSize: 4096 })).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(createImage(join(tmp.path, 'x.qcow2'), { virtualSize: 1 << 20, clusterSize: 3000 })).rejects.toMatchObject({ code: 'EINVAL' });
  });
});
