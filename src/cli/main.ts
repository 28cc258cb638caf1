#!/usr/bin/env node
/**
 * qcow2fuse command-line entry: `qcow2fuse COMMAND [ARGS]`, with qemu-img's vocabulary.
 * Each command lives in ./commands/NAME.ts and exports `summary` and `run(argv): Promise<number>`
 * (the process exit code). Besides: `qcow2fuse --version` / `-V`, `qcow2fuse help [COMMAND]`
 * (COMMAND's --help), and `qcow2fuse IMAGE MOUNTPOINT [-o OPTIONS]` — a mount, the form mount(8)
 * uses through mount.fuse3 for `mount -t fuse.qcow2fuse` and fstab lines (as sshfs has it).
 */
import { existsSync, readFileSync } from 'node:fs';

// Host I/O (O_DIRECT writes above all) and compression run on libuv's threadpool, which starts on
// first use with UV_THREADPOOL_SIZE threads (default 4): 4 requests in flight cannot keep a disk
// busy the way qemu's 64-deep AIO does. This runs before any command module touches the pool.
process.env.UV_THREADPOOL_SIZE ??= '16';

export interface Command {
  summary: string;
  run(argv: string[]): Promise<number>;
}

const COMMANDS = ['create', 'info', 'map', 'check', 'convert', 'resize', 'snapshot', 'bench', 'mount', 'unmount', 'demo'] as const;

async function loadCommand(name: string): Promise<Command | undefined> {
  if (!(COMMANDS as readonly string[]).includes(name)) return undefined;
  return (await import(`./commands/${name}.js`)) as Command;
}

async function usage(): Promise<string> {
  const lines = ['usage: qcow2fuse COMMAND [OPTIONS] ...', '', 'commands:'];
  for (const name of COMMANDS) {
    const command = await loadCommand(name);
    lines.push(`  ${name.padEnd(10)} ${command?.summary ?? ''}`);
  }
  lines.push('', '  qcow2fuse IMAGE MOUNTPOINT [-o OPTIONS]   mount (the form of mount -t fuse.qcow2fuse and fstab)',
    '  qcow2fuse --version | -V                 print the version',
    '', 'Run `qcow2fuse help COMMAND` (or `qcow2fuse COMMAND --help`) for a command\'s options. Trace logs: DEBUG=qcow2fuse:*');
  return lines.join('\n');
}

/** The package's version (package.json beside dist/, in a checkout as in an installed package). */
export function version(): string {
  const manifest = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };
  return manifest.version;
}

/**
 * True when argv is the mount helper's form `IMAGE MOUNTPOINT [-o OPTIONS]`: the first word is no
 * command but a path (it has a '/', as mount(8) passes it, or names an existing file), so a missing
 * image gets the mount's "cannot open" and a mistyped command still gets "unknown command".
 */
function isMountHelperForm(argv: readonly string[]): boolean {
  const [first] = argv;
  return first !== undefined && !first.startsWith('-') && !(COMMANDS as readonly string[]).includes(first) &&
    (first.includes('/') || existsSync(first));
}

export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === '--version' || name === '-V') {
    process.stdout.write(`qcow2fuse ${version()}\n`);
    return 0;
  }
  if (name === 'help' && rest.length > 0) {
    const command = await loadCommand(rest[0]);
    if (command !== undefined) return command.run(['--help']);
    process.stderr.write(`qcow2fuse: unknown command '${rest[0]}'\n${await usage()}\n`);
    return 1;
  }
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(`${await usage()}\n`);
    return name === undefined ? 1 : 0;
  }
  if (isMountHelperForm(argv)) return (await loadCommand('mount'))!.run(argv);
  const command = await loadCommand(name);
  if (!command) {
    process.stderr.write(`qcow2fuse: unknown command '${name}'\n${await usage()}\n`);
    return 1;
  }
  return command.run(rest);
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err: unknown) => {
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(`qcow2fuse: ${message}\n`);
    process.exitCode = 1;
  },
);
