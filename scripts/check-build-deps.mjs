#!/usr/bin/env node
// check-build-deps.mjs — run by `npm install` (the package's install script) before node-gyp
// builds native/: says which Debian packages are missing, by name, instead of a compiler error
// three screens into node-gyp's output. Checks a C compiler and make (build-essential), python3
// (node-gyp), pkg-config, and the libraries native/ links: libfuse3 (libfuse3-dev), libzstd
// (libzstd-dev), zlib (zlib1g-dev), libdeflate (libdeflate-dev). libfuse2, which the fuse-native transport loads at run time,
// is only warned about.
//
// Exit status 0 when everything is there, 1 (with one message listing every missing package and
// the apt-get line that installs them) otherwise.
import { spawnSync } from 'node:child_process';

/** True when `command args…` runs and exits 0. */
function succeeds(command, args) {
  const result = spawnSync(command, args, { stdio: 'ignore' });
  return result.error === undefined && result.status === 0;
}

const compiler = process.env.CC ?? 'cc';
const hasPkgConfig = succeeds('pkg-config', ['--version']);

/** [what is needed, Debian package, present?] */
const checks = [
  [`a C compiler (${compiler})`, 'build-essential', succeeds(compiler, ['--version'])],
  ['make', 'build-essential', succeeds('make', ['--version'])],
  ['python3 (for node-gyp)', 'python3', succeeds('python3', ['--version'])],
  ['pkg-config', 'pkg-config', hasPkgConfig],
  ['libfuse3 headers (pkg-config fuse3)', 'libfuse3-dev', hasPkgConfig && succeeds('pkg-config', ['--exists', 'fuse3'])],
  ['libzstd headers and static library (pkg-config libzstd)', 'libzstd-dev', hasPkgConfig && succeeds('pkg-config', ['--exists', 'libzstd'])],
  ['zlib headers and static library (pkg-config zlib)', 'zlib1g-dev', hasPkgConfig && succeeds('pkg-config', ['--exists', 'zlib'])],
  ['libdeflate headers and static library (pkg-config libdeflate)', 'libdeflate-dev', hasPkgConfig && succeeds('pkg-config', ['--exists', 'libdeflate'])],
];

const missing = checks.filter(([, , present]) => !present);
if (!/\blibfuse\.so\.2\b/.test(spawnSync('/sbin/ldconfig', ['-p'], { encoding: 'utf8' }).stdout ?? '')) {
  process.stderr.write('qcow2fuse: warning: libfuse2 is not installed; the fuse-native mount transport needs it (apt-get install libfuse2)\n');
}
if (missing.length > 0) {
  const packages = [...new Set(missing.map(([, pkg]) => pkg))];
  process.stderr.write([
    'qcow2fuse: cannot build the native addon (native/, built with node-gyp at install): missing',
    ...missing.map(([what, pkg]) => `  - ${what}: Debian package ${pkg}`),
    `Install them (as root) and install qcow2fuse again:  apt-get install ${packages.join(' ')}`,
    '',
  ].join('\n'));
  process.exit(1);
}
