/**
 * In-flight tracking (DESIGN §4): guest clusters being allocated or re-linked are marked busy so a
 * concurrent write to the same cluster waits and never allocates it twice; host ranges with data I/O
 * in flight are tracked so a cluster is never freed (and reused) under a running read or write.
 */

export interface InflightRange {
  start: number;
  end: number;
}

/** A guest cluster's in-flight state: exclusive (being allocated/linked) or shared direct writers. */
interface GuestBusy {
  exclusive: boolean;
  count: number;
  done: Promise<void>;
  resolve: () => void;
}

export class InflightTracker {
  private readonly hostInflight = new Set<InflightRange>();
  private readonly hostIdleWaiters: (() => void)[] = [];
  private readonly guestBusy = new Map<number, GuestBusy>();

  addHost(start: number, bytes: number): InflightRange {
    const range = { start, end: start + bytes };
    this.hostInflight.add(range);
    return range;
  }

  removeHost(range: InflightRange): void {
    this.hostInflight.delete(range);
    const waiters = this.hostIdleWaiters.splice(0);
    for (const w of waiters) w();
  }

  /** Resolve once no in-flight data I/O touches [hostOffset, +bytes) of the image file. */
  async waitHostIdle(hostOffset: number, bytes: number): Promise<void> {
    const end = hostOffset + bytes;
    for (;;) {
      let busy = false;
      for (const r of this.hostInflight) if (r.start < end && r.end > hostOffset) { busy = true; break; }
      if (!busy) return;
      await new Promise<void>((resolve) => this.hostIdleWaiters.push(resolve));
    }
  }

  markGuestBusy(firstCluster: number, nbClusters: number, exclusive: boolean): void {
    for (let c = firstCluster; c < firstCluster + nbClusters; c++) {
      const existing = this.guestBusy.get(c);
      if (existing) {
        existing.count++;
        continue;
      }
      let resolve!: () => void;
      const done = new Promise<void>((r) => { resolve = r; });
      this.guestBusy.set(c, { exclusive, count: 1, done, resolve });
    }
  }

  clearGuestBusy(firstCluster: number, nbClusters: number): void {
    for (let c = firstCluster; c < firstCluster + nbClusters; c++) {
      const b = this.guestBusy.get(c);
      if (!b) continue;
      if (--b.count === 0) {
        this.guestBusy.delete(c);
        b.resolve();
      }
    }
  }

  isGuestBusy(clusterIndex: number, exclusive: boolean): boolean {
    const b = this.guestBusy.get(clusterIndex);
    if (!b) return false;
    return exclusive || b.exclusive;
  }

  /** Settles when guest cluster `clusterIndex` is no longer in flight; undefined when it is not. */
  guestDone(clusterIndex: number): Promise<void> | undefined {
    return this.guestBusy.get(clusterIndex)?.done;
  }

  /** Settles when some guest cluster in flight is done; undefined when none is in flight. */
  anyGuestDone(): Promise<void> | undefined {
    const busy = this.guestBusy.values().next();
    return busy.done ? undefined : busy.value.done;
  }
}
