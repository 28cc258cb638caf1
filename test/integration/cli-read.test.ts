/**
 * The read-side commands as a user runs them (`node dist/src/cli/main.js …`, built by `npm run build`;
 * npm test builds first): `info`, `map` and `convert` print and write what qemu-img does for the same
 * images — both run in the same directory with the same (relative) names — and fail with clear,
 * coded messages and exit code 1 on bad input.
 */
import { describe, expect, it } from 'vitest';
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { allocatedBytes, settleFiles, sha256File } from '../helpers/files.js';
import { qemuImgCheck, qemuImgCompare, qemuIoOk, run, type ExecResult } from '../helpers/qemu.js';
import { useTempDir } from '../helpers/tmp.js';
import { requireTools } from '../helpers/tools.js';

const root = fileURLToPath(new URL('../../', import.meta.url));
const CLI = join(root, 'dist/src/cli/main.js');
const ready = requireTools('qemu-img', 'qemu-io', 'sh', 'bash', 'sha256sum', CLI);

/** Throws unless the build of every module the CLI runs is at least as new as its source. */
async function checkBuild(): Promise<void> {
  for (const dir of ['src/cli', 'src/cli/commands', 'src/qcow2', 'src/io']) {
    for (const name of await readdir(join(root, dir))) {
      if (!name.endsWith('.ts')) continue;
      const built = await stat(join(root, 'dist', dir, name.replace(/\.ts$/, '.js'))).catch(() => undefined);
      if (built === undefined || built.mtimeMs < (await stat(join(root, dir, name))).mtimeMs) {
        throw new Error(`dist/${dir}/${name} is missing or stale: run \`npm run build\` first (npm test does)`);
      }
    }
  }
}

function ours(args: string[], cwd: string): Promise<ExecResult> {
  return run(process.execPath, [CLI, ...args], { cwd });
}

function qemu(args: string[], cwd: string): Promise<ExecResult> {
  return run('qemu-img', args, { cwd });
}

async function qemuOk(args: string[], cwd: string): Promise<void> {
  const result = await qemu(args, cwd);
  if (result.code !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${result.stderr}`);
}

/**
 * In `dir`: raw base (shorter) ← mid.qcow2 ← top.qcow2 with compressed and zero clusters, two
 * snapshots and a persistent bitmap, all named relatively.
 */
async function chain(dir: string): Promise<void> {
  await qemuOk(['create', '-q', '-f', 'raw', 'base.raw', '2M'], dir);
  await qemuIoOk(join(dir, 'base.raw'), ['write -P 7 0 64k', 'write -P 8 1M 512k'], { format: 'raw' });
  await qemuOk(['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'mid.qcow2', '6M'], dir);
  await qemuIoOk(join(dir, 'mid.qcow2'), ['write -P 9 512k 64k', 'write -P 3 3M 64k']);
  await qemuOk(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', '-o', 'compression_type=zstd', 'top.qcow2', '8M'], dir);
  await qemuIoOk(join(dir, 'top.qcow2'), ['write -P 5 32k 4k', 'write -z 1M 64k']);
  await qemuOk(['snapshot', '-c', 'before', 'top.qcow2'], dir);
  await qemuIoOk(join(dir, 'top.qcow2'), ['write -c -P 4 4M 128k', 'write -P 6 7M 100000']);
  await qemuOk(['snapshot', '-c', 'after compress', 'top.qcow2'], dir);
  await qemuOk(['bitmap', '--add', 'top.qcow2', 'changes'], dir);
}

describe.skipIf(!ready)('CLI read commands (dist build)', () => {
  const tmp = useTempDir('cli-read');

  it('info (human and JSON) prints what qemu-img info prints', async () => {
    await checkBuild();
    await chain(tmp.path);
    await qemuOk(['create', '-q', '-f', 'qcow2', '-o', 'data_file=img.data,compat=1.1,lazy_refcounts=on', 'df.qcow2', '4M'], tmp.path);
    await settleFiles(tmp.path);
    for (const image of ['top.qcow2', 'mid.qcow2', join(tmp.path, 'top.qcow2'), 'df.qcow2']) {
      for (const output of [[], ['--output=json'], ['--output', 'human']]) {
        const args = ['info', ...output, image];
        const [theirs, mine] = [await qemu(args, tmp.path), await ours(args, tmp.path)];
        expect(mine.stderr).toBe('');
        expect(mine.code).toBe(0);
        expect(mine.stdout, args.join(' ')).toBe(theirs.stdout);
      }
    }
  });

  it('map (JSON and human) prints what qemu-img map prints, and fails like it on compressed data', async () => {
    await checkBuild();
    await chain(tmp.path);
    await qemuOk(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', 'pre.qcow2', '8M'], tmp.path);
    await qemuIoOk(join(tmp.path, 'pre.qcow2'), ['write -P 1 70000 3000']);
    await settleFiles(tmp.path);
    for (const [image, humanOk] of [['top.qcow2', false], ['mid.qcow2', true], ['pre.qcow2', true]] as const) {
      const json = ['map', '--output=json', image];
      const [theirs, mine] = [await qemu(json, tmp.path), await ours(json, tmp.path)];
      expect(mine.code).toBe(0);
      expect(mine.stdout, json.join(' ')).toBe(theirs.stdout);
      const human = ['map', image];
      const [theirsH, mineH] = [await qemu(human, tmp.path), await ours(human, tmp.path)];
      expect(mineH.code).toBe(humanOk ? 0 : 1);
      expect(theirsH.code).toBe(mineH.code);
      expect(mineH.stdout, human.join(' ')).toBe(theirsH.stdout);
      if (!humanOk) expect(mineH.stderr).toMatch(/compressed clusters/);
    }
  });

  it('convert -O raw writes the bytes qemu-img writes: file (sparse), stdout, progress, snapshots', async () => {
    await checkBuild();
    await chain(tmp.path);
    await qemuOk(['convert', '-O', 'raw', 'top.qcow2', 'theirs.raw'], tmp.path);
    const result = await ours(['convert', '-p', '-O', 'raw', 'top.qcow2', 'ours.raw'], tmp.path);
    expect(result.code).toBe(0);
    expect(result.stderr).toContain('(100.00/100%)');
    expect(await sha256File(join(tmp.path, 'ours.raw'))).toBe(await sha256File(join(tmp.path, 'theirs.raw')));
    expect(await allocatedBytes(join(tmp.path, 'ours.raw'))).toBeLessThanOrEqual(await allocatedBytes(join(tmp.path, 'theirs.raw')) + 128 * 1024);
    // Writing to an existing file replaces it.
    await writeFile(join(tmp.path, 'again.raw'), Buffer.alloc(16 * 1024 * 1024, 0xee));
    expect((await ours(['convert', '-O', 'raw', 'top.qcow2', 'again.raw'], tmp.path)).code).toBe(0);
    expect(await sha256File(join(tmp.path, 'again.raw'))).toBe(await sha256File(join(tmp.path, 'theirs.raw')));
    // DEST '-': every byte on stdout.
    const piped = await run('sh', ['-c', `"${process.execPath}" "${CLI}" convert -O raw top.qcow2 - | sha256sum`], { cwd: tmp.path });
    expect(piped.stdout.split(' ')[0]).toBe(await sha256File(join(tmp.path, 'theirs.raw')));
    for (const [ref, name] of [['before', 'before'], ['snapshot.name=after compress', 'after compress'], ['snapshot.id=1', 'before']]) {
      await qemuOk(['convert', '-l', `snapshot.name=${name}`, '-O', 'raw', 'top.qcow2', 'snap-theirs.raw'], tmp.path);
      expect((await ours(['convert', '-l', ref, '-O', 'raw', 'top.qcow2', 'snap-ours.raw'], tmp.path)).code).toBe(0);
      expect(await sha256File(join(tmp.path, 'snap-ours.raw')), ref).toBe(await sha256File(join(tmp.path, 'snap-theirs.raw')));
    }
  });

  it('convert -O qcow2 (plain and -c) gives a clean image with the same contents', async () => {
    await checkBuild();
    await chain(tmp.path);
    for (const args of [['-O', 'qcow2'], ['-O', 'qcow2', '-o', 'cluster_size=4k,compat=0.10'], ['-c', '-O', 'qcow2'], ['-c', '-O', 'qcow2', '-o', 'compression_type=zstd']]) {
      const result = await ours(['convert', ...args, 'top.qcow2', 'out.qcow2'], tmp.path);
      expect(result.code, `${args.join(' ')}: ${result.stderr}`).toBe(0);
      expect(await qemuImgCompare(join(tmp.path, 'top.qcow2'), join(tmp.path, 'out.qcow2')), args.join(' ')).toBe(true);
      const check = await qemuImgCheck(join(tmp.path, 'out.qcow2'));
      expect(check.code, `${args.join(' ')}: ${check.stderr}`).toBe(0);
      if (args.includes('-c')) expect(check.report?.['compressed-clusters']).toBeGreaterThan(0);
    }
  });

  it('fails with exit code 1 and a coded message on bad input and bad usage', async () => {
    await checkBuild();
    await writeFile(join(tmp.path, 'junk.qcow2'), Buffer.alloc(4096, 0x41));
    await qemuOk(['create', '-q', '-f', 'qcow2', 'ok.qcow2', '1M'], tmp.path);
    const cases: [string[], RegExp][] = [
      [['info', 'missing.qcow2'], /ENOENT/],
      [['map', '--output=json', 'junk.qcow2'], /not a qcow2 image.*\[EBADMAGIC\]/],
      [['convert', '-f', 'qcow2', '-O', 'raw', 'junk.qcow2', 'out.raw'], /\[EBADMAGIC\]/],
      [['convert', '-c', '-O', 'raw', 'ok.qcow2', 'out.raw'], /Compression not supported/],
      [['convert', '-O', 'vmdk', 'ok.qcow2', 'out.raw'], /raw or qcow2/],
      [['convert', '-l', 'nope', '-O', 'raw', 'ok.qcow2', 'out.raw'], /no snapshot.*\[ENOENT\]/],
      [['info', '--output=xml', 'ok.qcow2'], /human or json/],
      [['map'], /FILENAME/],
      [['info', '-z', 'ok.qcow2'], /unknown option/],
    ];
    for (const [args, message] of cases) {
      const result = await ours(args, tmp.path);
      expect(result.code, args.join(' ')).toBe(1);
      expect(result.stderr, args.join(' ')).toMatch(message);
      expect(result.stderr).not.toMatch(/\n\s+at /); // a message, not a stack trace
    }
    for (const command of ['info', 'map', 'convert']) {
      const help = await ours([command, '--help'], tmp.path);
      expect(help.code).toBe(0);
      expect(help.stdout).toMatch(/^usage: qcow2fuse /);
    }
  });

  it('stops quietly when its reader goes away (map | head)', async () => {
    await checkBuild();
    await qemuOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', 'frag.qcow2', '64M'], tmp.path);
    // Every other cluster written: a long map.
    const writes = Array.from({ length: 2000 }, (_, i) => `write -P 1 ${i * 1024} 512`);
    await qemuIoOk(join(tmp.path, 'frag.qcow2'), writes);
    const result = await run('bash', ['-c', `"${process.execPath}" "${CLI}" map --output=json frag.qcow2 | head -c 100 >/dev/null; echo "exit=\${PIPESTATUS[0]}"`], { cwd: tmp.path });
    expect(result.stdout).toMatch(/exit=[01]\n/);
    expect(result.stderr).not.toMatch(/\n\s+at |Unhandled/);
    expect((await readFile(join(tmp.path, 'frag.qcow2'))).length).toBeGreaterThan(0);
  });
});
