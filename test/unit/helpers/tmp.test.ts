import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { sweepStaleRuns } from '../../helpers/global-setup.js';
import { makeTempDir, removeTempDir, supportsDirectIo, tempBase, tempDir, TEMP_PREFIX, useTempDir, withTempDir } from '../../helpers/tmp.js';

describe('temp dirs', () => {
  let fileLevel: string;
  let fromFirstTest: string;

  beforeAll(async () => {
    fileLevel = await tempDir('filelevel');
  });

  it('live under the per-run directory on an O_DIRECT-capable, non-tmpfs filesystem', async () => {
    const runDir = process.env.QCOW2FUSE_TEST_RUN_DIR;
    expect(runDir).toMatch(new RegExp(`/${TEMP_PREFIX}run\\d+-`));
    expect(tempBase()).toBe(runDir);
    expect(supportsDirectIo(tempBase())).toBe(true);
    fromFirstTest = await tempDir('first');
    expect(fromFirstTest.startsWith(`${runDir}/${TEMP_PREFIX}first-`)).toBe(true);
    await writeFile(join(fromFirstTest, 'f'), 'x');
  });

  it('a dir made in a test is gone after it; a dir made in beforeAll lives for the file', () => {
    expect(existsSync(fromFirstTest)).toBe(false);
    expect(existsSync(fileLevel)).toBe(true);
  });

  it('tmpfs is not O_DIRECT-worthy', () => {
    expect(supportsDirectIo('/dev/shm')).toBe(false);
  });

  it('withTempDir removes the dir when the callback throws', async () => {
    let seen = '';
    await expect(withTempDir(async (dir) => {
      seen = dir;
      await mkdir(join(dir, 'a/b'), { recursive: true });
      await writeFile(join(dir, 'a/b/c'), 'data');
      throw new Error('boom');
    })).rejects.toThrow('boom');
    expect(seen).not.toBe('');
    expect(existsSync(seen)).toBe(false);
  });

  it('removeTempDir deletes nested content and tolerates a missing dir', async () => {
    const dir = await makeTempDir('manual');
    await mkdir(join(dir, 'x/y'), { recursive: true });
    await writeFile(join(dir, 'x/y/z'), 'data');
    expect(await removeTempDir(dir)).toEqual([]);
    expect(existsSync(dir)).toBe(false);
    await expect(removeTempDir(dir)).resolves.toEqual([]);
  });

  describe('useTempDir', () => {
    const tmp = useTempDir('each');
    let previous = '';

    it('gives each test a fresh directory', async () => {
      previous = tmp.path;
      expect(existsSync(tmp.path)).toBe(true);
      await writeFile(tmp.file('a'), 'x');
    });

    it('and removes the previous one', () => {
      expect(tmp.path).not.toBe(previous);
      expect(existsSync(previous)).toBe(false);
      expect(tmp.file('b')).toBe(join(tmp.path, 'b'));
    });
  });
});

describe('sweepStaleRuns (global setup)', () => {
  it('removes run dirs of dead vitest processes and keeps live ones', async () => {
    const base = await tempDir('sweep');
    const exited = spawnSync('true');
    const dead = join(base, `${TEMP_PREFIX}run${exited.pid}-dead`);
    const live = join(base, `${TEMP_PREFIX}run${process.pid}-live`);
    const other = join(base, `${TEMP_PREFIX}tmp-unrelated`);
    for (const dir of [dead, live, other]) {
      await mkdir(join(dir, 'sub'), { recursive: true });
      await writeFile(join(dir, 'sub/f'), 'x');
    }
    expect(await sweepStaleRuns(base)).toEqual([dead]);
    expect(existsSync(dead)).toBe(false);
    expect(existsSync(live)).toBe(true);
    expect(existsSync(other)).toBe(true);
  });
});
