/**
 * SizeTrackingFile: the image file as the driver sees it (its size, the highest byte written).
 */
import { ForwardingHostFile, type HostFile, type WritePoint } from '../../io/host-file.js';

/**
 * The image file as the driver sees it: forwards to the real HostFile and keeps its size (for
 * "past the end of the file" checks) and the highest byte ever written (for known-zero clusters).
 */
export class SizeTrackingFile extends ForwardingHostFile {
  sizeBytes: number;
  /** The file's size when the image was opened. */
  readonly openedBytes: number;
  onWrite: (endBytes: number) => void = () => undefined;

  constructor(inner: HostFile, sizeBytes: number) {
    super(inner);
    this.sizeBytes = sizeBytes;
    this.openedBytes = sizeBytes;
  }

  override async pwrite(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<void> {
    this.onWrite(hostOffset + buf.length);
    await this.inner.pwrite(buf, hostOffset, point);
    this.noteWrite(hostOffset + buf.length);
  }

  /** Record a write that reached the file through another handle. */
  noteWrite(endBytes: number): void {
    this.onWrite(endBytes);
    this.sizeBytes = Math.max(this.sizeBytes, endBytes);
  }

  override async size(): Promise<number> {
    this.sizeBytes = await this.inner.size();
    return this.sizeBytes;
  }

  override async truncate(bytes: number): Promise<void> {
    await this.inner.truncate(bytes);
    this.sizeBytes = bytes;
  }

  override async zeroRange(offset: number, length: number, keepSize?: boolean): Promise<boolean> {
    const ok = await this.inner.zeroRange(offset, length, keepSize);
    if (ok && !keepSize) this.sizeBytes = Math.max(this.sizeBytes, offset + length);
    return ok;
  }

  override async allocate(offset: number, length: number, keepSize?: boolean): Promise<boolean> {
    const ok = await this.inner.allocate(offset, length, keepSize);
    if (ok && !keepSize) this.sizeBytes = Math.max(this.sizeBytes, offset + length);
    return ok;
  }
}
