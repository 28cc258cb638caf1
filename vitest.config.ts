// vitest: TypeScript tests under test/, run from source. Integration tests mount FUSE and run
// qemu-img, so tests get 120 s, run in forked processes (a FUSE daemon in a worker must not share
// a thread with other files), and at most two files run at once (2-core machines, mount load).
// Long runs (benchmarks, *.long.test.ts fuzz campaigns) are excluded unless QCOW2FUSE_LONG=1.
import { defineConfig } from 'vitest/config';

const long = process.env.QCOW2FUSE_LONG === '1';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    exclude: ['**/node_modules/**', 'dist/**', 'test/bench/**', ...(long ? [] : ['test/**/*.long.test.ts'])],
    pool: 'forks',
    maxWorkers: 2,
    testTimeout: 120_000,
    hookTimeout: 120_000,
    teardownTimeout: 60_000,
    globalSetup: ['test/helpers/global-setup.ts'],
    setupFiles: ['test/helpers/setup.ts'],
    reporters: process.env.CI === 'true' ? ['verbose'] : ['default'],
  },
});
