// The per-file setup (registered mounts) and useTempDir (mounts below a per-test dir) must unmount
// what a test leaves mounted and fail it: run a child vitest on fixtures that leak tmpfs mounts.
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { run } from '../../helpers/exec.js';
import { isMounted } from '../../helpers/mount.js';
import { tempDir } from '../../helpers/tmp.js';
import { requireRoot } from '../../helpers/tools.js';

const helpers = resolve(import.meta.dirname, '../../helpers');
const vitestBin = resolve(import.meta.dirname, '../../../node_modules/vitest/vitest.mjs');

describe.skipIf(!requireRoot())('leak guard (setup.ts)', () => {
  it('unmounts mounts a test forgot and fails it', async () => {
    const dir = await tempDir('leakguard');
    const mnt = join(dir, 'leaked');
    await mkdir(mnt);
    await writeFile(join(dir, 'vitest.config.mjs'),
      `export default { test: { include: ['*.test.ts'], globals: true, setupFiles: [${JSON.stringify(join(helpers, 'setup.ts'))}] } };\n`);
    await writeFile(join(dir, 'leak.test.ts'), [
      `import { execFileSync } from 'node:child_process';`,
      `import { registerMount } from ${JSON.stringify(join(helpers, 'mount.ts'))};`,
      `it('mounts and forgets', () => {`,
      `  execFileSync('mount', ['-t', 'tmpfs', 'qcow2fuse-leak', ${JSON.stringify(mnt)}]);`,
      `  registerMount(${JSON.stringify(mnt)});`,
      `});`,
    ].join('\n'));
    const perTest = join(dir, 'per-test-dir');
    await writeFile(join(dir, 'leak-each.test.ts'), [
      `import { execFileSync } from 'node:child_process';`,
      `import { mkdirSync, writeFileSync } from 'node:fs';`,
      `import { useTempDir } from ${JSON.stringify(join(helpers, 'tmp.ts'))};`,
      `const tmp = useTempDir('each');`,
      `it('mounts below its per-test dir and forgets', () => {`,
      `  mkdirSync(tmp.file('m'));`,
      `  writeFileSync(${JSON.stringify(perTest)}, tmp.path);`,
      `  execFileSync('mount', ['-t', 'tmpfs', 'qcow2fuse-leak', tmp.file('m')]);`,
      `});`,
    ].join('\n'));
    const child = await run(process.execPath, [vitestBin, 'run', '--root', dir, '--config', join(dir, 'vitest.config.mjs')],
      { cwd: dir, env: { ...process.env, CI: 'true', QCOW2FUSE_TEST_RUN_DIR: dir } });
    const output = (child.stdout + child.stderr).replace(/\x1b\[[0-9;]*m/g, '');
    expect(child.code, output).not.toBe(0);
    expect(output).toMatch(new RegExp(`mounts left behind \\(now unmounted\\): ${mnt}`));
    expect(await isMounted(mnt)).toBe(false);
    const leakedEach = join(await readFile(perTest, 'utf8'), 'm');
    expect(output).toMatch(new RegExp(`after test: mounts left behind \\(now unmounted\\): ${leakedEach}`));
    expect(await isMounted(leakedEach)).toBe(false);
    expect(output).toMatch(/Test Files\s+2 failed/);
  });
});
