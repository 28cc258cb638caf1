/**
 * `-U` / `--force-share` on the reading commands (info, map, check, convert, snapshot -l, bench):
 * read an image another process may be writing, as qemu-img does with the same flags. Without it a
 * reader takes QEMU's reader locks: it is refused while a writer holds the image and keeps new
 * writers out while it reads (src/io/locks.ts).
 *
 * qemu-img reads a force-shared image without a word; we say so on stderr when another process
 * actually holds the write permission, because what is read from an image under a writer may be
 * stale or inconsistent (tables it has not written back yet).
 */
import { probeQemuLocks } from '../io/locks.js';
import { trace } from './output.js';

/** The boolean flags that ask for force-share, as parseArgs takes them. */
export const FORCE_SHARE_FLAGS: readonly string[] = ['-U', '--force-share'];

/** The usage line fragment for the flag. */
export const FORCE_SHARE_USAGE = '  -U, --force-share  read even while another process writes the image (QEMU\'s force-share)';

/** True when the parsed flags ask for force-share. */
export function forceShareOf(flags: ReadonlyMap<string, string>): boolean {
  return FORCE_SHARE_FLAGS.some((flag) => flags.has(flag));
}

/** The warning line for reading `path` while another process writes it (undefined when nobody writes it). */
export function forceShareWarning(path: string): string | undefined {
  let writing: boolean;
  try {
    writing = probeQemuLocks(path).held.includes('write');
  } catch (err) {
    trace('force-share: cannot probe the locks of %s: %o', path, err);
    return undefined;
  }
  return writing
    ? `warning: ${path} is open for writing in another process; reading it anyway (force-share): what is read may be stale or inconsistent`
    : undefined;
}

/** Print the force-share warning for `path` on stderr, prefixed with the command's name, when it applies. */
export function warnIfForceShared(command: string, path: string, forceShare: boolean): void {
  if (!forceShare) return;
  const warning = forceShareWarning(path);
  if (warning !== undefined) process.stderr.write(`qcow2fuse ${command}: ${warning}\n`);
}
