/**
 * The corruption funnel (DESIGN §4): every inconsistency the engine meets in metadata goes through
 * signalCorruption, which throws a coded Qcow2CorruptError and, when the corruption is fatal on a
 * writable image, sets the corrupt bit once and drops the image to read-only (reads go on).
 */
import debugFactory from 'debug';
import type { HostFile } from '../../io/host-file.js';
import { INCOMPAT_CORRUPT } from '../format/constants.js';
import { Qcow2CorruptError } from '../format/errors.js';
import { HEADER_FIELD, withBit, type Qcow2Header } from '../format/header.js';

const trace = debugFactory('qcow2fuse:qcow2');

/** Where in the metadata the corruption was found. */
export interface CorruptionContext {
  structure: string;
  hostOffset?: number;
  index?: number;
  rawEntry?: string;
}

/** What the funnel needs of an open image (ImageState). */
export interface CorruptionTarget {
  readonly path: string;
  readonly readOnly: boolean;
  readonly file: HostFile;
  readonly header: Qcow2Header;
  /** The header as the file now holds it. */
  setHeader(header: Qcow2Header): void;
  /** Refuse writes from now on, giving `reason`. */
  dropToReadOnly(reason: string): void;
  /** Track host I/O nobody awaits (close waits for it). */
  inBackground(work: Promise<void>): void;
}

/**
 * Throw a coded Qcow2CorruptError; when fatal on a writable image, set the corrupt bit once (v3) and
 * drop to read-only.
 */
export function signalCorruption(target: CorruptionTarget, fatal: boolean, message: string, context: CorruptionContext): never {
  const error = new Qcow2CorruptError(message, { image: target.path, ...context }, fatal);
  if (fatal && !target.readOnly) {
    target.dropToReadOnly(`corruption: ${message}`);
    const incompatibleFeatures = withBit(target.header.incompatibleFeatures, INCOMPAT_CORRUPT, true);
    if (target.header.version === 3) {
      target.setHeader({ ...target.header, incompatibleFeatures });
      const bits = Buffer.alloc(8);
      bits.writeBigUInt64BE(incompatibleFeatures);
      const file = target.file;
      target.inBackground(file.pwrite(bits, HEADER_FIELD.incompatibleFeatures, 'header').then(() => file.fdatasync()).catch((err: unknown) => trace('could not set the corrupt bit: %o', err)));
    }
    process.emitWarning(`qcow2fuse: ${error.message}; image marked corrupt, now read-only`);
  }
  throw error;
}
