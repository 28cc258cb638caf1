import { CodedError } from '../../io/errors.js';

export { CodedError };

/** Context every qcow2 error carries where known. */
export interface Qcow2ErrorContext {
  /** Image path. */
  image: string;
  /** On-disk structure: 'header', 'l1', 'l2', 'reftable', 'refblock', 'snapshot-table', 'compressed', … */
  structure?: string;
  /** Host offset of the structure or entry. */
  hostOffset?: number;
  /** Index of the entry inside its table. */
  index?: number;
  /** Raw entry value (as a bigint, or hex string). */
  rawEntry?: bigint | string;
  /** Header field name for validation failures. */
  field?: string;
  value?: unknown;
}

/** The file is not a valid qcow2 image (bad magic, bad field): refused at open. */
export class Qcow2FormatError extends CodedError {
  constructor(code: string, message: string, context: Qcow2ErrorContext) {
    super(code, `${context.image}: ${message}`, { ...context });
  }
}

/** The image uses a feature we do not implement (encryption, unknown incompatible bit …). */
export class Qcow2UnsupportedError extends CodedError {
  constructor(code: string, message: string, context: Qcow2ErrorContext) {
    super(code, `${context.image}: ${message}`, { ...context });
  }
}

/** Metadata is inconsistent (raised through signalCorruption only). */
export class Qcow2CorruptError extends CodedError {
  readonly fatal: boolean;
  constructor(message: string, context: Qcow2ErrorContext, fatal: boolean) {
    super('ECORRUPT', `${context.image}: corrupt image: ${message}`, { ...context });
    this.fatal = fatal;
  }
}

/** A write was attempted on a read-only image (opened read-only or dropped after corruption). */
export class Qcow2ReadOnlyError extends CodedError {
  constructor(image: string, why: string) {
    super('EROFS', `${image}: image is read-only (${why})`, { image });
  }
}

/** A request outside the virtual disk or otherwise malformed. */
export class Qcow2RangeError extends CodedError {
  constructor(image: string, message: string, details: Record<string, unknown> = {}) {
    super('ERANGE', `${image}: ${message}`, { image, ...details });
  }
}

/** A request that is well-formed but not possible (e.g. shrinking over allocated data without --shrink). */
export class Qcow2InvalidError extends CodedError {
  constructor(image: string, message: string, details: Record<string, unknown> = {}) {
    super('EINVAL', `${image}: ${message}`, { image, ...details });
  }
}
