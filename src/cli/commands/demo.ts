/**
 * `qcow2fuse demo [--dir DIR] [--size SIZE] [--keep]` — the main job on a built-in example (DESIGN §8):
 * build a small ext4 disk from files on this machine, copy it into a compressed qcow2 image through
 * a mount, show the inspection files, loop-mount the disk inside the mounted image and compare it
 * with the source files, unmount, and check the image (with qemu-img too when it is installed).
 * Every step prints the shell command a user would type for it.
 */
import { execFile, spawn } from 'node:child_process';
import { cp, mkdir, mkdtemp, readFile, readdir, rm, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { parseArgs, parseSize } from '../args.js';

export const summary = 'run the main job on a built-in example (ext4 disk → compressed image via a mount)';

const execFileAsync = promisify(execFile);
const CLI = fileURLToPath(new URL('../main.js', import.meta.url));

function say(text: string): void {
  process.stdout.write(`${text}\n`);
}

/** Run a command, echoing it; resolves with stdout. */
async function sh(command: string, args: string[], options: { quiet?: boolean } = {}): Promise<string> {
  say(`$ ${[command, ...args].join(' ')}`);
  const { stdout } = await execFileAsync(command, args, { maxBuffer: 64 * 1024 * 1024 });
  if (!options.quiet && stdout.trim() !== '') say(stdout.trimEnd());
  return stdout;
}

async function qcow2fuse(args: string[], options: { quiet?: boolean } = {}): Promise<string> {
  say(`$ qcow2fuse ${args.join(' ')}`);
  const { stdout } = await execFileAsync(process.execPath, [CLI, ...args], { maxBuffer: 64 * 1024 * 1024 });
  if (!options.quiet && stdout.trim() !== '') say(stdout.trimEnd());
  return stdout;
}

async function hasCommand(name: string): Promise<boolean> {
  try {
    await execFileAsync('sh', ['-c', `command -v ${name}`]);
    return true;
  } catch {
    return false;
  }
}

/** Copy up to `budgetBytes` of regular files from `sources` into `dest` (the demo's file set). */
async function stageFiles(sources: string[], dest: string, budgetBytes: number): Promise<{ files: number; bytes: number }> {
  let files = 0;
  let bytes = 0;
  const walk = async (dir: string, rel: string): Promise<void> => {
    let entries;
    try {
      entries = await readdir(dir, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries.sort((a, b) => a.name.localeCompare(b.name))) {
      if (bytes >= budgetBytes) return;
      const from = join(dir, e.name);
      const to = join(dest, rel, e.name);
      if (e.isDirectory()) {
        await mkdir(to, { recursive: true });
        await walk(from, join(rel, e.name));
      } else if (e.isFile()) {
        const size = (await stat(from)).size;
        await cp(from, to);
        files++;
        bytes += size;
      }
    }
  };
  for (const s of sources) {
    const base = s.replace(/^\//, '').replace(/\//g, '_');
    await mkdir(join(dest, base), { recursive: true });
    await walk(s, base);
  }
  return { files, bytes };
}

const USAGE = 'usage: qcow2fuse demo [--dir DIR] [--size SIZE] [--keep]\n';

export async function run(argv: string[]): Promise<number> {
  const { flags } = parseArgs(argv, ['--dir', '--size'], ['--keep', '-h', '--help']);
  if (flags.has('-h') || flags.has('--help')) {
    process.stdout.write(USAGE);
    return 0;
  }
  const diskBytes = parseSize(flags.get('--size') ?? '256M');
  const base = flags.has('--dir') ? resolve(flags.get('--dir')!) : await mkdtemp('/var/tmp/qcow2fuse-demo-');
  await mkdir(base, { recursive: true });
  const staging = join(base, 'files');
  const disk = join(base, 'disk.raw');
  const image = join(base, 'backup.qcow2');
  const mnt = join(base, 'mnt');
  const loop = join(base, 'loop');
  let mounted = false;
  let loopMounted = false;
  try {
    say(`# qcow2fuse demo in ${base}`);
    say('\n## 1. A small ext4 disk built from files on this machine');
    const staged = await stageFiles(['/usr/share/doc', '/usr/share/man'], staging, Math.floor(diskBytes * 0.4));
    say(`(staged ${staged.files} files, ${(staged.bytes / 2 ** 20).toFixed(1)} MiB, from /usr/share/doc and /usr/share/man)`);
    await sh('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', staging, disk, `${Math.floor(diskBytes / 1024)}k`]);

    say('\n## 2. Copy it into a compressed qcow2 image through a mount');
    await qcow2fuse(['create', '-q', image, '0']);
    await mkdir(mnt, { recursive: true });
    await qcow2fuse(['mount', '-o', 'compress', image, mnt]);
    mounted = true;
    const t0 = process.hrtime.bigint();
    await sh('cp', [disk, join(mnt, 'disk.raw')]);
    await sh('sync', ['-f', join(mnt, 'disk.raw')]);
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    say(`(copied ${(diskBytes / 2 ** 20).toFixed(0)} MiB in ${seconds.toFixed(2)} s)`);

    say('\n## 3. What the image is made of, as plain files');
    await sh('ls', ['-ls', mnt]);
    const info = JSON.parse(await readFile(join(mnt, 'info.json'), 'utf8')) as Record<string, unknown>;
    say(`$ cat ${join(mnt, 'info.json')}   # excerpt`);
    say(JSON.stringify({ 'virtual-size': info['virtual-size'], 'actual-size': info['actual-size'], 'cluster-size': info['cluster-size'], 'format-specific': info['format-specific'] }, null, 2));
    const map = JSON.parse(await readFile(join(mnt, 'map.json'), 'utf8')) as { data: boolean; compressed?: boolean; length: number }[];
    const dataBytes = map.filter((e) => e.data).reduce((n, e) => n + e.length, 0);
    say(`$ jq '[.[] | select(.data)] | length' ${join(mnt, 'map.json')}`);
    say(`${map.filter((e) => e.data).length} data extents, ${(dataBytes / 2 ** 20).toFixed(1)} MiB of guest data`);
    const layout = (await readFile(join(mnt, 'layout.txt'), 'utf8')).split('\n');
    say(`$ head -8 ${join(mnt, 'layout.txt')}`);
    say(layout.slice(0, 8).join('\n'));
    say(`$ cat ${join(mnt, 'check.json')}`);
    say((await readFile(join(mnt, 'check.json'), 'utf8')).trimEnd());

    say('\n## 4. Use the disk inside the mounted image: loop-mount it and compare with the source files');
    await mkdir(loop, { recursive: true });
    await sh('mount', ['-o', 'loop,ro', join(mnt, 'disk.raw'), loop]);
    loopMounted = true;
    await sh('diff', ['-r', '-q', '-x', 'lost+found', staging, loop], { quiet: true });
    say('(no differences)');
    await sh('umount', [loop]);
    loopMounted = false;

    say('\n## 5. Unmount (flushes and closes the image) and check it');
    await qcow2fuse(['unmount', mnt]);
    mounted = false;
    await qcow2fuse(['check', image]);
    if (await hasCommand('qemu-img')) {
      await sh('qemu-img', ['check', image]);
      await sh('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', image, disk]);
    }
    const imageBytes = (await stat(image)).size;
    say(`\nDone: ${(diskBytes / 2 ** 20).toFixed(0)} MiB disk stored in a ${(imageBytes / 2 ** 20).toFixed(1)} MiB compressed image.`);
    return 0;
  } finally {
    if (loopMounted) await execFileAsync('umount', ['-l', loop]).catch(() => undefined);
    if (mounted) await runQuiet(process.execPath, [CLI, 'unmount', mnt]);
    if (!flags.has('--keep')) await rm(base, { recursive: true, force: true });
    else say(`(kept ${base})`);
  }
}

function runQuiet(command: string, args: string[]): Promise<void> {
  return new Promise((resolvePromise) => {
    const child = spawn(command, args, { stdio: 'ignore' });
    child.on('close', () => resolvePromise());
    child.on('error', () => resolvePromise());
  });
}
