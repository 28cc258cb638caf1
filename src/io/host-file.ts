/**
 * HostFile: the only view the qcow2 driver has of the file that holds an image.
 *
 * Offsets and lengths are byte counts in the host file (never guest offsets), always safe integers.
 * Implementations: node-host-file (real files, buffered or O_DIRECT), memory-host-file (tests,
 * examples), faulty-host-file (fault injection around another HostFile).
 */

/** Named points at which a faulty host file can inject an error (see faulty-host-file). */
export type WritePoint =
  | 'data'        // guest data written to a data cluster
  | 'l2'          // an L2 table (or slice) written back
  | 'l1'          // the L1 table
  | 'refblock'    // a refcount block
  | 'reftable'    // the refcount table
  | 'header'      // the image header and its extensions
  | 'snapshot'    // the snapshot table
  | 'compressed'  // a host cluster holding compressed chunks
  | 'zero'        // zeroing or preallocation of a range
  | 'other';

export type AioMode = 'threads' | 'native';

export interface HostFileOpenOptions {
  /** Open read-only (no write permission; reader locks). */
  readOnly: boolean;
  /** O_DIRECT for all I/O on this handle. */
  direct?: boolean;
  /**
   * Take locks: for write, an exclusive flock plus QEMU-compatible OFD locks; for read-only, QEMU's
   * reader locks (consistent read, sharing neither write nor resize: refused while a writer holds
   * the file, and keeping writers out). Default true.
   */
  lock?: boolean;
  /**
   * Read-only opens only: share every permission, as `qemu-img -U` (force-share) — read a file
   * another process writes, and keep no writer out. Default false.
   */
  forceShare?: boolean;
  /**
   * How a direct handle's reads and writes reach the kernel, as QEMU's `aio=`: 'native' (Linux AIO,
   * the whole queue at the device; the default) or 'threads' (our I/O thread pool, thread-io.ts).
   * Buffered handles always use the thread pool (AIO on them is synchronous).
   */
  aio?: AioMode;
  /** Create the file when it does not exist (mode 0644 before umask); never truncates. Ignored when readOnly. */
  create?: boolean;
}

export interface HostFile {
  /** Path it was opened with (for error messages). */
  readonly path: string;
  readonly readOnly: boolean;
  /** True when the handle was opened with O_DIRECT. */
  readonly direct: boolean;
  /** Required alignment in bytes for offsets, lengths and memory of O_DIRECT I/O (1 when not direct). */
  readonly dioAlignment: number;

  /**
   * Read up to `buf.length` bytes at `hostOffset` into `buf`; returns bytes read (short only at end of
   * file). Bytes past the end of file are left untouched by the implementation; callers zero them.
   */
  pread(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<number>;
  /** Write all of `buf` at `hostOffset` (extending the file as needed). `point` names the write for fault injection. */
  pwrite(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<void>;
  /** Make every completed write durable. */
  fdatasync(): Promise<void>;
  /** Current file size in bytes. */
  size(): Promise<number>;
  /** Set the file size. */
  truncate(bytes: number): Promise<void>;
  /**
   * Make [offset, offset+length) read as zeros, allocated (FALLOC_FL_ZERO_RANGE; may extend the file
   * unless keepSize). Returns false when the host cannot do it (caller falls back to writing zeros).
   */
  zeroRange(offset: number, length: number, keepSize?: boolean): Promise<boolean>;
  /** Deallocate [offset, offset+length) keeping the size (PUNCH_HOLE|KEEP_SIZE). False when unsupported. */
  punchHole(offset: number, length: number): Promise<boolean>;
  /** Reserve space (fallocate mode 0 or KEEP_SIZE). False when unsupported. */
  allocate(offset: number, length: number, keepSize?: boolean): Promise<boolean>;
  /** Tell the kernel the range will not be needed (POSIX_FADV_DONTNEED); no-op where meaningless. */
  dropCache(offset: number, length: number): Promise<void>;
  /** Release locks and close. Idempotent. */
  close(): Promise<void>;
}

/** A function that opens a host file by path (so the qcow2 layer can open backing and data files). */
export type HostFileOpener = (path: string, options: HostFileOpenOptions) => Promise<HostFile>;

/**
 * A HostFile that forwards every call to `inner`: the base of wrappers that change a few calls
 * (size tracking, cache dropping, fault injection and gates in tests) and inherit the rest.
 */
export class ForwardingHostFile implements HostFile {
  constructor(readonly inner: HostFile) {}

  get path(): string { return this.inner.path; }
  get readOnly(): boolean { return this.inner.readOnly; }
  get direct(): boolean { return this.inner.direct; }
  get dioAlignment(): number { return this.inner.dioAlignment; }
  pread(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<number> { return this.inner.pread(buf, hostOffset, point); }
  pwrite(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<void> { return this.inner.pwrite(buf, hostOffset, point); }
  fdatasync(): Promise<void> { return this.inner.fdatasync(); }
  size(): Promise<number> { return this.inner.size(); }
  truncate(bytes: number): Promise<void> { return this.inner.truncate(bytes); }
  zeroRange(offset: number, length: number, keepSize?: boolean): Promise<boolean> { return this.inner.zeroRange(offset, length, keepSize); }
  punchHole(offset: number, length: number): Promise<boolean> { return this.inner.punchHole(offset, length); }
  allocate(offset: number, length: number, keepSize?: boolean): Promise<boolean> { return this.inner.allocate(offset, length, keepSize); }
  dropCache(offset: number, length: number): Promise<void> { return this.inner.dropCache(offset, length); }
  close(): Promise<void> { return this.inner.close(); }
}
