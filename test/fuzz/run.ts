/**
 * Run the fuzz harness from the command line (after `npm run build`):
 *
 *   node dist/test/fuzz/run.js --cases 10000 [--seed N] [--jobs N] [--timeout-ms 2000] [--dir DIR] [--case I,J]
 *
 * --timeout-ms bounds the CPU time a case may use (a hang); cases that wait are bounded at 30 s of wall time.
 *
 * Prints progress and a summary; exits 1 when a case failed (its image and description are kept in
 * DIR/failures/). `--case` re-runs chosen case indices of a run seed to reproduce a failure.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { runFuzz } from './runner.js';

function option(argv: string[], name: string): string | undefined {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : undefined;
}

async function main(argv: string[]): Promise<number> {
  const cases = Number(option(argv, '--cases') ?? '1000');
  const seed = Number(option(argv, '--seed') ?? String(Math.floor(Math.random() * 0x1_0000_0000)));
  const jobs = option(argv, '--jobs') !== undefined ? Number(option(argv, '--jobs')) : undefined;
  const timeoutMs = Number(option(argv, '--timeout-ms') ?? '2000');
  const only = option(argv, '--case')?.split(',').map(Number);
  const given = option(argv, '--dir');
  const dir = given ?? await mkdtemp(join(process.env.QCOW2FUSE_TEST_TMPDIR ?? '/var/tmp', 'qcow2fuse-fuzz-'));
  if (![cases, seed, timeoutMs].every(Number.isSafeInteger) || (jobs !== undefined && !Number.isSafeInteger(jobs))) {
    process.stderr.write('usage: node dist/test/fuzz/run.js --cases N [--seed N] [--jobs N] [--timeout-ms MS] [--dir DIR] [--case I,J]\n');
    return 2;
  }
  process.stderr.write(`fuzz: ${only?.length ?? cases} cases, seed ${seed}, dir ${dir}\n`);
  const started = Date.now();
  let lastPrint = 0;
  const report = await runFuzz({
    cases, seed, jobs, timeoutMs, workDir: dir, only,
    onProgress: (done, total, failures) => {
      if (Date.now() - lastPrint > 5000 || done === total) {
        lastPrint = Date.now();
        process.stderr.write(`fuzz: ${done}/${total} cases, ${failures} failures, ${((Date.now() - started) / 1000).toFixed(0)} s\n`);
      }
    },
  });
  for (const f of report.failures) {
    process.stdout.write(`FAIL case ${f.caseIndex} (${f.seedImage}, ${f.kind}): ${f.mutations.join('; ')}\n  ${f.details.join('\n  ').split('\n').slice(0, 12).join('\n  ')}\n  image: ${f.imagePath}\n`);
  }
  process.stdout.write(`fuzz: ${report.cases} cases, ${report.failures.length} failures (seed ${report.seed}; reproduce one with --seed ${report.seed} --case N)\n`);
  if (report.failures.length === 0 && given === undefined) await rm(dir, { recursive: true, force: true });
  return report.failures.length === 0 ? 0 : 1;
}

process.exitCode = await main(process.argv.slice(2));
