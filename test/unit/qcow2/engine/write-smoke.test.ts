import { describe, expect, it } from 'vitest';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuImg, qemuImgCheck, qemuImgCompare, qemuIoOk } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTool } from '../../../helpers/tools.js';
import { patternBuffer, Prng } from '../../../helpers/patterns.js';
import { openImage } from '../../../../src/node.js';

const hasQemu = requireTool('qemu-img');

describe.skipIf(!hasQemu)('write path smoke', () => {
  const tmp = useTempDir('write-smoke');
  for (const opts of ['compat=1.1', 'compat=0.10', 'cluster_size=512,refcount_bits=1', 'extended_l2=on,cluster_size=64k', 'cluster_size=4k,refcount_bits=64', 'lazy_refcounts=on']) {
    it(`writes images qemu accepts (${opts})`, async () => {
      const img = join(tmp.path, 'a.qcow2');
      const size = 32 * 1024 * 1024;
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, img, String(size)]);
      await qemuIoOk(img, ['write -c -P 0x33 4M 64k', 'write -P 0x44 6M 100k']);
      const model = Buffer.alloc(size);
      model.fill(0x33, 4 << 20, (4 << 20) + 65536);
      model.fill(0x44, 6 << 20, (6 << 20) + 102400);
      const image = await openImage(img, { readOnly: false });
      const rng = new Prng(1234);
      for (let i = 0; i < 200; i++) {
        const off = rng.int(size - 300000);
        const len = 1 + rng.int(300000);
        const data = patternBuffer(len, i, off);
        data.copy(model, off);
        await image.write(off, data);
      }
      await image.writeZeroes(100_000, 200_000);
      model.fill(0, 100_000, 300_000);
      const got = await image.read(0, size);
      let diff = -1;
      for (let i = 0; i < size; i++) if (got[i] !== model[i]) { diff = i; break; }
      expect(diff).toBe(-1);
      await image.close();
      const raw = join(tmp.path, 'model.raw');
      await writeFile(raw, model);
      const check = await qemuImgCheck(img);
      expect(check.report).toMatchObject({ 'check-errors': 0 });
      expect(check.report?.corruptions ?? 0).toBe(0);
      expect(check.report?.leaks ?? 0).toBe(0);
      expect(await qemuImgCompare(img, raw)).toBe(true);
      const again = await openImage(img, { readOnly: true });
      expect((await again.read(0, size)).equals(await readFile(raw))).toBe(true);
      await again.close();
    });
  }
});
