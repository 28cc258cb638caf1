/**
 * `qcow2fuse convert` — qemu-img convert: parse the arguments, print progress and errors; the copy
 * itself is library code (src/convert: convertFiles). SOURCE is a qcow2 image (with its backing
 * chain, or an internal snapshot with -l), a raw file, a block device, or '-' (a pipe: its size is
 * what arrives; `-o size=SIZE` makes a shorter or longer stream an error). DEST '-' is stdout (raw).
 */
import { parseArgs, parseSize } from '../args.js';
import { parseCreateArgs } from './create.js';
import { commandError, trace } from '../output.js';
import { FORCE_SHARE_FLAGS, FORCE_SHARE_USAGE, forceShareOf, warnIfForceShared } from '../force-share.js';
import { convertFiles, type ConvertFilesOptions } from '../../convert/convert-files.js';
import { ProgressReporter } from '../../convert/progress.js';
import type { ConvertCacheMode } from '../../convert/sink.js';
import type { ImageFormat } from '../../convert/source.js';
import type { CacheMode } from '../../qcow2/engine/image.js';
import type { SnapshotRef } from '../../qcow2/engine/snapshot.js';

export const summary = 'copy an image, raw file, block device or pipe to raw or (compressed) qcow2 (qemu-img convert)';

const USAGE = `usage: qcow2fuse convert [-U] [-f raw|qcow2] [-O raw|qcow2] [-o OPTIONS] [-c] [-p] [-q] [-S SIZE] [-B BACKING [-F FMT]] [-n] [-m JOBS] [-t CACHE] [-T SRC_CACHE] [-l SNAPSHOT] SOURCE DEST
  SOURCE         a qcow2 image, a raw file, a block device, or '-' (stdin, e.g. a pipe)
  DEST           the output ('-' writes raw to stdout)
  -f FMT         source format (default: probed — qcow2 magic, else raw)
  -O FMT         output format, raw (default) or qcow2
  -o OPTIONS     qcow2 output options, as for 'create' (cluster_size, compat, compression_type, extended_l2, …);
                 for SOURCE '-', size=SIZE is the size the stream must have
  -c             compress the clusters of a qcow2 output (on every core)
  -S SIZE        zero runs of at least SIZE bytes are left unallocated (default 4k; 0 writes everything)
  -B BACKING     make DEST a qcow2 image over BACKING: only what differs from it is written (-F its format)
  -n             DEST exists: write into it, do not create it
  -m JOBS        windows of 8 MiB in flight, reads and writes (1–16, default 8)
  -t CACHE       DEST cache: unsafe (default: no sync), writeback, writethrough, none, directsync
  -T CACHE       SOURCE cache: writeback (default), none (O_DIRECT), writethrough
  -l SNAPSHOT    read the internal snapshot SNAPSHOT (id or name; or snapshot.id=ID / snapshot.name=NAME)
  -p             show progress on stderr (percent, MB/s, time left)
  -q             quiet
${FORCE_SHARE_USAGE} (the source)
`;

const VALUE_FLAGS = ['-O', '-f', '-l', '-o', '-t', '-T', '-S', '-B', '-F', '-m'];
const BOOL_FLAGS = ['-p', '-q', '-c', '-n', ...FORCE_SHARE_FLAGS, '-h', '--help'];
const DEST_CACHES: ConvertCacheMode[] = ['unsafe', 'writeback', 'writethrough', 'none', 'directsync'];
const SOURCE_CACHES: CacheMode[] = ['writeback', 'writethrough', 'none'];

export interface ConvertArgs {
  source: string;
  dest: string;
  progress: boolean;
  /** For convertFiles (everything but the callbacks). */
  options: ConvertFilesOptions;
}

function imageFormat(flag: string, value: string | undefined): ImageFormat | undefined {
  if (value === undefined) return undefined;
  if (value !== 'raw' && value !== 'qcow2') throw new Error(`${flag}: format must be raw or qcow2, got '${value}'`);
  return value;
}

function snapshotRef(l: string): SnapshotRef {
  if (l.startsWith('snapshot.id=')) return { id: l.slice('snapshot.id='.length) };
  if (l.startsWith('snapshot.name=')) return { name: l.slice('snapshot.name='.length) };
  return l;
}

function oneOf<T extends string>(flag: string, value: string, allowed: readonly T[]): T {
  if (!(allowed as readonly string[]).includes(value)) throw new Error(`${flag}: invalid cache mode '${value}' (${allowed.join(', ')})`);
  return value as T;
}

/** -S: qemu-img's rule (multiples of 512 up to 16 MiB, 0 = no sparse detection). */
function sparseSize(text: string): number {
  const bytes = parseSize(text);
  if (bytes % 512 !== 0 || bytes > 16 * 1024 * 1024) {
    throw new Error('Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).');
  }
  return bytes;
}

/** The flags that shape the copy (everything except formats and paths). */
function copyOptions(flags: Map<string, string>): ConvertFilesOptions {
  const o: ConvertFilesOptions = {};
  if (flags.has('-l')) o.snapshot = snapshotRef(flags.get('-l')!);
  if (flags.has('-S')) o.minSparseBytes = sparseSize(flags.get('-S')!);
  if (flags.has('-t')) o.cache = oneOf('-t', flags.get('-t')!, DEST_CACHES);
  if (flags.has('-T')) o.sourceCache = oneOf('-T', flags.get('-T')!, SOURCE_CACHES);
  if (flags.has('-m')) {
    const jobs = Number(flags.get('-m'));
    if (!Number.isInteger(jobs) || jobs < 1 || jobs > 16) throw new Error('Invalid number of coroutines. Allowed number of coroutines is between 1 and 16');
    o.jobs = jobs;
  }
  if (flags.has('-B')) o.backingFile = flags.get('-B')!;
  const backingFormat = imageFormat('-F', flags.get('-F'));
  if (backingFormat) {
    if (!flags.has('-B')) throw new Error('-F needs -B');
    o.backingFormat = backingFormat;
  }
  if (flags.has('-n')) o.noCreate = true;
  if (flags.has('-c')) o.compress = true;
  if (forceShareOf(flags)) o.forceShare = true;
  return o;
}

/** Parse qemu-img convert's arguments; throws with a message (and code 'USAGE' for --help). */
export function parseConvertArgs(argv: string[]): ConvertArgs {
  const { flags, positional } = parseArgs(argv, VALUE_FLAGS, BOOL_FLAGS);
  if (flags.has('-h') || flags.has('--help')) throw Object.assign(new Error(USAGE), { code: 'USAGE' });
  if (positional.length !== 2) throw new Error('expected SOURCE and DEST');
  const [source, dest] = positional as [string, string];
  const outputFormat = imageFormat('-O', flags.get('-O')) ?? 'raw';
  const options: ConvertFilesOptions = { ...copyOptions(flags), outputFormat };
  const sourceFormat = imageFormat('-f', flags.get('-f'));
  if (sourceFormat) options.sourceFormat = sourceFormat;
  if (options.compress && outputFormat === 'raw') throw new Error('Compression not supported for this file format');
  if (dest === '-' && outputFormat !== 'raw') throw new Error("DEST '-' (stdout) needs -O raw");
  if (flags.has('-o')) {
    const { options: createOptions } = parseCreateArgs(['-o', flags.get('-o')!, dest]);
    if (outputFormat !== 'qcow2' && Object.keys(createOptions).some((k) => k !== 'virtualSize')) throw new Error('-o options are only for -O qcow2 (except size)');
    // qemu-img takes the size from the source; for a stream it is the size the stream must have.
    if (createOptions.virtualSize !== undefined && source === '-') options.expectedBytes = createOptions.virtualSize;
    delete createOptions.virtualSize;
    options.createOptions = createOptions;
  }
  return { source, dest, progress: flags.has('-p') && !flags.has('-q'), options };
}

export async function run(argv: string[]): Promise<number> {
  let args: ConvertArgs;
  try {
    args = parseConvertArgs(argv);
  } catch (err) {
    if ((err as { code?: unknown }).code === 'USAGE') {
      process.stdout.write(USAGE);
      return 0;
    }
    process.stderr.write(`qcow2fuse convert: ${commandError(err)}\n${USAGE}`);
    return 1;
  }
  const progress = args.progress ? new ProgressReporter({ tty: process.stderr.isTTY === true, write: (t) => process.stderr.write(t) }) : undefined;
  try {
    trace('convert %s → %s (%o)', args.source, args.dest, args.options);
    if (args.source !== '-') warnIfForceShared('convert', args.source, args.options.forceShare ?? false);
    const result = await convertFiles(args.source, args.dest, {
      ...args.options,
      onWarning: (message) => process.stderr.write(`qcow2fuse convert: warning: ${message}\n`),
      ...(progress ? { onProgress: (done: number, total: number | undefined) => progress.update(done, total) } : {}),
    });
    progress?.finish(result.sourceBytes);
    return 0;
  } catch (err) {
    if (progress) process.stderr.write('\n');
    process.stderr.write(`qcow2fuse convert: ${commandError(err)}\n`);
    return 1;
  }
}
