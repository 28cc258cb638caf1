/**
 * Base of every error qcow2fuse raises. `code` is stable (tests and the FUSE errno mapping key on it);
 * `details` carries the structured context (image path, structure, offset …).
 */
export class CodedError extends Error {
  readonly code: string;
  readonly details: Record<string, unknown>;

  constructor(code: string, message: string, details: Record<string, unknown> = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
    this.details = details;
  }
}

/** The image is locked by another process (QEMU-compatible locks or our flock). */
export class LockError extends CodedError {
  constructor(path: string, message: string, details: Record<string, unknown> = {}) {
    super('ELOCKED', `${path}: ${message}`, { path, ...details });
  }
}

/** A host I/O failure; `code` is the errno name (EIO, ENOSPC …) so the FUSE layer maps it directly. */
export class HostIoError extends CodedError {
  constructor(errnoCode: string, path: string, operation: string, hostOffset: number | undefined, message?: string) {
    super(errnoCode, `${path}: ${operation}${hostOffset === undefined ? '' : ` at host offset ${hostOffset}`} failed: ${message ?? errnoCode}`,
      { path, operation, hostOffset });
  }
}
