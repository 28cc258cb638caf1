/** Helpers shared by the native addon's tests: a directory accepting O_DIRECT, tool checks, error codes. */
import { spawnSync } from 'node:child_process';
import { closeSync, constants as fsConstants, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { expect } from 'vitest';

import { alignedBuffer } from '../../../src/io/native.js';

export const MiB = 1024 * 1024;

/** Under CI a missing tool fails the test; elsewhere the test is skipped with a loud warning. */
export function haveTool(name: string): boolean {
  const found = spawnSync('sh', ['-c', `command -v ${name}`]).status === 0;
  if (!found) {
    if (process.env.CI === 'true') {
      throw new Error(`required tool '${name}' is missing (CI=true: failing instead of skipping)`);
    }
    console.warn(`SKIPPING tests that need '${name}': not installed`);
  }
  return found;
}

/** A temp directory on a filesystem that accepts O_DIRECT (tmpfs may refuse it). */
export function makeDirectIoDir(): string {
  for (const base of ['/var/tmp', '/work', tmpdir()]) {
    let dir: string | undefined;
    try {
      dir = mkdtempSync(join(base, 'qcow2fuse-native-'));
      const probe = join(dir, 'probe');
      const fd = openSync(probe, fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_DIRECT, 0o644);
      try {
        writeSync(fd, alignedBuffer(4096, 4096), 0, 4096, 0);
      } finally {
        closeSync(fd);
      }
      return dir;
    } catch {
      if (dir !== undefined) {
        rmSync(dir, { recursive: true, force: true });
      }
    }
  }
  throw new Error('no directory supporting O_DIRECT found');
}

export function expectCode(error: unknown, code: string): void {
  expect(error).toBeInstanceOf(Error);
  expect((error as { code?: unknown }).code).toBe(code);
}
