/**
 * The installable package: `npm pack` (its prepack builds the CLI) ships the built CLI, the native
 * sources and the README — no tests, no benchmarks, no native/build — and `npm install -g` of the
 * tarball into a temporary prefix gives a working `qcow2fuse` whose native addon was built at
 * install. The install runs with npm 11's --strict-allow-scripts and exactly the --allow-scripts
 * list the README gives, so the documented command is the one proven here. A machine without a
 * build dependency gets one message naming the Debian package.
 *
 * The project is packed from a copy of its sources (node_modules linked), so the prepack's build
 * never rewrites the dist/ the other test files are running from. Dependencies come from the npm
 * registry through npm's cache (--prefer-offline).
 */
import { chmod, cp, mkdir, readFile, stat, symlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { run, type ExecResult } from '../helpers/exec.js';
import { qemuImgCheckClean } from '../helpers/qemu.js';
import { tempDir } from '../helpers/tmp.js';
import { requireFuse, requireTools } from '../helpers/tools.js';

const root = fileURLToPath(new URL('../../', import.meta.url));
const ready = requireFuse() && requireTools('npm', 'tar', 'qemu-img', 'dd', 'cc', 'pkg-config');
const manifest = JSON.parse(await readFile(join(root, 'package.json'), 'utf8')) as { version: string };
const INSTALL_TIMEOUT_MS = 600_000;

/** npm with node-gyp pointed at this Node's headers (never a download from nodejs.org). */
function npmEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  return { ...process.env, npm_config_nodedir: dirname(dirname(process.execPath)), npm_config_update_notifier: 'false', ...extra };
}

/** The npm command line the README gives for a global install of the tarball under strict script approval. */
function installArgs(prefix: string, tarball: string): string[] {
  return ['install', '-g', '--prefix', prefix, '--prefer-offline', '--no-audit', '--no-fund',
    '--strict-allow-scripts', `--allow-scripts=fs-ext,fuse-native,${tarball}`, tarball];
}

let tarball: string;
let listing: string[];

/** Copy what the package is built from, link node_modules, and `npm pack` there. */
async function pack(): Promise<void> {
  const dir = await tempDir('package');
  const src = join(dir, 'src-copy');
  for (const name of ['package.json', 'package-lock.json', 'tsconfig.json', 'README.md', 'src', 'scripts']) {
    await cp(join(root, name), join(src, name), { recursive: true });
  }
  const nativeBuild = join(root, 'native', 'build');
  await cp(join(root, 'native'), join(src, 'native'), { recursive: true, filter: (from) => !from.startsWith(nativeBuild) });
  await symlink(join(root, 'node_modules'), join(src, 'node_modules'));
  const packed = await run('npm', ['pack', '--pack-destination', dir], { cwd: src, env: npmEnv(), timeoutMs: INSTALL_TIMEOUT_MS });
  expect(packed.code, packed.stderr).toBe(0);
  tarball = join(dir, `qcow2fuse-${manifest.version}.tgz`);
  listing = (await run('tar', ['tzf', tarball])).stdout.trim().split('\n');
}

async function install(prefix: string, env: NodeJS.ProcessEnv = npmEnv()): Promise<ExecResult> {
  // npm 11 with --strict-allow-scripts wants the prefix's lib/ to exist.
  await mkdir(join(prefix, 'lib'), { recursive: true });
  return run('npm', installArgs(prefix, tarball), { env, timeoutMs: INSTALL_TIMEOUT_MS });
}

describe.skipIf(!ready)('npm pack and npm install -g of the tarball', () => {
  beforeAll(pack, INSTALL_TIMEOUT_MS);

  it('packs the built CLI, the native sources and the README; no tests, benchmarks or build output', () => {
    for (const file of ['package/package.json', 'package/README.md', 'package/dist/src/cli/main.js', 'package/dist/src/index.js',
      'package/dist/src/index.d.ts', 'package/native/addon.c', 'package/native/binding.gyp', 'package/scripts/check-build-deps.mjs']) {
      expect(listing).toContain(file);
    }
    expect(listing.filter((f) => /^package\/(test|dist\/test|bench|native\/build|examples)\//.test(f) || f.endsWith('.map'))).toEqual([]);
    expect(listing.filter((f) => f.endsWith('.ts') && !f.endsWith('.d.ts'))).toEqual([]);
  });

  it('installs globally into a prefix, builds the addon at install, and the CLI works from there', async () => {
    const dir = await tempDir('package-install');
    const prefix = join(dir, 'prefix');
    const installed = await install(prefix);
    expect(installed.code, `${installed.stdout}\n${installed.stderr}`).toBe(0);
    expect(installed.stderr).not.toContain('install-scripts');
    const packageDir = join(prefix, 'lib', 'node_modules', 'qcow2fuse');
    expect((await stat(join(packageDir, 'native', 'build', 'Release', 'qcow2fuse_native.node'))).isFile()).toBe(true);

    const bin = join(prefix, 'bin', 'qcow2fuse');
    const env = { ...process.env, QCOW2FUSE_RUNTIME_DIR: join(dir, 'run') };
    const q = (args: string[]) => run(bin, args, { env, cwd: dir });
    for (const flag of ['--version', '-V']) expect(await q([flag])).toEqual({ code: 0, stdout: `qcow2fuse ${manifest.version}\n`, stderr: '' });
    for (const command of ['create', 'info', 'map', 'check', 'convert', 'resize', 'snapshot', 'bench', 'mount', 'unmount', 'demo']) {
      const help = await q(['help', command]);
      expect([help.code, help.stderr]).toEqual([0, '']);
      expect(help.stdout).toMatch(new RegExp(`^usage: qcow2fuse ${command} `));
      expect(await q([command, '--help'])).toEqual(help);
    }
    expect((await q(['help', 'info'])).stdout).toContain('--force-share');

    const image = join(dir, 'vm.qcow2');
    expect((await q(['create', '-q', '-f', 'qcow2', image, '32M'])).code).toBe(0);
    const info = await q(['info', '--output=json', image]);
    expect(info.code).toBe(0);
    expect(JSON.parse(info.stdout)).toMatchObject({ format: 'qcow2', 'virtual-size': 32 * 1024 * 1024 });
    const mnt = join(dir, 'mnt');
    await mkdir(mnt);
    const mounted = await q(['mount', image, mnt]);
    expect(mounted).toMatchObject({ code: 0, stderr: '' });
    try {
      const dd = await run('dd', ['if=/dev/urandom', `of=${join(mnt, 'disk.raw')}`, 'bs=64k', 'count=16', 'conv=notrunc,fsync', 'status=none']);
      expect(dd.stderr).toBe('');
    } finally {
      expect(await q(['unmount', mnt])).toMatchObject({ code: 0, stderr: '' });
    }
    await qemuImgCheckClean(image);
    // The mount helper's form (mount.fuse3 runs `qcow2fuse IMAGE MOUNTPOINT -o OPTIONS`).
    expect(await q([image, mnt, '-o', 'ro,dev,suid'])).toMatchObject({ code: 0, stderr: '' });
    expect(await q(['unmount', mnt])).toMatchObject({ code: 0, stderr: '' });
    const missing = await q([join(dir, 'missing.qcow2'), mnt, '-o', 'ro']);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain(`cannot mount ${join(dir, 'missing.qcow2')}`);
    const typo = await q(['inf0', image]);
    expect(typo.code).toBe(1);
    expect(typo.stderr).toContain("unknown command 'inf0'");
  }, INSTALL_TIMEOUT_MS);

  it('without a build dependency the install fails naming the Debian package', async () => {
    const dir = await tempDir('package-missing');
    const fakeBin = join(dir, 'bin');
    await mkdir(fakeBin);
    // pkg-config that knows every library but libzstd, as on a machine without libzstd-dev.
    const pkgConfig = (await run('sh', ['-c', 'command -v pkg-config'])).stdout.trim();
    await writeFile(join(fakeBin, 'pkg-config'), `#!/bin/sh\ncase "$*" in *libzstd*) exit 1;; esac\nexec '${pkgConfig}' "$@"\n`);
    await chmod(join(fakeBin, 'pkg-config'), 0o755);
    const result = await install(join(dir, 'prefix'), npmEnv({ PATH: `${fakeBin}:${process.env.PATH ?? ''}` }));
    expect(result.code).not.toBe(0);
    expect(`${result.stdout}${result.stderr}`).toContain('libzstd headers and static library (pkg-config libzstd): Debian package libzstd-dev');
    expect(`${result.stdout}${result.stderr}`).toContain('apt-get install libzstd-dev');
  }, INSTALL_TIMEOUT_MS);

  it('the dependency check names every missing package at once (compiler, libfuse3-dev)', async () => {
    const dir = await tempDir('package-check');
    const fakeBin = join(dir, 'bin');
    await mkdir(fakeBin);
    const pkgConfig = (await run('sh', ['-c', 'command -v pkg-config'])).stdout.trim();
    await writeFile(join(fakeBin, 'pkg-config'), `#!/bin/sh\ncase "$*" in *fuse3*) exit 1;; esac\nexec '${pkgConfig}' "$@"\n`);
    await chmod(join(fakeBin, 'pkg-config'), 0o755);
    const env = { ...process.env, PATH: `${fakeBin}:${process.env.PATH ?? ''}`, CC: join(dir, 'no-such-cc') };
    const result = await run(process.execPath, [join(root, 'scripts', 'check-build-deps.mjs')], { env });
    expect(result.code).toBe(1);
    expect(result.stderr).toContain(`a C compiler (${join(dir, 'no-such-cc')}): Debian package build-essential`);
    expect(result.stderr).toContain('libfuse3 headers (pkg-config fuse3): Debian package libfuse3-dev');
    expect(result.stderr).toContain('apt-get install build-essential libfuse3-dev');
    const clean = await run(process.execPath, [join(root, 'scripts', 'check-build-deps.mjs')]);
    expect(clean).toMatchObject({ code: 0 });
  });
});
