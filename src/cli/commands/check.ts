/**
 * `qcow2fuse check [-f qcow2] [-r leaks|all] [--output=human|json] [-p] [-q] IMAGE` — qemu-img check:
 * counts leaked clusters and corruptions (refcount mismatches, bad table entries, wrong COPIED
 * flags, a broken snapshot table); -r leaks frees leaks, -r all also repairs corruptions.
 *
 * Refused while another process writes the image, unless -U / --force-share (not with -r: a repair
 * writes). Exit codes as qemu-img: 0 clean, 1 the check could not run (or had internal errors), 2 corruptions
 * left, 3 leaks only. Diagnostics go to stderr, the report to stdout (the same JSON keys as qemu-img).
 */
import { checkImage, CheckFailedError, type CheckResult, type RepairMode } from '../../qcow2/check/check.js';
import { Qcow2Image } from '../../qcow2/engine/image.js';
import { parseArgs } from '../args.js';
import { FORCE_SHARE_FLAGS, FORCE_SHARE_USAGE, forceShareOf, warnIfForceShared } from '../force-share.js';
import { commandError, progressText, qemuJson, writeOut } from '../output.js';

export const summary = 'check an image for errors and leaks, optionally repair (qemu-img check)';

const USAGE = `usage: qcow2fuse check [-f qcow2] [-U] [-r leaks|all] [--output=human|json] [-p] [-q] FILENAME
${FORCE_SHARE_USAGE}
  -r leaks   free leaked clusters
  -r all     also repair corruptions (rebuilding the refcount structure when needed)
  -p         show progress on stderr
  -q         quiet: no report on stdout
exit status: 0 no errors, 1 the check failed, 2 corruptions found, 3 leaks found (and no corruptions)
`;

export interface CheckArgs {
  path: string;
  repair: RepairMode | undefined;
  json: boolean;
  progress: boolean;
  quiet: boolean;
  forceShare: boolean;
}

/** Parse the command line; throws on a malformed one. */
export function parseCheckArgs(argv: string[]): CheckArgs | 'help' {
  const { flags, positional } = parseArgs(argv, ['-f', '-r', '--output'], ['-p', '-q', ...FORCE_SHARE_FLAGS, '-h', '--help']);
  if (flags.has('-h') || flags.has('--help')) return 'help';
  const format = flags.get('-f') ?? 'qcow2';
  if (format !== 'qcow2') throw new Error(`only qcow2 images can be checked (got -f ${format})`);
  const output = flags.get('--output') ?? 'human';
  if (output !== 'human' && output !== 'json') throw new Error(`--output must be human or json, got '${output}'`);
  const repair = flags.get('-r');
  if (repair !== undefined && repair !== 'leaks' && repair !== 'all') throw new Error(`invalid -r argument '${repair}' (leaks or all)`);
  if (positional.length !== 1) throw new Error('expected one FILENAME');
  return { path: positional[0], repair, json: output === 'json', progress: flags.has('-p'), quiet: flags.has('-q'), forceShare: forceShareOf(flags) };
}

/** qemu-img's human report (dump_human_image_check). */
export function formatCheckHuman(result: CheckResult): string {
  const out: string[] = [];
  const corruptions = result.corruptions ?? 0;
  const leaks = result.leaks ?? 0;
  const checkErrors = result['check-errors'];
  if (corruptions === 0 && leaks === 0 && checkErrors === 0) {
    out.push('No errors were found on the image.\n');
  } else {
    if (corruptions !== 0) out.push(`\n${corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`);
    if (leaks !== 0) out.push(`\n${leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`);
    if (checkErrors !== 0) out.push(`\n${checkErrors} internal errors have occurred during the check.\n`);
  }
  const total = result['total-clusters'] ?? 0;
  const allocated = result['allocated-clusters'] ?? 0;
  if (total !== 0 && allocated !== 0) {
    const pct = (n: number, d: number): string => ((n * 100) / d).toFixed(2);
    out.push(`${allocated}/${total} = ${pct(allocated, total)}% allocated, ${pct(result['fragmented-clusters'] ?? 0, allocated)}% fragmented, `
      + `${pct(result['compressed-clusters'] ?? 0, allocated)}% compressed clusters\n`);
  }
  if (result['image-end-offset'] !== undefined) out.push(`Image end offset: ${result['image-end-offset']}\n`);
  return out.join('');
}

/** The banner qemu-img prints before re-checking a repaired image. */
export function formatRepairedBanner(result: CheckResult): string {
  return 'The following inconsistencies were found and repaired:\n\n'
    + `    ${result['leaks-fixed'] ?? 0} leaked clusters\n    ${result['corruptions-fixed'] ?? 0} corruptions\n\n`
    + 'Double checking the fixed image now...\n';
}

/** qemu-img's exit status for a report. */
export function checkExitCode(result: CheckResult): number {
  if (result['check-errors'] !== 0) return 1;
  if ((result.corruptions ?? 0) !== 0) return 2;
  return (result.leaks ?? 0) !== 0 ? 3 : 0;
}

export async function run(argv: string[]): Promise<number> {
  let args: CheckArgs;
  try {
    const parsed = parseCheckArgs(argv);
    if (parsed === 'help') {
      process.stdout.write(USAGE);
      return 0;
    }
    args = parsed;
  } catch (err) {
    process.stderr.write(`qcow2fuse check: ${commandError(err)}\n${USAGE}`);
    return 1;
  }
  let image: Qcow2Image;
  try {
    warnIfForceShared('check', args.path, args.forceShare);
    image = await Qcow2Image.open(args.path, { readOnly: args.repair === undefined, check: true, forceShare: args.forceShare });
  } catch (err) {
    process.stderr.write(`qcow2fuse check: Could not open '${args.path}': ${commandError(err)}\n`);
    return 1;
  }
  try {
    let result: CheckResult;
    try {
      result = await checkImage(image, {
        repair: args.repair,
        onMessage: (line) => process.stderr.write(`${line}\n`),
        onProgress: args.progress ? (done, total) => process.stderr.write(progressText(total > 0 ? done / total : 1)) : undefined,
      });
    } catch (err) {
      if (args.progress) process.stderr.write('\n');
      const reason = err instanceof CheckFailedError ? err.reason : commandError(err);
      process.stderr.write(`qcow2fuse check: Check failed: ${reason}\n`);
      return 1;
    }
    if (args.progress) process.stderr.write(`${progressText(1)}\n`);
    if (!args.quiet) {
      const fixed = (result['leaks-fixed'] ?? 0) + (result['corruptions-fixed'] ?? 0) > 0;
      if (args.json) await writeOut(qemuJson(result));
      else await writeOut(`${fixed ? formatRepairedBanner(result) : ''}${formatCheckHuman(result)}`);
    }
    const code = checkExitCode(result);
    if (code === 1) process.stderr.write('qcow2fuse check: Check failed\n');
    return code;
  } finally {
    await image.close();
  }
}
