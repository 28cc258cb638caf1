/**
 * A HostFile that forwards to a journaled FaultyHostFile and cuts its power just before the
 * `cutAt`-th pwrite or fdatasync (counted from 1 across everything written through it; 0 = never).
 *
 * The cut begins the moment that I/O is attempted: `cut` is set before the survivor is known, because
 * I/O racing with the cut (background writes, a second handle on the same switch) fails with "device
 * lost power" while the survivor is still being made. A test that catches an error asks `cut`: set
 * means the power went, and `await cut` gives the surviving file.
 */
import { HostIoError } from '../../src/io/errors.js';
import type { FaultyHostFile } from '../../src/io/faulty-host-file.js';
import { ForwardingHostFile, type WritePoint } from '../../src/io/host-file.js';
import type { MemoryHostFile } from '../../src/io/memory-host-file.js';

export class PowerSwitch extends ForwardingHostFile {
  events = 0;
  cut: Promise<MemoryHostFile> | undefined;

  /** `shared`: several handles of one image use this switch; closing a handle leaves the file open. */
  constructor(readonly faulty: FaultyHostFile, private readonly cutAt: number, private readonly shared = false) { super(faulty); }

  private async event(operation: string): Promise<void> {
    if (++this.events !== this.cutAt) return;
    this.cut = this.faulty.powerCut();
    await this.cut;
    throw new HostIoError('EIO', this.path, operation, undefined, 'power cut');
  }

  override async pwrite(buf: Uint8Array, hostOffset: number, point?: WritePoint): Promise<void> {
    await this.event('pwrite');
    await this.faulty.pwrite(buf, hostOffset, point);
  }
  override async fdatasync(): Promise<void> {
    await this.event('fdatasync');
    await this.faulty.fdatasync();
  }
  override close(): Promise<void> { return this.shared ? Promise.resolve() : this.faulty.close(); }
}
