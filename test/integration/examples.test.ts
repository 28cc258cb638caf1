import { describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { qemuImgCheck } from '../helpers/qemu.js';
import { useTempDir } from '../helpers/tmp.js';
import { requireTool } from '../helpers/tools.js';
import { patternBuffer } from '../helpers/patterns.js';

const run = promisify(execFile);
const examples = resolve(import.meta.dirname, '../../dist/examples');
const hasQemu = requireTool('qemu-img');

describe.skipIf(!hasQemu)('examples (dist build)', () => {
  const tmp = useTempDir('examples');
  it('compressed-backup stores a file, inspect-image describes it, read-image gives it back', async () => {
    const source = join(tmp.path, 'source.raw');
    const image = join(tmp.path, 'backup.qcow2');
    const back = join(tmp.path, 'back.raw');
    const data = Buffer.concat([patternBuffer(3 * 1024 * 1024, 3, 0, 'compressible'), Buffer.alloc(1024 * 1024), patternBuffer(1024, 4, 0)]);
    await writeFile(source, data);
    await run(process.execPath, [join(examples, 'compressed-backup.js'), source, image, 'zstd']);
    const { stdout } = await run(process.execPath, [join(examples, 'inspect-image.js'), image]);
    expect(stdout).toContain(`${data.length} bytes virtual`);
    expect(stdout).toContain('"check-errors":0');
    await run(process.execPath, [join(examples, 'read-image.js'), image, back]);
    expect((await readFile(back)).equals(data)).toBe(true);
    const check = await qemuImgCheck(image);
    expect(check.code).toBe(0);
    expect(check.report?.['compressed-clusters'] ?? 0).toBeGreaterThan(0);
  });
});
