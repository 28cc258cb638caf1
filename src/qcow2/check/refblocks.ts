/**
 * The refcount block pass (QEMU's check_refblocks): count the refcount blocks, flag bad refcount table
 * entries, and with -r all grow the file over a block that lies past its end.
 */
import { readU64, toSafeNumber } from '../format/safe-int.js';
import { nextNonZeroEntry } from '../format/table-scan.js';
import type { CheckContext } from './context.js';
import type { CheckCounters, FixMode } from './counters.js';
import { ERRNO_TEXT } from './repair.js';

/** How far past its end the repair extends the file for a refcount block (QEMU: any distance). */
const MAX_REFBLOCK_GROWTH_BYTES = 64 * 1024 * 1024;

/** QEMU's check_refblocks: count the refcount blocks, flag bad reftable entries. */
export async function checkRefblocks(c: CheckContext, res: CheckCounters, fix: FixMode, rebuild: { needed: boolean }): Promise<void> {
  const cs = c.clusterSize;
  const refcounts = c.image.refcounts;
  const table = await c.read(refcounts.reftableOffset, refcounts.reftableClusters * cs);
  const entries = table.length / 8;
  for (let i = nextNonZeroEntry(table, 0, 8, entries); i < entries; i = nextNonZeroEntry(table, i + 1, 8, entries)) {
    const raw = readU64(table, i * 8);
    const offsetRaw = raw & ~0x1ffn;
    if ((raw & 0x1ffn) !== 0n) {
      if (c.verbose) c.log(`ERROR refcount table entry ${i} has reserved bits set`);
      res.corruptions++;
      rebuild.needed = true;
      continue;
    }
    if (offsetRaw % BigInt(cs) !== 0n) {
      if (c.verbose) c.log(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      res.corruptions++;
      rebuild.needed = true;
      continue;
    }
    const cluster = offsetRaw / BigInt(cs);
    if (cluster >= BigInt(c.refs.size)) {
      res.corruptions++;
      if (c.verbose) c.log(`${fix.errors ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
      if (fix.errors) {
        const failure = await growFileForRefblock(c, res, offsetRaw);
        if (failure === undefined) continue;
        rebuild.needed = true;
        if (c.verbose) c.log(`ERROR could not resize image: ${failure}`);
      }
      continue;
    }
    const offset = Number(offsetRaw);
    if (offset !== 0) {
      c.incRefcounts(res, offset, cs);
      const refcount = c.refs.get(Number(cluster));
      if (refcount !== 1) {
        if (c.verbose) c.log(`ERROR refcount block ${i} refcount=${refcount}`);
        res.corruptions++;
        rebuild.needed = true;
      }
    }
  }
}

/**
 * Extend the file so a refcount block past its end lies inside (check_refblocks' repair); the
 * failure text, or undefined. Unlike QEMU, a block more than MAX_REFBLOCK_GROWTH_BYTES past the end
 * is not grown into (a hostile entry would make a huge sparse file): the rebuild handles it.
 */
export async function growFileForRefblock(c: CheckContext, res: CheckCounters, offsetRaw: bigint): Promise<string | undefined> {
  const cs = c.clusterSize;
  const end = toSafeNumber(offsetRaw + BigInt(cs));
  if (end === undefined || end > c.fileBytes + MAX_REFBLOCK_GROWTH_BYTES) return ERRNO_TEXT.EFBIG;
  try {
    await c.image.file.truncate(end);
    await c.refreshFileBytes();
  } catch (err) {
    return err instanceof Error ? err.message : String(err);
  }
  c.refs.resize(Math.ceil(c.fileBytes / cs));
  const cluster = Number(offsetRaw) / cs;
  if (cluster >= c.refs.size) return ERRNO_TEXT.EINVAL;
  res.corruptions--;
  res.corruptionsFixed++;
  c.incRefcounts(res, Number(offsetRaw), cs);
  return undefined;
}
