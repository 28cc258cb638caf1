/**
 * The arguments `info` and `map` share, as qemu-img reads them: `[-f qcow2] [-U] [--output=human|json]
 * FILENAME` (and -h/--help).
 */
import { parseArgs } from './args.js';
import { FORCE_SHARE_FLAGS, forceShareOf } from './force-share.js';
import { commandError } from './output.js';

export interface ReportArgs {
  path: string;
  json: boolean;
  forceShare: boolean;
}

/**
 * Parse a report command's arguments. Returns them, or the exit code when the command is done
 * already: 0 after printing `usage` for -h/--help, 1 after printing the error and `usage` on stderr.
 */
export function parseReportArgs(command: string, argv: string[], usage: string): ReportArgs | number {
  try {
    const { flags, positional } = parseArgs(argv, ['-f', '--output'], [...FORCE_SHARE_FLAGS, '-h', '--help']);
    if (flags.has('-h') || flags.has('--help')) {
      process.stdout.write(usage);
      return 0;
    }
    const format = flags.get('-f') ?? 'qcow2';
    if (format !== 'qcow2') throw new Error(`only qcow2 images are supported (got -f ${format})`);
    const output = flags.get('--output') ?? 'human';
    if (output !== 'human' && output !== 'json') throw new Error(`--output must be human or json, got '${output}'`);
    if (positional.length !== 1) throw new Error('expected one FILENAME');
    return { path: positional[0], json: output === 'json', forceShare: forceShareOf(flags) };
  } catch (err) {
    process.stderr.write(`qcow2fuse ${command}: ${commandError(err)}\n${usage}`);
    return 1;
  }
}
