import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { run } from '../../helpers/exec.js';
import { allocatedBytes, createSparseFile, e2fsckReadOnly, makeExt4Image, sha256, sha256File, writePatternFile } from '../../helpers/files.js';
import { checkPattern } from '../../helpers/patterns.js';
import { tempDir } from '../../helpers/tmp.js';
import { requireTools } from '../../helpers/tools.js';

describe('file helpers', () => {
  it('sha256 of a buffer and of a file agree with sha256sum', async () => {
    const path = join(await tempDir(), 'f');
    await writeFile(path, 'hello\n');
    const expected = '5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03';
    expect(sha256(Buffer.from('hello\n'))).toBe(expected);
    expect(await sha256File(path)).toBe(expected);
    expect((await run('sha256sum', [path])).stdout.split(' ')[0]).toBe(expected);
  });

  it('createSparseFile makes a file of the size with nothing allocated', async () => {
    const path = join(await tempDir(), 'sparse');
    await createSparseFile(path, 1 << 30);
    expect((await stat(path)).size).toBe(1 << 30);
    expect(await allocatedBytes(path)).toBe(0);
  });

  it('writePatternFile writes the pattern for absolute file offsets', async () => {
    const path = join(await tempDir(), 'pattern');
    const bytes = (5 << 20) + 123;
    await writePatternFile(path, bytes, 77, 'compressible');
    const data = await readFile(path);
    expect(data.length).toBe(bytes);
    expect(checkPattern(data, 77, 0, 'compressible')).toBe(-1);
    expect(checkPattern(data.subarray(4 << 20), 77, 4 << 20, 'compressible')).toBe(-1);
    expect(checkPattern(data, 78, 0, 'compressible')).toBe(0);
  });
});

const hasE2fs = requireTools('mke2fs', 'e2fsck', 'debugfs');

describe.skipIf(!hasE2fs)('makeExt4Image', () => {
  it('builds a clean, sparse ext4 image holding real files, the same twice', async () => {
    const dir = await tempDir();
    const a = await makeExt4Image(join(dir, 'a.raw'), { sizeBytes: 32 << 20, dataBytes: 8 << 20 });
    expect(a.sizeBytes).toBe(32 << 20);
    expect((await stat(a.path)).size).toBe(32 << 20);
    expect(a.dataBytes).toBeGreaterThan(4 << 20);
    expect(a.dataBytes).toBeLessThanOrEqual(8 << 20);
    expect(a.files).toBeGreaterThan(10);
    expect(await allocatedBytes(a.path)).toBeLessThan(a.sizeBytes);
    const fsck = await e2fsckReadOnly(a.path);
    expect(fsck.code, fsck.output).toBe(0);
    const listing = await run('debugfs', ['-R', 'ls -p /src0', a.path]);
    expect(listing.code).toBe(0);
    expect(listing.stdout.split('\n').length).toBeGreaterThan(3);
    expect(await e2fsckReadOnly(join(dir, 'missing.raw'))).toMatchObject({ code: 8 });

    const b = await makeExt4Image(join(dir, 'b.raw'), { sizeBytes: 32 << 20, dataBytes: 8 << 20 });
    expect(b).toMatchObject({ dataBytes: a.dataBytes, files: a.files });
  });
});
