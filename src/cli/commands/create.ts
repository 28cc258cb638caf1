/**
 * `qcow2fuse create [-f qcow2] [-b BACKING [-F FMT]] [-o OPTIONS] [-q] IMAGE [SIZE]` — qemu-img create.
 */
import { createImage, type CreateOptions, type Preallocation } from '../../qcow2/tools/create.js';
import { Qcow2Image } from '../../qcow2/engine/image.js';
import { parseArgs, parseBool, parseOptionList, parseSize } from '../args.js';

export const summary = 'create a qcow2 image (qemu-img create options)';

const USAGE = `usage: qcow2fuse create [-f qcow2] [-b BACKING_FILE [-F BACKING_FMT]] [-o OPTIONS] [-q] FILENAME [SIZE]
options (-o): cluster_size, compat=0.10|1.1, refcount_bits, lazy_refcounts=on|off, extended_l2=on|off,
  compression_type=zlib|zstd, preallocation=off|metadata|falloc|full, data_file=PATH, data_file_raw=on|off,
  backing_file, backing_fmt, size`;

/** Turn qemu-img create arguments into CreateOptions. */
export function parseCreateArgs(argv: string[]): { path: string; options: CreateOptions; quiet: boolean } {
  const { flags, positional } = parseArgs(argv, ['-f', '-b', '-F', '-o'], ['-q', '-h', '--help']);
  if (flags.has('-h') || flags.has('--help')) throw Object.assign(new Error(USAGE), { code: 'USAGE' });
  const format = flags.get('-f') ?? 'qcow2';
  if (format !== 'qcow2') throw new Error(`only qcow2 images can be created (got -f ${format})`);
  const [path, sizeText, ...extra] = positional;
  if (path === undefined || extra.length > 0) throw new Error(USAGE);
  const options: CreateOptions = {};
  if (sizeText !== undefined) options.virtualSize = parseSize(sizeText);
  if (flags.has('-b')) options.backingFile = flags.get('-b');
  if (flags.has('-F')) options.backingFormat = checkFormat(flags.get('-F')!);
  for (const [key, value] of parseOptionList(flags.get('-o') ?? '')) {
    switch (key) {
      case 'cluster_size': options.clusterSize = parseSize(value); break;
      case 'compat':
        if (value === '1.1' || value === 'v3') options.compat = '1.1';
        else if (value === '0.10' || value === 'v2') options.compat = '0.10';
        else throw new Error(`invalid compatibility version '${value}'`);
        break;
      case 'refcount_bits': options.refcountBits = Number(value); break;
      case 'lazy_refcounts': options.lazyRefcounts = parseBool(key, value); break;
      case 'extended_l2': options.extendedL2 = parseBool(key, value); break;
      case 'compression_type':
        if (value !== 'zlib' && value !== 'zstd') throw new Error(`unknown compression type '${value}'`);
        options.compressionType = value;
        break;
      case 'preallocation':
        if (!['off', 'metadata', 'falloc', 'full'].includes(value)) throw new Error(`invalid preallocation mode '${value}'`);
        options.preallocation = value as Preallocation;
        break;
      case 'data_file': options.dataFile = value; break;
      case 'data_file_raw': options.dataFileRaw = parseBool(key, value); break;
      case 'backing_file': options.backingFile = value; break;
      case 'backing_fmt': options.backingFormat = checkFormat(value); break;
      case 'size': options.virtualSize = parseSize(value); break;
      default: throw new Error(`invalid parameter '${key}'`);
    }
  }
  return { path, options, quiet: flags.has('-q') };
}

function checkFormat(value: string): 'qcow2' | 'raw' {
  if (value !== 'qcow2' && value !== 'raw') throw new Error(`unsupported backing format '${value}' (qcow2 or raw)`);
  return value;
}

export async function run(argv: string[]): Promise<number> {
  let parsed: ReturnType<typeof parseCreateArgs>;
  try {
    parsed = parseCreateArgs(argv);
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    const help = (err as { code?: string }).code === 'USAGE';
    (help ? process.stdout : process.stderr).write(`${message}\n`);
    return help ? 0 : 1;
  }
  const { path, options, quiet } = parsed;
  await createImage(path, options);
  if (!quiet) {
    const virtualSize = options.virtualSize ?? await createdSize(path);
    process.stdout.write(`${formattingLine(path, options, virtualSize)}\n`);
  }
  return 0;
}

/** The size of the image just created (taken from its backing file when none was given). */
async function createdSize(path: string): Promise<number> {
  const image = await Qcow2Image.open(path, { readOnly: true });
  try {
    return image.virtualSize;
  } finally {
    await image.close();
  }
}

/**
 * qemu-img create's report, option for option in its order: the options with defaults always, the
 * others (preallocation, compat, backing file and format, data file) when they were given.
 */
export function formattingLine(path: string, o: CreateOptions, virtualSize: number): string {
  const onOff = (v: boolean | undefined) => (v === true ? 'on' : 'off');
  const parts = [`Formatting '${path}', fmt=qcow2`, `cluster_size=${o.clusterSize ?? 65536}`, `extended_l2=${onOff(o.extendedL2)}`];
  if (o.preallocation !== undefined) parts.push(`preallocation=${o.preallocation}`);
  parts.push(`compression_type=${o.compressionType ?? 'zlib'}`, `size=${virtualSize}`);
  if (o.compat !== undefined) parts.push(`compat=${o.compat}`);
  if (o.backingFile !== undefined) parts.push(`backing_file=${o.backingFile}`);
  if (o.backingFormat !== undefined) parts.push(`backing_fmt=${o.backingFormat}`);
  if (o.dataFile !== undefined) parts.push(`data_file=${o.dataFile}`);
  if (o.dataFileRaw !== undefined) parts.push(`data_file_raw=${onOff(o.dataFileRaw)}`);
  parts.push(`lazy_refcounts=${onOff(o.lazyRefcounts)}`, `refcount_bits=${o.refcountBits ?? 16}`);
  return parts.join(' ');
}
