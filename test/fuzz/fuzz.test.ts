/**
 * The fuzz harness under vitest: FUZZ_CASES mutated images (default 300, about 25 s on 2 cores),
 * each opened, read, written a little and checked in a worker process with a 2 s limit per case.
 * No case may crash, hang, throw an error that is not one of our coded errors, leave an unhandled
 * rejection, or change a file it opened read-only or was refused writable access to.
 *
 * Workers run from dist/ (`npm run build`; npm test builds first). Longer campaigns:
 *   FUZZ_CASES=10000 npx vitest run test/fuzz        or   node dist/test/fuzz/run.js --cases 10000
 * A failure prints its case index and FUZZ_SEED; `node dist/test/fuzz/run.js --seed S --case N`
 * re-runs it, keeping the mutated image in the run directory's failures/.
 */
import { readdir, stat } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { seedFromEnv } from '../helpers/patterns.js';
import { tempDir } from '../helpers/tmp.js';
import { requireTools } from '../helpers/tools.js';
import { runFuzz, type FuzzFailure } from './runner.js';

const hasQemu = requireTools('qemu-img', 'qemu-io');
const CASES = Number(process.env.FUZZ_CASES ?? '300');
const root = fileURLToPath(new URL('../../', import.meta.url));

/** Throws unless every module the workers run has a build at least as new as its source. */
async function checkBuild(): Promise<void> {
  for (const dir of ['src/qcow2', 'src/io', 'test/fuzz']) {
    for (const name of await readdir(`${root}${dir}`)) {
      if (!name.endsWith('.ts') || name.endsWith('.test.ts')) continue;
      const build = `${root}dist/${dir}/${name.replace(/\.ts$/, '.js')}`;
      const built = await stat(build).catch(() => undefined);
      if (built === undefined || built.mtimeMs < (await stat(`${root}${dir}/${name}`)).mtimeMs) {
        throw new Error(`${build} is missing or older than ${dir}/${name}: run \`npm run build\` first (npm test does)`);
      }
    }
  }
}

function summary(f: FuzzFailure): string {
  return `case ${f.caseIndex} (${f.seedImage}, ${f.kind}): ${f.mutations.join('; ')}\n${f.details.join('\n').split('\n').slice(0, 8).join('\n')}`;
}

describe.skipIf(!hasQemu)('fuzz', () => {
  it(`${CASES} mutated images: no crash, hang, uncoded error or write to a refused image`, async () => {
    await checkBuild();
    const seed = seedFromEnv('FUZZ_SEED');
    const report = await runFuzz({ cases: CASES, seed, workDir: await tempDir('fuzz') });
    expect(report.cases).toBe(CASES);
    expect(report.failures.map(summary)).toEqual([]);
  }, 120_000 + CASES * 1000);
});
