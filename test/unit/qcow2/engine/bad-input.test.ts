/**
 * Hostile and damaged images (issue 3 acceptance): each one gives a clear, coded error — no crash, no
 * hang, no unbounded allocation — and the image file is left exactly as it was (sha256 before/after).
 * Images start as valid qemu-img images and are then damaged byte by byte.
 */
import { describe, expect, it } from 'vitest';
import { open, readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { run as convert } from '../../../../src/cli/commands/convert.js';
import { nodeHostAllocationProbe } from '../../../../src/io/host-allocation.js';
import { imageInfo } from '../../../../src/qcow2/tools/info.js';
import { mapEntries } from '../../../../src/qcow2/tools/map.js';
import { sha256File } from '../../../helpers/files.js';
import { qemuImg, qemuIoOk } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTools } from '../../../helpers/tools.js';
import { openImage } from '../../../../src/node.js';

const hasQemu = requireTools('qemu-img', 'qemu-io');

/** Each case must settle well within this (a hang fails the test instead of stalling the run). */
const CASE_TIMEOUT_MS = 15_000;

async function qemuImgOk(args: string[]): Promise<void> {
  const result = await qemuImg(args);
  if (result.code !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${result.stderr}`);
}

async function patch(path: string, offset: number, bytes: Buffer): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    await handle.write(bytes, 0, bytes.length, offset);
  } finally {
    await handle.close();
  }
}

const u32 = (value: number): Buffer => { const b = Buffer.alloc(4); b.writeUInt32BE(value >>> 0); return b; };
const u64 = (value: bigint): Buffer => { const b = Buffer.alloc(8); b.writeBigUInt64BE(value); return b; };

async function readU64At(path: string, offset: number): Promise<bigint> {
  return (await readFile(path)).readBigUInt64BE(offset);
}

/** Offset of the first L2 table (from L1 entry 0) of a qcow2 file. */
async function firstL2Offset(path: string): Promise<number> {
  const l1 = Number(await readU64At(path, 40));
  return Number((await readU64At(path, l1)) & 0x00fffffffffffe00n);
}

async function fileSize(path: string): Promise<number> {
  const handle = await open(path, 'r');
  try {
    return (await handle.stat()).size;
  } finally {
    await handle.close();
  }
}

/** Everything a user can do read-only with the image; resolves to the first error (or undefined). */
async function readEverything(path: string, dir: string): Promise<unknown> {
  const failures: unknown[] = [];
  try {
    const image = await openImage(path, { readOnly: true });
    const probe = nodeHostAllocationProbe();
    try {
      await imageInfo(image, { probe }).catch((e: unknown) => failures.push(e));
      await (async () => { for await (const _ of mapEntries(image, { probe })) { /* drain */ } })().catch((e: unknown) => failures.push(e));
      await image.read(0, image.virtualSize).catch((e: unknown) => failures.push(e));
    } finally {
      probe.close();
      await image.close();
    }
  } catch (err) {
    failures.push(err);
  }
  const out = join(dir, 'out.raw');
  const code = await convert(['-q', '-f', 'qcow2', '-O', 'raw', path, out]);
  if (failures.length > 0) expect(code, 'convert must fail where reading fails').toBe(1);
  return failures[0];
}

interface Case {
  name: string;
  /** Build the damaged image; returns its path. */
  damage(dir: string): Promise<string>;
  code: string;
  /** Text the message must contain (field names, feature names …). */
  message?: RegExp;
  /** The damage is in the header: a writable open is refused too, before any write. */
  header?: boolean;
}

async function base(dir: string, options = 'compat=1.1', size = '4M'): Promise<string> {
  const path = join(dir, 'bad.qcow2');
  await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', options, path, size]);
  await qemuIoOk(path, ['write -P 0x5a 0 128k', 'write -P 0x5b 1M 64k']);
  return path;
}

const CASES: Case[] = [
  { name: 'truncated header (40 bytes)', code: 'ETRUNCATED', header: true, async damage(dir) { const p = await base(dir); await truncate(p, 40); return p; } },
  { name: 'truncated v3 header (100 bytes)', code: 'ETRUNCATED', header: true, async damage(dir) { const p = await base(dir); await truncate(p, 100); return p; } },
  { name: 'empty file', code: 'ETRUNCATED', header: true, async damage(dir) { const p = join(dir, 'bad.qcow2'); await writeFile(p, ''); return p; } },
  { name: 'bad magic', code: 'EBADMAGIC', message: /not a qcow2 image/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 0, Buffer.from('QFI\xfa', 'latin1')); return p; } },
  { name: 'version 1', code: 'EBADVERSION', message: /version 1/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 4, u32(1)); return p; } },
  { name: 'version 4', code: 'EBADVERSION', message: /version 4/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 4, u32(4)); return p; } },
  { name: 'cluster_bits 8 (below 9)', code: 'EBADHEADER', message: /cluster_bits/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 20, u32(8)); return p; } },
  { name: 'cluster_bits 22 (above 21)', code: 'EBADHEADER', message: /cluster_bits/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 20, u32(22)); return p; } },
  { name: 'cluster_bits 0xffffffff', code: 'EBADHEADER', message: /cluster_bits/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 20, u32(0xffffffff)); return p; } },
  { name: 'huge l1_size (0xffffffff entries)', code: 'EBADHEADER', message: /l1_size/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 36, u32(0xffffffff)); return p; } },
  { name: 'l1_size just over the 32 MiB limit', code: 'EBADHEADER', message: /l1_size/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 36, u32(4 * 1024 * 1024 + 1)); return p; } },
  { name: 'l1_size too small for the virtual size', code: 'EBADHEADER', message: /l1_size/, header: true, async damage(dir) { const p = await base(dir, 'compat=1.1', '1G'); await patch(p, 36, u32(1)); return p; } },
  { name: 'huge virtual size', code: 'EBADHEADER', message: /size/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 24, u64(0x7fffffffffffffffn)); return p; } },
  { name: 'unaligned l1_table_offset', code: 'EBADHEADER', message: /l1_table_offset/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 40, u64(await readU64At(p, 40) + 8n)); return p; } },
  { name: 'l1_table_offset past the end of the file', code: 'EBADHEADER', message: /l1_table_offset/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 40, u64(1n << 40n)); return p; } },
  { name: 'l1_table_offset beyond 2^53', code: 'EBADHEADER', message: /l1_table_offset/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 40, u64(0xfff0000000000000n)); return p; } },
  { name: 'unaligned refcount_table_offset', code: 'EBADHEADER', message: /refcount_table_offset/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 48, u64(65536n + 512n)); return p; } },
  { name: 'refcount table past the end of the file', code: 'EBADHEADER', message: /refcount_table_offset/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 56, u32(1000)); return p; } },
  { name: 'refcount_order 7', code: 'EBADHEADER', message: /refcount_order/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 96, u32(7)); return p; } },
  { name: 'unaligned snapshot table', code: 'EBADHEADER', message: /snapshots_offset/, header: true, async damage(dir) {
    const p = await base(dir); await qemuImgOk(['snapshot', '-c', 's', p]); await patch(p, 64, u64(await readU64At(p, 64) + 8n)); return p;
  } },
  { name: 'unknown incompatible feature bit 10', code: 'EUNSUPPORTED', message: /unknown incompatible feature bit 10/, header: true, async damage(dir) {
    const p = await base(dir); await patch(p, 72, u64((await readU64At(p, 72)) | (1n << 10n))); return p;
  } },
  { name: 'unknown incompatible bit named by the feature name table', code: 'EUNSUPPORTED', message: /frobnication/, header: true, async damage(dir) {
    const p = await base(dir);
    const file = await readFile(p);
    // Rename the table's "dirty bit" entry (type 0, bit 0) into a feature of bit 11.
    const at = file.indexOf(Buffer.from('dirty bit'));
    await patch(p, at - 1, Buffer.concat([Buffer.from([11]), Buffer.from('frobnication\0')]));
    await patch(p, 72, u64((await readU64At(p, 72)) | (1n << 11n)));
    return p;
  } },
  { name: 'encryption (crypt_method 1)', code: 'EUNSUPPORTED', message: /encrypt/, header: true, async damage(dir) { const p = await base(dir); await patch(p, 32, u32(1)); return p; } },
  { name: 'L2 entry pointing past the end of the file', code: 'ECORRUPT', message: /past the end/, async damage(dir) {
    const p = await base(dir);
    await patch(p, await firstL2Offset(p), u64((1n << 63n) | (1n << 40n)));
    return p;
  } },
  { name: 'L1 entry pointing past the end of the file', code: 'ECORRUPT', message: /L2 table/, async damage(dir) {
    const p = await base(dir);
    await patch(p, Number(await readU64At(p, 40)), u64((1n << 63n) | (1n << 40n)));
    return p;
  } },
  { name: 'unaligned L2 data cluster offset', code: 'ECORRUPT', message: /unaligned/, async damage(dir) {
    const p = await base(dir);
    const l2 = await firstL2Offset(p);
    await patch(p, l2, u64((await readU64At(p, l2)) + 512n));
    return p;
  } },
  { name: 'compressed cluster with garbage data', code: 'ECORRUPT', message: /decompress/, async damage(dir) {
    const p = join(dir, 'bad.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', p, '4M']);
    await qemuIoOk(p, ['write -c -P 0x33 0 64k']);
    const entry = await readU64At(p, await firstL2Offset(p));
    const host = Number(entry & ((1n << 54n) - 1n));
    await patch(p, host, Buffer.alloc(256, 0xff));
    return p;
  } },
  { name: 'zstd compressed cluster with garbage data', code: 'ECORRUPT', message: /decompress/, async damage(dir) {
    const p = join(dir, 'bad.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', p, '4M']);
    await qemuIoOk(p, ['write -c -P 0x33 0 64k']);
    const entry = await readU64At(p, await firstL2Offset(p));
    await patch(p, Number(entry & ((1n << 54n) - 1n)), Buffer.alloc(64, 0x11));
    return p;
  } },
  { name: 'garbage in one chunk of a run of back-to-back compressed clusters', code: 'ECORRUPT', message: /decompress/, async damage(dir) {
    const raw = join(dir, 'src.raw');
    const p = join(dir, 'bad.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'raw', raw, '4M']);
    await qemuIoOk(raw, ['write -P 0x21 0 1M'], { format: 'raw' });
    await qemuImgOk(['convert', '-c', '-O', 'qcow2', raw, p]);
    // The third cluster's chunk: its neighbours are read in the same pread.
    const entry = await readU64At(p, await firstL2Offset(p) + 16);
    await patch(p, Number(entry & ((1n << 54n) - 1n)), Buffer.alloc(32, 0xff));
    return p;
  } },
  { name: 'compressed descriptor pointing past the end of the file', code: 'ECORRUPT', message: /past the end/, async damage(dir) {
    const p = join(dir, 'bad.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', p, '4M']);
    await qemuIoOk(p, ['write -c -P 0x33 0 64k']);
    await patch(p, await firstL2Offset(p), u64((1n << 62n) | BigInt(await fileSize(p) + 4096)));
    return p;
  } },
  { name: 'backing file loop (a → b → a)', code: 'EBACKINGLOOP', message: /loops/, header: true, async damage(dir) {
    const a = join(dir, 'bad.qcow2');
    const b = join(dir, 'b.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', b, '4M']);
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', a]);
    await qemuImgOk(['rebase', '-u', '-b', 'bad.qcow2', '-F', 'qcow2', b]);
    return a;
  } },
  { name: 'backing file naming itself', code: 'EBACKINGLOOP', message: /loops/, header: true, async damage(dir) {
    const a = join(dir, 'bad.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', a, '4M']);
    await qemuImgOk(['rebase', '-u', '-b', 'bad.qcow2', '-F', 'qcow2', a]);
    return a;
  } },
  { name: 'missing backing file', code: 'ENOENT', header: true, async damage(dir) {
    const a = join(dir, 'bad.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', a, '4M']);
    return a;
  } },
];

describe.skipIf(!hasQemu)('bad input: coded errors, no crash, no hang, no modification', () => {
  const tmp = useTempDir('bad-input');

  for (const c of CASES) {
    it(`${c.name} → ${c.code}`, async () => {
      const path = await c.damage(tmp.path);
      const before = await sha256File(path);
      const error = await readEverything(path, tmp.path);
      expect(error, 'reading must fail').toBeDefined();
      expect(error).toMatchObject({ code: c.code });
      if (c.message) expect((error as Error).message).toMatch(c.message);
      expect((error as Error).message).toContain(path);
      if (c.header) {
        await expect(openImage(path, { readOnly: false })).rejects.toMatchObject({ code: c.code });
      }
      expect(await sha256File(path), 'the image file must not change').toBe(before);
    }, CASE_TIMEOUT_MS);
  }

  it('a corrupt snapshot L1 offset fails only that snapshot, coded', async () => {
    const path = await base(tmp.path);
    await qemuImgOk(['snapshot', '-c', 'snap', path]);
    const table = Number(await readU64At(path, 64));
    await patch(path, table, u64((await readU64At(path, table)) + 512n));
    const before = await sha256File(path);
    const { openSnapshotView } = await import('../../../../src/qcow2/engine/snapshot.js');
    const image = await openImage(path, { readOnly: true });
    try {
      expect((await image.read(0, 4096)).every((b) => b === 0x5a)).toBe(true);
      await expect(openSnapshotView(image, 'snap')).rejects.toMatchObject({ code: 'EBADSNAPSHOT' });
    } finally {
      await image.close();
    }
    expect(await convert(['-q', '-l', 'snap', '-O', 'raw', path, join(tmp.path, 'out.raw')])).toBe(1);
    expect(await sha256File(path)).toBe(before);
  }, CASE_TIMEOUT_MS);
});
