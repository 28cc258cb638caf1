/**
 * RangeQueue: host ranges freed and waiting to be punched (see ImageState.onClustersFreed).
 */
/** A set of disjoint [start, end) byte ranges. */
export class RangeQueue {
  private ranges: [number, number][] = [];

  add(start: number, end: number): void {
    this.ranges.push([start, end]);
  }

  /** Remove [start, end) from every range (splitting where needed). */
  remove(start: number, end: number): void {
    if (this.ranges.length === 0) return;
    const out: [number, number][] = [];
    for (const [a, b] of this.ranges) {
      if (b <= start || a >= end) { out.push([a, b]); continue; }
      if (a < start) out.push([a, start]);
      if (b > end) out.push([end, b]);
    }
    this.ranges = out;
  }

  /** All ranges, merged and sorted; the queue is emptied. */
  take(): [number, number][] {
    const sorted = this.ranges.sort((x, y) => x[0] - y[0]);
    this.ranges = [];
    const merged: [number, number][] = [];
    for (const [a, b] of sorted) {
      const last = merged[merged.length - 1];
      if (last && a <= last[1]) last[1] = Math.max(last[1], b);
      else merged.push([a, b]);
    }
    return merged;
  }
}
