/**
 * Errors of the copy engine: a stable `code` (the errno name of the failing I/O, or a convert code),
 * the side that failed (source or destination), its path and the guest offset reached.
 */
import { CodedError } from '../io/errors.js';

export type ConvertSide = 'source' | 'destination';

export class ConvertError extends CodedError {
  constructor(code: string, message: string, details: Record<string, unknown> = {}, options?: { cause?: unknown }) {
    super(code, message, details, options);
  }
}

/** The errno-style code of an error (EIO, ENOSPC …), or `fallback`. */
export function errorCode(error: unknown, fallback: string): string {
  const code = (error as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' ? code : fallback;
}

/**
 * Wrap a failure of one side's I/O at `guestOffset` into a ConvertError that says where it happened
 * (keeps the original code, so ENOSPC stays ENOSPC).
 */
export function sideError(side: ConvertSide, path: string, guestOffset: number, error: unknown): ConvertError {
  if (error instanceof ConvertError) return error;
  const message = error instanceof Error ? error.message : String(error);
  const verb = side === 'source' ? 'reading' : 'writing';
  return new ConvertError(errorCode(error, 'EIO'), `error while ${verb} ${path} at offset ${guestOffset}: ${message}`,
    { side, path, guestOffset }, { cause: error });
}
