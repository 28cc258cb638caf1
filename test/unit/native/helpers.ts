/** Helpers shared by the native addon's tests: a directory accepting O_DIRECT, error codes. */
import { mkdtempSync } from 'node:fs';
import { join } from 'node:path';

import { expect } from 'vitest';

import { tempBase } from '../../helpers/tmp.js';

export const MiB = 1024 * 1024;

/**
 * A new directory on a filesystem that accepts O_DIRECT (tmpfs may refuse it), under the test run's
 * temp base (test/helpers/tmp.ts picks an O_DIRECT-capable one); the caller removes it.
 */
export function makeDirectIoDir(): string {
  return mkdtempSync(join(tempBase(), 'qcow2fuse-native-'));
}

export function expectCode(error: unknown, code: string): void {
  expect(error).toBeInstanceOf(Error);
  expect((error as { code?: unknown }).code).toBe(code);
}
