/**
 * A FIFO async mutex: the image's metadata lock (QEMU's s->lock). Every await inside a critical
 * section is still an interleaving point for code that does not take the lock (data I/O).
 */
export class AsyncLock {
  private tail: Promise<void> = Promise.resolve();
  private held = false;

  get isHeld(): boolean {
    return this.held;
  }

  /** Run `fn` with the lock held; the lock is released when it settles. */
  async run<T>(fn: () => Promise<T>): Promise<T> {
    const previous = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((resolve) => { release = resolve; });
    await previous;
    this.held = true;
    try {
      return await fn();
    } finally {
      this.held = false;
      release();
    }
  }
}
