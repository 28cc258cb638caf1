/**
 * Zero detection as qemu-img convert does it (`-S`): a window of source data is cut into granules
 * (the destination's cluster, or the -S size for raw outputs) at multiples of the granule in guest
 * offsets, and each granule is classified:
 *   data   written;
 *   skip   nothing to write: all zero on a destination that reads zeros, or (with -B) equal to the
 *          backing file's bytes;
 *   zero   must read as zeros but the destination would not (an existing target, -n; or a backing
 *          file with other data there): written as zeroes (a zero cluster in qcow2).
 * Zero and skip runs shorter than `minSparseBytes` between data are written as data, as qemu-img's
 * min_sparse asks; `minSparseBytes` 0 (-S 0) disables zero detection (everything is data).
 */
import { isZeroRange } from '../qcow2/engine/zeros.js';

export type RunKind = 'data' | 'zero' | 'skip';

/** [start, end) relative to the window, of one kind. */
export interface Run {
  kind: RunKind;
  start: number;
  end: number;
}

export interface ClassifyOptions {
  /** Granule size in bytes (a power of two). */
  granuleBytes: number;
  /** qemu-img's -S in bytes; 0 = no zero detection. */
  minSparseBytes: number;
  /** Whether unwritten destination ranges read as zeros (a new image without backing). */
  zeroInitialized: boolean;
  /** The backing file's bytes for the same window (-B), compared granule by granule. */
  backing?: Buffer;
}

function classifyGranule(data: Buffer, start: number, end: number, o: ClassifyOptions): RunKind {
  if (o.backing && o.backing.compare(data, start, end, start, end) === 0) return 'skip';
  if (o.minSparseBytes === 0 || !isZeroRange(data, start, end)) return 'data';
  if (o.backing) return isZeroRange(o.backing, start, end) ? 'skip' : 'zero';
  return o.zeroInitialized ? 'skip' : 'zero';
}

/** Classify `data` (the window at `guestOffset`) into merged runs. */
export function classifyWindow(data: Buffer, guestOffset: number, o: ClassifyOptions): Run[] {
  const runs: Run[] = [];
  let pos = 0;
  while (pos < data.length) {
    const end = Math.min(data.length, pos + o.granuleBytes - ((guestOffset + pos) % o.granuleBytes));
    const kind = classifyGranule(data, pos, end, o);
    const last = runs[runs.length - 1];
    if (last && last.kind === kind) last.end = end;
    else runs.push({ kind, start: pos, end });
    pos = end;
  }
  if (o.minSparseBytes <= o.granuleBytes) return runs;
  // Short gaps between data are not worth a hole: write them as data (qemu-img's min_sparse).
  const merged: Run[] = [];
  runs.forEach((run, i) => {
    const between = i > 0 && i < runs.length - 1;
    const kind = run.kind !== 'data' && between && run.end - run.start < o.minSparseBytes ? 'data' : run.kind;
    const last = merged[merged.length - 1];
    if (last && last.kind === kind) last.end = run.end;
    else merged.push({ kind, start: run.start, end: run.end });
  });
  return merged;
}
