/**
 * DropCacheFile: where O_DIRECT is refused, the compressed writer's buffered stand-in.
 */
import { ForwardingHostFile } from '../../io/host-file.js';
import type { WritePoint } from '../../io/host-file.js';

/** Buffered stand-in for an O_DIRECT handle: every write is followed by fadvise(DONTNEED). */
export class DropCacheFile extends ForwardingHostFile {
  override get direct(): boolean { return false; }

  override async pwrite(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<void> {
    await this.inner.pwrite(buf, hostOffset, point);
    await this.inner.fdatasync();
    await this.inner.dropCache(hostOffset, buf.length);
  }

  /** The wrapped handle is the image's own: closing this stand-in does not close it. */
  override close(): Promise<void> { return Promise.resolve(); }
}
