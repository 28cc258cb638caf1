import { describe, expect, it } from 'vitest';
import { open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuImg, qemuImgConvertToRaw, qemuImgInfo, qemuIo, qemuIoOk } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTool } from '../../../helpers/tools.js';
import { openImage } from '../../../../src/node.js';

const hasQemu = requireTool('qemu-img');

describe.skipIf(!hasQemu)('read path smoke', () => {
  const tmp = useTempDir('read-smoke');
  for (const opts of ['compat=1.1', 'compat=0.10', 'cluster_size=512', 'extended_l2=on,cluster_size=64k', 'compression_type=zstd']) {
    it(`reads what qemu wrote (${opts})`, async () => {
      const img = join(tmp.path, 'a.qcow2');
      await qemuImg(['create', '-f', 'qcow2', '-o', opts, img, '64M']);
      const cmds = ['write -P 0xab 1000 70000', 'write -P 0x11 5M 1M', 'write -c -P 0x33 10M 64k', 'write -P 0x44 20M 3k'];
      if (!opts.includes('0.10')) cmds.push('write -z 5M 64k');
      await qemuIoOk(img, cmds);
      const raw = join(tmp.path, 'a.raw');
      await qemuImgConvertToRaw(img, raw);
      const image = await openImage(img, { readOnly: true });
      const ours = await image.read(0, image.virtualSize);
      await image.close();
      expect(ours.equals(await readFile(raw))).toBe(true);
    });
  }

  it('a header size that is not whole sectors is rounded down, as QEMU sees it', async () => {
    const img = join(tmp.path, 'odd.qcow2');
    await qemuImg(['create', '-f', 'qcow2', img, '1M']);
    await qemuIoOk(img, ['write -P 0x5c 0 4k']);
    const size = Buffer.alloc(8);
    size.writeBigUInt64BE(1000n);
    const fh = await open(img, 'r+');
    await fh.write(size, 0, 8, 24);
    await fh.close();
    const theirs = await qemuImgInfo(img);
    const image = await openImage(img, { readOnly: true });
    try {
      expect(theirs['virtual-size']).toBe(512);
      expect(image.virtualSize).toBe(512);
      expect((await image.read(0, 512)).every((b) => b === 0x5c)).toBe(true);
      await expect(image.read(512, 488)).rejects.toMatchObject({ code: 'ERANGE' });
    } finally {
      await image.close();
    }
    expect((await qemuIo(img, ['read 512 488'])).stdout).toContain('read failed');
  });
});
