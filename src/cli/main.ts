#!/usr/bin/env node
/**
 * qcow2fuse command-line entry: `qcow2fuse COMMAND [ARGS]`, with qemu-img's vocabulary.
 * Each command lives in ./commands/NAME.ts and exports `summary` and `run(argv): Promise<number>`
 * (the process exit code).
 */
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
  lines.push('', 'Run `qcow2fuse COMMAND --help` for a command\'s options. Trace logs: DEBUG=qcow2fuse:*');
  return lines.join('\n');
}

export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(`${await usage()}\n`);
    return name === undefined ? 1 : 0;
  }
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
