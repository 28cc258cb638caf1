/**
 * Per-file vitest setup (vitest.config.ts `setupFiles`): after each test, remove its temp dirs;
 * after each file, unmount whatever the file left mounted and remove its temp dirs. A mount that had
 * to be torn down here is a leak in the test and fails the file, after the cleanup.
 */
import { afterAll, afterEach } from 'vitest';
import { unmountRegistered } from './mount.js';
import { cleanupAllTempDirs, cleanupTestTempDirs } from './tmp.js';

function failOnLeaks(where: string, leaked: string[]): void {
  if (leaked.length > 0) throw new Error(`${where}: mounts left behind (now unmounted): ${leaked.join(', ')}`);
}

afterEach(async () => {
  failOnLeaks('after test', await cleanupTestTempDirs());
});

afterAll(async () => {
  const leaked = [...await unmountRegistered(), ...await cleanupAllTempDirs()];
  failOnLeaks('after file', leaked);
});
