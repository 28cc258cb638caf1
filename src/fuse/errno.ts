/**
 * The one place where errors become FUSE errnos (DESIGN §9: only the FUSE layer does this).
 *
 * Every error qcow2fuse raises carries a stable `code` that is an errno name (EIO, ENOSPC, EROFS,
 * ERANGE, EINVAL …) or one of our own: 'ECORRUPT' (the image is corrupt → EIO) and 'ELOCKED' (the
 * image is locked by another process → EBUSY). Node's system errors carry the errno name in `code`
 * too. Node's numeric `err.errno` is already negative and platform-specific in meaning, so it is never
 * used: the number always comes from `os.constants.errno[code]`.
 */
import { constants } from 'node:os';
import { CodedError } from '../io/errors.js';

const ERRNO = constants.errno as Readonly<Record<string, number>>;

/** Our codes that are not errno names, and the errno each one answers as. */
const OWN_CODES: Readonly<Record<string, string>> = {
  ECORRUPT: 'EIO',
  ELOCKED: 'EBUSY',
};

/** The positive errno number for an errno name, or undefined when the name is not one. */
export function errnoNumber(name: string): number | undefined {
  const value = ERRNO[OWN_CODES[name] ?? name];
  return typeof value === 'number' && value > 0 ? value : undefined;
}

/** The errno name an error answers as: its `code` when that is an errno (or one of ours), else EIO. */
export function errnoName(err: unknown): string {
  const code = typeof err === 'object' && err !== null ? (err as { code?: unknown }).code : undefined;
  if (typeof code !== 'string') return 'EIO';
  const mapped = OWN_CODES[code] ?? code;
  return errnoNumber(mapped) === undefined ? 'EIO' : mapped;
}

/** The negative errno FUSE expects for any thrown value (unknown errors answer -EIO). */
export function toFuseErrno(err: unknown): number {
  return -(errnoNumber(errnoName(err)) as number);
}

/** A coded error for a FUSE-level refusal (ENOENT, EACCES, EROFS, EFBIG …). */
export function fsError(code: string, message: string, details: Record<string, unknown> = {}): CodedError {
  return new CodedError(code, message, details);
}
