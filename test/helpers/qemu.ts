/**
 * qemu-img / qemu-io wrappers: the oracle of DESIGN §7.
 *
 * `run`, `qemuImg` and `qemuIo` never throw on a non-zero exit: they return {stdout, stderr, code}
 * for the test to assert on. The typed helpers (qemuImgCreate, qemuImgInfo, …) throw a QemuError
 * carrying the command line and stderr when qemu reports a failure they do not expect.
 */
import { run, type ExecResult, type RunOptions } from './exec.js';

export { run, type ExecResult, type RunOptions };

export class QemuError extends Error {
  constructor(readonly argv: readonly string[], readonly result: ExecResult) {
    super(`${argv.join(' ')} exited ${result.code}: ${result.stderr.trim() || result.stdout.trim()}`);
    this.name = 'QemuError';
  }
}

/** `qemu-img ARGS`. */
export function qemuImg(args: readonly string[], options?: RunOptions): Promise<ExecResult> {
  return run('qemu-img', args, options);
}

async function qemuImgOk(args: readonly string[], options?: RunOptions): Promise<ExecResult> {
  const result = await qemuImg(args, options);
  if (result.code !== 0) throw new QemuError(['qemu-img', ...args], result);
  return result;
}

export interface QemuIoOptions extends RunOptions {
  /** Image format (-f); default qcow2. */
  format?: string;
  /** Open read-only (-r). */
  readOnly?: boolean;
  /** Share all permissions (-U): open an image another process holds for writing. Implies readOnly. */
  force?: boolean;
  /** Cache mode (-t): none, writeback, writethrough, unsafe, directsync. */
  cache?: string;
}

/**
 * `qemu-io [-f FMT] [-r] [-U] [-t CACHE] -c CMD… IMAGE`. qemu-io exits 1 when a command fails,
 * including a `read -P` pattern mismatch ("Pattern verification failed").
 */
export function qemuIo(image: string, commands: readonly string[], options: QemuIoOptions = {}): Promise<ExecResult> {
  const args = ['-f', options.format ?? 'qcow2'];
  if (options.readOnly === true || options.force === true) args.push('-r');
  if (options.force === true) args.push('-U');
  if (options.cache !== undefined) args.push('-t', options.cache);
  for (const command of commands) args.push('-c', command);
  args.push(image);
  return run('qemu-io', args, options);
}

/** qemu-io that throws QemuError unless every command succeeded. */
export async function qemuIoOk(image: string, commands: readonly string[], options: QemuIoOptions = {}): Promise<ExecResult> {
  const result = await qemuIo(image, commands, options);
  if (result.code !== 0) throw new QemuError(['qemu-io', image, ...commands], result);
  return result;
}

export type QemuOptionValue = string | number | boolean;

function formatOptions(options: Record<string, QemuOptionValue>): string {
  return Object.entries(options)
    .map(([key, value]) => `${key}=${typeof value === 'boolean' ? (value ? 'on' : 'off') : String(value).replaceAll(',', ',,')}`)
    .join(',');
}

export interface CreateOptions {
  /** Image format (-f); default qcow2. */
  format?: string;
  /** Backing file (-b) and its format (-F, default qcow2 when a backing file is given). */
  backing?: string;
  backingFormat?: string;
}

/**
 * `qemu-img create -f FMT [-b B -F F] [-o K=V,…] PATH SIZE`. `options` become -o (booleans as on/off),
 * e.g. {cluster_size: 65536, compression_type: 'zstd', lazy_refcounts: true}. Size in bytes or with
 * qemu's suffixes ('64M').
 */
export async function qemuImgCreate(path: string, size: number | string, options: Record<string, QemuOptionValue> = {},
  create: CreateOptions = {}): Promise<void> {
  const args = ['create', '-q', '-f', create.format ?? 'qcow2'];
  if (create.backing !== undefined) args.push('-b', create.backing, '-F', create.backingFormat ?? 'qcow2');
  if (Object.keys(options).length > 0) args.push('-o', formatOptions(options));
  args.push(path, String(size));
  await qemuImgOk(args);
}

/** `qemu-img info --output=json` (the fields we rely on; qemu adds more). */
export interface QemuImgInfo {
  'virtual-size': number;
  filename: string;
  format: string;
  'actual-size'?: number;
  'cluster-size'?: number;
  'dirty-flag'?: boolean;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  snapshots?: { id: string; name: string; 'vm-state-size': number }[];
  'format-specific'?: {
    type: string;
    data: {
      compat?: string;
      'compression-type'?: string;
      'lazy-refcounts'?: boolean;
      'refcount-bits'?: number;
      corrupt?: boolean;
      'extended-l2'?: boolean;
      [key: string]: unknown;
    };
  };
  [key: string]: unknown;
}

/** `qemu-img info --output=json -U PATH` parsed; -U so it works while we hold the image. */
export async function qemuImgInfo(path: string, format?: string): Promise<QemuImgInfo> {
  const args = ['info', '--output=json', '-U'];
  if (format !== undefined) args.push('-f', format);
  args.push(path);
  return JSON.parse((await qemuImgOk(args)).stdout) as QemuImgInfo;
}

/** One extent of `qemu-img map --output=json`. `offset` is the host offset when it has one (not for compressed data). */
export interface QemuMapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  compressed?: boolean;
}

/** `qemu-img map --output=json -U PATH` parsed. */
export async function qemuImgMap(path: string, format = 'qcow2'): Promise<QemuMapEntry[]> {
  return JSON.parse((await qemuImgOk(['map', '--output=json', '-U', '-f', format, path])).stdout) as QemuMapEntry[];
}

/** `qemu-img check --output=json` report (present whenever qemu could check the image). */
export interface QemuImgCheckReport {
  filename: string;
  format: string;
  'check-errors': number;
  'image-end-offset'?: number;
  'total-clusters'?: number;
  'allocated-clusters'?: number;
  'fragmented-clusters'?: number;
  'compressed-clusters'?: number;
  corruptions?: number;
  leaks?: number;
  'corruptions-fixed'?: number;
  'leaks-fixed'?: number;
  [key: string]: unknown;
}

export interface QemuImgCheckResult {
  /** qemu-img's exit code: 0 clean, 1 could not check, 2 corruptions, 3 leaks only, 63 no check support. */
  code: number;
  /** The parsed report, undefined when qemu could not check the image at all. */
  report?: QemuImgCheckReport;
  stderr: string;
}

/** `qemu-img check --output=json [-r leaks|all] PATH`. */
export async function qemuImgCheck(path: string, repair?: 'leaks' | 'all'): Promise<QemuImgCheckResult> {
  const args = ['check', '--output=json', '-f', 'qcow2'];
  if (repair !== undefined) args.push('-r', repair);
  args.push(path);
  const result = await qemuImg(args);
  const text = result.stdout.trim();
  return { code: result.code, stderr: result.stderr, ...(text.startsWith('{') ? { report: JSON.parse(text) as QemuImgCheckReport } : {}) };
}

/**
 * The "everything we write ends clean" assertion: `qemu-img check` must exit 0 (no corruptions,
 * no leaks, no check errors). Returns the report; otherwise throws with qemu's findings.
 */
export async function qemuImgCheckClean(path: string): Promise<QemuImgCheckReport> {
  const result = await qemuImgCheck(path);
  if (result.code !== 0 || result.report === undefined) {
    const findings = result.report === undefined ? result.stderr.trim() : JSON.stringify(result.report);
    throw new Error(`qemu-img check ${path} exited ${result.code} (2 corruptions, 3 leaks): ${findings}`);
  }
  return result.report;
}

export interface CompareOptions {
  formatA?: string;
  formatB?: string;
  /** -s: images with different sizes, or allocated vs unallocated, differ. */
  strict?: boolean;
}

/** `qemu-img compare`: true when the guest contents are identical; throws when qemu cannot compare. */
export async function qemuImgCompare(a: string, b: string, options: CompareOptions = {}): Promise<boolean> {
  const args = ['compare', '-q', '-U'];
  if (options.formatA !== undefined) args.push('-f', options.formatA);
  if (options.formatB !== undefined) args.push('-F', options.formatB);
  if (options.strict === true) args.push('-s');
  args.push(a, b);
  const result = await qemuImg(args);
  if (result.code === 0) return true;
  if (result.code === 1) return false;
  throw new QemuError(['qemu-img', ...args], result);
}

export interface ConvertOptions {
  /** Source format; default: probe. */
  format?: string;
  /** Read this internal snapshot (-l snapshot.name=NAME) instead of the active layer. */
  snapshot?: string;
}

/** `qemu-img convert -O raw SRC DST`: the guest contents as a raw file (the reference for comparisons). */
export async function qemuImgConvertToRaw(src: string, dst: string, options: ConvertOptions = {}): Promise<void> {
  const args = ['convert', '-O', 'raw'];
  if (options.format !== undefined) args.push('-f', options.format);
  if (options.snapshot !== undefined) args.push('-l', `snapshot.name=${options.snapshot.replaceAll(',', ',,')}`);
  args.push(src, dst);
  await qemuImgOk(args);
}

/** First line of `qemu-img --version`, e.g. "qemu-img version 7.2.22 (Debian …)". */
export async function qemuImgVersion(): Promise<string> {
  return (await qemuImgOk(['--version'])).stdout.split('\n')[0] ?? '';
}
