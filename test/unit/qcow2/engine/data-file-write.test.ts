import { describe, expect, it } from 'vitest';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuImgCheck, qemuImgCompare, qemuIoOk } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTool } from '../../../helpers/tools.js';
import { patternBuffer, Prng } from '../../../helpers/patterns.js';
import { createImage, openImage } from '../../../../src/node.js';

const hasQemu = requireTool('qemu-img');

describe.skipIf(!hasQemu)('external data file writes', () => {
  const tmp = useTempDir('datafile');
  for (const raw of [false, true]) {
    it(`writes, zeroes and discards land in the data file (data_file_raw=${raw})`, async () => {
      const img = join(tmp.path, 'meta.qcow2');
      const data = join(tmp.path, 'data.raw');
      const size = 8 * 1024 * 1024;
      await createImage(img, { virtualSize: size, dataFile: data, dataFileRaw: raw });
      const model = Buffer.alloc(size);
      const image = await openImage(img, { readOnly: false });
      const rng = new Prng(raw ? 5 : 6);
      for (let i = 0; i < 60; i++) {
        const off = rng.int(size - 100_000);
        const len = 1 + rng.int(100_000);
        if (i % 7 === 3) {
          await image.writeZeroes(off, len);
          model.fill(0, off, off + len);
        } else if (i % 7 === 5) {
          // Discard unmaps whole clusters (reading zeros on v3); with a raw data file it is a no-op,
          // because the data file must stay a consistent raw image.
          await image.discard(off, len);
          const cs = 65536;
          const first = Math.ceil(off / cs) * cs;
          const last = Math.floor((off + len) / cs) * cs;
          if (!raw && last > first) model.fill(0, first, last);
        } else {
          const buf = patternBuffer(len, i, off);
          buf.copy(model, off);
          await image.write(off, buf);
        }
      }
      expect((await image.read(0, size)).equals(model)).toBe(true);
      await image.close();
      const check = await qemuImgCheck(img);
      expect(check.code).toBe(0);
      const expected = join(tmp.path, 'model.raw');
      await writeFile(expected, model);
      expect(await qemuImgCompare(img, expected)).toBe(true);
      if (raw) expect((await readFile(data)).equals(model)).toBe(true);
      await qemuIoOk(img, [`read -P 0 ${size - 4096} 4096`]);
    });
  }
});
