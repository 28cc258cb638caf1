/**
 * External tools and devices the tests depend on.
 *
 * Contract (DESIGN §7): under CI (`CI=true`) a missing tool fails the test run; elsewhere the caller
 * skips loudly:
 *
 *   const hasQemu = requireTool('qemu-img');
 *   it.skipIf(!hasQemu)('reads what qemu-img wrote', ...);
 *
 * A name containing '/' is a path that must exist (e.g. '/dev/fuse'); anything else is looked up in
 * PATH plus /usr/sbin and /sbin (mke2fs, e2fsck live there and are not always in a user's PATH).
 */
import { accessSync, constants, statSync } from 'node:fs';
import { delimiter, join } from 'node:path';

/** True when the run is a CI run, where skipping is not allowed. */
export function isCI(): boolean {
  const ci = process.env.CI;
  return ci === 'true' || ci === '1';
}

const searchDirs = (): string[] => {
  const dirs = (process.env.PATH ?? '').split(delimiter).filter((d) => d !== '');
  for (const extra of ['/usr/sbin', '/sbin', '/usr/bin', '/bin']) if (!dirs.includes(extra)) dirs.push(extra);
  return dirs;
};

const located = new Map<string, string | undefined>();

/** Absolute path of an executable (or the path itself for '/…' names), or undefined when absent. */
export function findTool(name: string): string | undefined {
  if (located.has(name)) return located.get(name);
  let found: string | undefined;
  if (name.includes('/')) {
    try {
      statSync(name);
      found = name;
    } catch {
      found = undefined;
    }
  } else {
    for (const dir of searchDirs()) {
      const candidate = join(dir, name);
      try {
        accessSync(candidate, constants.X_OK);
        if (statSync(candidate).isFile()) {
          found = candidate;
          break;
        }
      } catch {
        // not in this directory
      }
    }
  }
  located.set(name, found);
  return found;
}

/** Error thrown under CI when a required tool is absent. */
export class MissingToolError extends Error {
  constructor(readonly tool: string, reason: string) {
    super(`required tool missing: ${tool}${reason === '' ? '' : ` (${reason})`} — CI=true, so this fails instead of skipping`);
    this.name = 'MissingToolError';
  }
}

const warned = new Set<string>();

function missing(tool: string, reason: string): false {
  if (isCI()) throw new MissingToolError(tool, reason);
  if (!warned.has(tool)) {
    warned.add(tool);
    console.warn(`\n*** SKIPPING tests that need '${tool}'${reason === '' ? '' : ` (${reason})`}: not available on this machine.` +
      ' Run `bash scripts/bootstrap.sh` to install it; under CI=true this is a failure. ***\n');
  }
  return false;
}

/** True when `name` is available; otherwise throws under CI, or warns loudly and returns false. */
export function requireTool(name: string): boolean {
  return findTool(name) !== undefined || missing(name, '');
}

/** requireTool for several names; true only when all are present (each missing one is reported). */
export function requireTools(...names: string[]): boolean {
  return names.map((n) => requireTool(n)).every(Boolean);
}

/** The first available of several alternatives (e.g. fusermount3, fusermount), or undefined. */
export function findAnyTool(...names: string[]): string | undefined {
  for (const name of names) {
    const path = findTool(name);
    if (path !== undefined) return path;
  }
  return undefined;
}

/** requireTool for "any one of" alternatives, reported under the joined name. */
export function requireAnyTool(...names: string[]): boolean {
  return findAnyTool(...names) !== undefined || missing(names.join('|'), '');
}

/** Root privileges (FUSE mounts of other users' files, loop mounts, drop_caches). */
export function requireRoot(): boolean {
  return process.getuid?.() === 0 || missing('root', 'tests must run as root');
}

/** Everything a real FUSE mount needs: /dev/fuse, a fusermount, root. */
export function requireFuse(): boolean {
  return [requireTool('/dev/fuse'), requireAnyTool('fusermount3', 'fusermount'), requireRoot()].every(Boolean);
}
