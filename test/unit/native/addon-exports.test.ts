/**
 * The addon's exports against what this build needs (src/io/native.ts): the built addon has every
 * one, and an addon built from older sources (a function missing) is named as out of date instead
 * of failing later with "x is not a function" deep inside a read.
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

import { describe, expect, it } from 'vitest';

import { missingAddonExports } from '../../../src/io/native.js';

const ADDON = fileURLToPath(new URL('../../../native/build/Release/qcow2fuse_native.node', import.meta.url));

describe('native addon exports', () => {
  it('the built addon has every export this build uses', () => {
    const loaded = createRequire(import.meta.url)(ADDON) as object;
    expect(missingAddonExports(loaded)).toEqual([]);
  });

  it('an addon from older sources is reported with what it lacks', () => {
    const loaded = { ...(createRequire(import.meta.url)(ADDON) as Record<string, unknown>) };
    delete loaded.decompressBatch;
    delete loaded.threadIoCreate;
    expect(missingAddonExports(loaded).sort()).toEqual(['decompressBatch', 'threadIoCreate']);
    expect(missingAddonExports({})).toContain('replyData');
  });
});
