// The per-file setup must unmount what a test leaves mounted and fail that file: run a child vitest
// on a fixture that leaks a tmpfs mount and check both.
import { mkdir, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { run } from '../../helpers/exec.js';
import { isMounted } from '../../helpers/mount.js';
import { tempDir } from '../../helpers/tmp.js';
import { requireRoot } from '../../helpers/tools.js';

const helpers = resolve(import.meta.dirname, '../../helpers');
const vitestBin = resolve(import.meta.dirname, '../../../node_modules/vitest/vitest.mjs');

describe.skipIf(!requireRoot())('leak guard (setup.ts)', () => {
  it('unmounts a mount a test forgot and fails the file', async () => {
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
    const child = await run(process.execPath, [vitestBin, 'run', '--root', dir, '--config', join(dir, 'vitest.config.mjs')],
      { cwd: dir, env: { ...process.env, CI: 'true', QCOW2FUSE_TEST_RUN_DIR: dir } });
    const output = child.stdout + child.stderr;
    expect(child.code, output).not.toBe(0);
    expect(output).toMatch(new RegExp(`mounts left behind \\(now unmounted\\): ${mnt}`));
    expect(await isMounted(mnt)).toBe(false);
  });
});
