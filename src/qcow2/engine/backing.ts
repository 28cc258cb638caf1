/**
 * Backing files: what an image reads where it has no data of its own. A backing file is a qcow2 image
 * (opened read-only, recursively) or a raw file; relative names resolve against the directory of the
 * image that names them; reads past the end of a shorter backing file return zeros. The chain depth
 * is limited and loops are refused.
 */
import { dirname, isAbsolute, resolve } from 'node:path';
import type { HostFile, HostFileOpener } from '../../io/host-file.js';
import { MAX_BACKING_DEPTH, QCOW2_MAGIC } from '../format/constants.js';
import { CodedError, Qcow2FormatError, Qcow2UnsupportedError } from '../format/errors.js';

/** The read side of any image in a chain. */
export interface BackingReader {
  readonly virtualSize: number;
  readonly path: string;
  readonly format: 'qcow2' | 'raw';
  /** Fill `buf` with guest bytes at `guestOffset`; bytes past the virtual size read as zeros. */
  readInto(guestOffset: number, buf: Buffer): Promise<void>;
  close(): Promise<void>;
}

/** A raw file as a backing image. */
export class RawBacking implements BackingReader {
  readonly format = 'raw' as const;
  readonly path: string;
  readonly virtualSize: number;
  private readonly file: HostFile;

  private constructor(file: HostFile, virtualSize: number) {
    this.file = file;
    this.path = file.path;
    this.virtualSize = virtualSize;
  }

  static async open(file: HostFile): Promise<RawBacking> {
    return new RawBacking(file, await file.size());
  }

  async readInto(guestOffset: number, buf: Buffer): Promise<void> {
    const inside = Math.max(0, Math.min(buf.length, this.virtualSize - guestOffset));
    let n = 0;
    if (inside > 0) n = await this.file.pread(buf.subarray(0, inside), guestOffset, 'data');
    if (n < buf.length) buf.fill(0, n);
  }

  close(): Promise<void> {
    return this.file.close();
  }
}

/** Where the backing file named by `image` lives. */
export function resolveBackingPath(imagePath: string, backingName: string): string {
  return isAbsolute(backingName) ? backingName : resolve(dirname(imagePath), backingName);
}

export interface BackingOpenContext {
  opener: HostFileOpener;
  /** Resolved paths of the images above, for loop detection (the child first). */
  chain: string[];
  /** Open the backing file sharing every permission (the top image was opened with force-share). */
  forceShare?: boolean;
  /** Opens a qcow2 image read-only as a BackingReader (provided by image.ts to avoid a cycle). */
  openQcow2: (path: string, file: HostFile, chain: string[]) => Promise<BackingReader>;
}

/**
 * Open the backing file `name` of `imagePath` with format `format` (probed from the magic when absent).
 */
export async function openBacking(imagePath: string, name: string, format: string | undefined, ctx: BackingOpenContext): Promise<BackingReader> {
  const path = resolveBackingPath(imagePath, name);
  if (ctx.chain.includes(path)) {
    throw new Qcow2FormatError('EBACKINGLOOP', `backing chain loops back to ${path}`, { image: imagePath, structure: 'header', field: 'backing_file', value: name });
  }
  if (ctx.chain.length >= MAX_BACKING_DEPTH) {
    throw new Qcow2FormatError('EBACKINGDEPTH', `backing chain deeper than ${MAX_BACKING_DEPTH}`, { image: imagePath, structure: 'header', field: 'backing_file', value: name });
  }
  if (format !== undefined && format !== 'qcow2' && format !== 'raw') {
    throw new Qcow2UnsupportedError('EUNSUPPORTED', `backing file format '${format}' is not supported (qcow2 and raw are)`, { image: imagePath, structure: 'header', field: 'backing_format', value: format });
  }
  let file: HostFile;
  try {
    file = await ctx.opener(path, { readOnly: true, lock: true, forceShare: ctx.forceShare });
  } catch (err) {
    // Name the image that wants it: the opener's error names only the backing file.
    const message = err instanceof Error ? err.message : String(err);
    throw new CodedError(err instanceof CodedError ? err.code : 'EIO', `${imagePath}: cannot open backing file ${path}: ${message}`, { image: imagePath, backing: path }, { cause: err });
  }
  try {
    let actual = format;
    if (actual === undefined) {
      const magic = Buffer.alloc(4);
      const n = await file.pread(magic, 0);
      actual = n === 4 && magic.readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
    }
    if (actual === 'raw') return await RawBacking.open(file);
    return await ctx.openQcow2(path, file, [...ctx.chain, path]);
  } catch (err) {
    await file.close();
    throw err;
  }
}
