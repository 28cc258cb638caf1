/**
 * Snapshot create / delete / apply / list (`qcow2fuse snapshot -c/-d/-a/-l`) with qemu-img as the
 * oracle: after every step `qemu-img check` is clean (no corruptions, no leaks), `qemu-img snapshot
 * -l` and ours print the same table, every snapshot converts (`qemu-img convert -l`) to the guest
 * contents at the moment it was taken, and the active layer holds what it should — whichever tool
 * made, applied or deleted each snapshot. Refusals (refcount overflow, data file, v2 resize) match
 * qemu-img's and leave the image clean; a power cut anywhere inside the operations only leaks.
 */
import { describe, expect, it, vi } from 'vitest';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { run as snapshotCommand } from '../../../../src/cli/commands/snapshot.js';
import { FaultyHostFile } from '../../../../src/io/faulty-host-file.js';
import { MemoryHostFile } from '../../../../src/io/memory-host-file.js';
import { Qcow2Image } from '../../../../src/qcow2/engine/image.js';
import { applySnapshot, createSnapshot, deleteSnapshot } from '../../../../src/qcow2/tools/snapshot-ops.js';
import { openSnapshotView } from '../../../../src/qcow2/engine/snapshot.js';
import { PowerSwitch } from '../../../helpers/power-switch.js';
import { patternBuffer, Prng, seedFromEnv } from '../../../helpers/patterns.js';
import { qemuImg, qemuImgCheck, qemuImgCheckClean, qemuImgInfo, qemuIoOk, type ExecResult } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTools } from '../../../helpers/tools.js';
import { openImage } from '../../../../src/node.js';

const hasQemu = requireTools('qemu-img', 'qemu-io');
const KiB = 1024;
const MiB = 1024 * KiB;

async function qemuImgOk(args: string[]): Promise<ExecResult> {
  const result = await qemuImg(args);
  if (result.code !== 0) throw new Error(`qemu-img ${args.join(' ')} exited ${result.code}: ${result.stderr}`);
  return result;
}

/** `qcow2fuse snapshot ARGS` in-process, with what it printed. */
async function ours(args: string[]): Promise<ExecResult> {
  let stdout = '';
  let stderr = '';
  const capture = (sink: (text: string) => void) => ((chunk: string | Uint8Array, ...rest: unknown[]): boolean => {
    sink(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8'));
    const callback = rest.find((r): r is () => void => typeof r === 'function');
    callback?.();
    return true;
  }) as typeof process.stdout.write;
  const out = vi.spyOn(process.stdout, 'write').mockImplementation(capture((t) => { stdout += t; }));
  const err = vi.spyOn(process.stderr, 'write').mockImplementation(capture((t) => { stderr += t; }));
  try {
    const code = await snapshotCommand(args);
    return { code, stdout, stderr };
  } finally {
    out.mockRestore();
    err.mockRestore();
  }
}

async function oursOk(args: string[]): Promise<void> {
  const result = await ours(args);
  expect(result, `qcow2fuse snapshot ${args.join(' ')}`).toEqual({ code: 0, stdout: '', stderr: '' });
}

/** Guest contents as `qemu-img convert -O raw` gives them: the active layer, or a snapshot by id. */
async function raw(image: string, snapshotId?: string): Promise<Buffer> {
  const out = `${image}.${snapshotId ?? 'active'}.raw`;
  await qemuImgOk(['convert', ...(snapshotId === undefined ? [] : ['-l', `snapshot.id=${snapshotId}`]), '-O', 'raw', image, out]);
  return readFile(out);
}

/** Both tools list the same table (ours reads what either wrote). */
async function expectSameList(image: string): Promise<string> {
  const theirs = await qemuImgOk(['snapshot', '-l', image]);
  const mine = await ours(['-l', image]);
  expect(mine.stderr).toBe('');
  expect(mine.code).toBe(0);
  expect(mine.stdout).toBe(theirs.stdout);
  return mine.stdout;
}

async function snapshotIds(image: string): Promise<{ id: string; name: string }[]> {
  return ((await qemuImgInfo(image)).snapshots ?? []).map((s) => ({ id: s.id, name: s.name }));
}

/** `buf` cut or zero-extended to `bytes`. */
function fit(buf: Buffer, bytes: number): Buffer {
  return buf.length >= bytes ? buf.subarray(0, bytes) : Buffer.concat([buf, Buffer.alloc(bytes - buf.length)]);
}

/**
 * Everything is right after a step: clean check, same listing, each snapshot's contents as recorded
 * (qemu-img convert -l reads a snapshot at the image's current size).
 */
async function expectState(image: string, active: Buffer, snapshots: Map<string, Buffer>): Promise<void> {
  await qemuImgCheckClean(image);
  await expectSameList(image);
  expect((await raw(image)).equals(active), 'active layer').toBe(true);
  const listed = await snapshotIds(image);
  expect(listed.map((s) => s.name).sort()).toEqual([...snapshots.keys()].sort());
  for (const { id, name } of listed) expect((await raw(image, id)).equals(fit(snapshots.get(name)!, active.length)), `snapshot ${id} '${name}'`).toBe(true);
}

interface Config {
  name: string;
  options: string;
  clusterBytes: number;
  v3: boolean;
  backing?: boolean;
}

const CONFIGS: Config[] = [
  { name: 'v3, 64 KiB clusters', options: 'compat=1.1', clusterBytes: 64 * KiB, v3: true },
  { name: 'v2', options: 'compat=0.10', clusterBytes: 64 * KiB, v3: false },
  { name: '512 B clusters (8-cluster L1, 512 L2 tables), refcount_bits 4', options: 'cluster_size=512,refcount_bits=4', clusterBytes: 512, v3: true },
  { name: '2 MiB clusters, refcount_bits 64', options: 'cluster_size=2M,refcount_bits=64', clusterBytes: 2 * MiB, v3: true },
  { name: 'extended L2, 128 KiB clusters', options: 'extended_l2=on,cluster_size=128k', clusterBytes: 128 * KiB, v3: true },
  { name: 'zstd, lazy refcounts', options: 'compression_type=zstd,lazy_refcounts=on', clusterBytes: 64 * KiB, v3: true },
  { name: 'overlay on a qcow2 backing file', options: 'compat=1.1', clusterBytes: 64 * KiB, v3: true, backing: true },
];

describe.skipIf(!hasQemu)('snapshot -c/-d/-a/-l agree with qemu-img', () => {
  const tmp = useTempDir('snapshot-ops');

  for (const config of CONFIGS) {
    it(`creates, applies and deletes snapshots interchangeably with qemu-img (${config.name})`, async () => {
      const image = tmp.file('img.qcow2');
      const cs = config.clusterBytes;
      if (config.backing === true) {
        await qemuImgOk(['create', '-q', '-f', 'qcow2', tmp.file('base.qcow2'), '16M']);
        await qemuIoOk(tmp.file('base.qcow2'), ['write -P 0x5a 0 16M']);
        await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', config.options, '-b', 'base.qcow2', '-F', 'qcow2', image]);
      } else {
        await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', config.options, image, '16M']);
      }
      const compressedAt = 8 * MiB;
      await qemuIoOk(image, [`write -P 0x11 1000 ${3 * cs}`, `write -c -P 0x12 ${compressedAt} ${4 * cs}`, `${config.v3 ? 'write -z' : 'write -P 0'} ${4 * MiB} ${cs}`,
        `write -P 0x13 ${12 * MiB + 7} 9000`]);
      const snapshots = new Map<string, Buffer>();

      // Ours takes the first snapshot; qemu-img reads it back.
      const s0 = await raw(image);
      await oursOk(['-c', 'first', image]);
      snapshots.set('first', s0);
      await expectState(image, s0, snapshots);

      // Writes through our driver copy what the snapshot shares (data, L2 tables, compressed clusters).
      const writer = await openImage(image, { readOnly: false });
      await writer.write(0, Buffer.alloc(2 * cs, 0x77));
      await writer.write(compressedAt + cs + 100, Buffer.alloc(300, 0x78));
      await writer.writeZeroes(compressedAt + 2 * cs, cs);
      await writer.discard(12 * MiB, MiB);
      await writer.close();
      const s1 = await raw(image);
      expect(s1.equals(s0)).toBe(false);
      await expectState(image, s1, snapshots);

      // qemu-img takes one, qemu-io writes, ours takes another.
      await qemuImgOk(['snapshot', '-c', 'qemu made', image]);
      snapshots.set('qemu made', s1);
      await qemuIoOk(image, [`write -P 0x55 ${4 * MiB} ${2 * cs}`]);
      const s2 = await raw(image);
      await oursOk(['-c', 'second', image]);
      snapshots.set('second', s2);
      expect((await snapshotIds(image)).map((s) => s.id)).toEqual(['1', '2', '3']);
      await expectState(image, s2, snapshots);

      // Ours applies qemu's snapshot and its own.
      await oursOk(['-a', 'qemu made', image]);
      await expectState(image, s1, snapshots);
      await oursOk(['-a', 'first', image]);
      await expectState(image, s0, snapshots);

      // Ours deletes qemu's snapshot; the others keep their contents.
      await oursOk(['-d', 'qemu made', image]);
      snapshots.delete('qemu made');
      await expectState(image, s0, snapshots);

      // qemu-img applies and deletes ours.
      await qemuImgOk(['snapshot', '-a', 'second', image]);
      await expectState(image, s2, snapshots);
      await qemuImgOk(['snapshot', '-d', 'first', image]);
      snapshots.delete('first');
      await expectState(image, s2, snapshots);

      // Ours deletes the last one: nothing listed, the image stays usable and clean.
      await oursOk(['-d', 'second', image]);
      snapshots.delete('second');
      expect(await expectSameList(image)).toBe('');
      await expectState(image, s2, snapshots);
      await qemuIoOk(image, [`write -P 0x66 0 ${cs}`, `read -P 0x66 0 ${cs}`]);
      await qemuImgCheckClean(image);
    });
  }

  it('lists what qemu-img lists: its snapshots and ours print alike (id, tag, sizes, clock, icount; UTF-8 padded by bytes)', async () => {
    const image = tmp.file('img.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', image, '4M']);
    expect(await expectSameList(image)).toBe('');
    for (const [i, name] of ['short', 'hé', 'exactly-16-bytes', 'a name longer than sixteen bytes', ''].entries()) {
      await qemuImgOk(['snapshot', '-c', name, image]);
      await oursOk(['-c', name, image]);
      const lines = (await expectSameList(image)).split('\n');
      const [theirs, mine] = [lines[lines.length - 3], lines[lines.length - 2]];
      // Same columns; only the id (first 10 columns) and the time of day differ.
      const date = /\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/;
      expect([theirs.slice(0, 10), mine.slice(0, 10)]).toEqual([String(2 * i + 1).padEnd(10), String(2 * i + 2).padEnd(10)]);
      expect(mine.slice(10).replace(date, 'DATE')).toBe(theirs.slice(10).replace(date, 'DATE'));
    }
    expect((await ours(['-l', image])).stdout.split('\n')[1]).toBe('ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT');
    // The recorded fields, as qemu-img info reads them, match qemu-img's own snapshots.
    const info = (await qemuImgInfo(image)).snapshots as Record<string, unknown>[];
    const strip = (s: Record<string, unknown>): Record<string, unknown> => ({ ...s, id: undefined, 'date-sec': undefined, 'date-nsec': undefined });
    for (let i = 0; i < info.length; i += 2) expect(strip(info[i + 1])).toEqual(strip(info[i]));
    const now = Date.now() / 1000;
    expect(Number(info[1]['date-sec'])).toBeGreaterThan(now - 600);
    await qemuImgCheckClean(image);
  });

  it('looks snapshots up as qemu-img does and numbers and names them alike', async () => {
    const image = tmp.file('img.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', image, '4M']);
    await qemuIoOk(image, ['write -P 1 0 64k']);
    await qemuImgOk(['snapshot', '-c', 'x', image]); // id 1
    const x = await raw(image);
    await qemuIoOk(image, ['write -P 2 0 64k']);
    await oursOk(['-c', '1', image]); // id 2, named "1"
    const named1 = await raw(image);
    await qemuIoOk(image, ['write -P 3 0 64k']);
    // -a: id first — "1" is snapshot x.
    await oursOk(['-a', '1', image]);
    expect((await raw(image)).equals(x)).toBe(true);
    // -d: name first — "1" is the snapshot named "1" (id 2).
    await oursOk(['-d', '1', image]);
    expect(await snapshotIds(image)).toEqual([{ id: '1', name: 'x' }]);
    // -a by name; -d by id when no name matches.
    await oursOk(['-c', 'y', image]);
    await oursOk(['-a', 'x', image]);
    expect((await raw(image)).equals(x)).toBe(true);
    await oursOk(['-d', '2', image]);
    expect(await snapshotIds(image)).toEqual([{ id: '1', name: 'x' }]);
    expect(named1.equals(x)).toBe(false);
    await qemuImgCheckClean(image);

    // The same sequence by each tool gives the same ids and names: max id + 1, duplicates allowed,
    // names cut to 255 bytes.
    const sequence: [string, string][] = [['-c', 'a'], ['-c', 'a'], ['-c', 'b'], ['-d', 'b'], ['-c', 'n'.repeat(300)], ['-c', 'é'.repeat(100)], ['-d', 'a'], ['-c', 'c']];
    const [mine, theirs] = [tmp.file('mine.qcow2'), tmp.file('theirs.qcow2')];
    for (const path of [mine, theirs]) await qemuImgOk(['create', '-q', '-f', 'qcow2', path, '4M']);
    for (const [flag, name] of sequence) {
      await oursOk([flag, name, mine]);
      await qemuImgOk(['snapshot', flag, name, theirs]);
    }
    const listed = await snapshotIds(mine);
    expect(listed).toEqual(await snapshotIds(theirs));
    expect(listed.map((s) => s.id)).toEqual(['2', '3', '4', '5']);
    expect(Buffer.byteLength(listed[1].name)).toBe(255);
    await expectSameList(theirs);
    await qemuImgCheckClean(mine);
  });

  it('apply restores the disk size the snapshot recorded (v3); on v2 both tools refuse a size change', async () => {
    const image = tmp.file('img.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', image, '16M']);
    await qemuIoOk(image, ['write -P 1 0 1M', 'write -c -P 2 15M 1M']);
    const small = await raw(image);
    await oursOk(['-c', 'small', image]);
    await qemuImgOk(['resize', '-q', image, '20M']);
    await qemuIoOk(image, ['write -P 3 18M 1M', 'write -P 4 0 64k']);
    const big = await raw(image);
    await oursOk(['-c', 'big', image]);
    await qemuIoOk(image, ['write -P 5 17M 2M']);
    const snapshots = new Map([['small', small], ['big', big]]);

    await oursOk(['-a', 'small', image]);
    expect((await qemuImgInfo(image))['virtual-size']).toBe(16 * MiB);
    await expectState(image, small, snapshots);
    await oursOk(['-a', 'big', image]);
    expect((await qemuImgInfo(image))['virtual-size']).toBe(20 * MiB);
    await expectState(image, big, snapshots);

    // v2: qemu cannot resize an image with snapshots, so it cannot load one of another size either.
    const v2 = tmp.file('v2.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '16M']);
    await qemuIoOk(v2, ['write -P 1 0 1M']);
    await oursOk(['-c', 's', v2]);
    const grower = await openImage(v2, { readOnly: false });
    await grower.resize(20 * MiB);
    await grower.close();
    const before = await readFile(v2);
    const mine = await ours(['-a', 's', v2]);
    expect(mine.code).toBe(1);
    expect(mine.stderr).toMatch(/Could not apply snapshot 's': .*cannot be resized \[ENOTSUP\]/);
    expect((await readFile(v2)).equals(before)).toBe(true);
    expect((await qemuImg(['snapshot', '-a', 's', v2])).code).toBe(1);
    await qemuImgCheckClean(v2);
  });

  it('refuses a snapshot whose refcounts would overflow (as qemu-img) and leaves the image clean', async () => {
    // refcount_bits=1: an empty image can be snapshotted, one with data cannot.
    const empty = tmp.file('empty.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=1', empty, '16M']);
    await oursOk(['-c', 'e', empty]);
    await expectState(empty, Buffer.alloc(16 * MiB), new Map([['e', Buffer.alloc(16 * MiB)]]));

    const cases: { options: string; writes: string[]; okBefore: number }[] = [
      { options: 'refcount_bits=1', writes: ['write -P 1 0 1M'], okBefore: 0 },
      { options: 'refcount_bits=2', writes: ['write -P 1 0 1M'], okBefore: 2 },
      // Three compressed chunks in one host cluster: refcount 3 already, the maximum.
      { options: 'refcount_bits=2', writes: ['write -c -P 1 0 64k', 'write -c -P 2 64k 64k', 'write -c -P 3 128k 64k'], okBefore: 0 },
    ];
    for (const c of cases) {
      const [mine, theirs] = [tmp.file('mine.qcow2'), tmp.file('theirs.qcow2')];
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', c.options, mine, '16M']);
      await qemuIoOk(mine, c.writes);
      await copyFile(mine, theirs);
      const data = await raw(mine);
      const snapshots = new Map<string, Buffer>();
      for (let n = 0; n < c.okBefore; n++) {
        await oursOk(['-c', `s${n}`, mine]);
        await qemuImgOk(['snapshot', '-c', `s${n}`, theirs]);
        snapshots.set(`s${n}`, data);
      }
      const result = await ours(['-c', 'one too many', mine]);
      expect(result.code, c.options).toBe(1);
      expect(result.stderr).toMatch(/Could not create snapshot 'one too many': .*would exceed .*refcount_bits=\d can hold \[EINVAL\]/);
      expect((await qemuImg(['snapshot', '-c', 'one too many', theirs])).stderr).toMatch(/Invalid argument/);
      // Unlike qemu-img (which leaks the new L1 table), nothing is left behind; the image is not marked corrupt.
      await expectState(mine, data, snapshots);
      expect((await qemuImgInfo(mine))['format-specific']?.data.corrupt).toBe(false);
      if (c.okBefore === 0) continue;
      // Applying needs one more reference too: refused alike while the refcounts are at the maximum.
      const apply = await ours(['-a', 's0', mine]);
      expect([apply.code, apply.stderr.includes('[EINVAL]')]).toEqual([1, true]);
      expect((await qemuImg(['snapshot', '-a', 's0', theirs])).code).toBe(1);
      await expectState(mine, data, snapshots);
      // A deletion makes room: then the other snapshot applies.
      await oursOk(['-d', 's0', mine]);
      snapshots.delete('s0');
      await oursOk(['-a', 's1', mine]);
      await expectState(mine, data, snapshots);
    }
  });

  it('refuses images with an external data file where qemu-img does', async () => {
    const image = tmp.file('df.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', `data_file=${tmp.file('df.raw')}`, image, '4M']);
    await qemuIoOk(image, ['write -P 1 0 64k']);
    for (const [flag, pattern] of [['-c', /Could not create snapshot 's': .*external data file \[ENOTSUP\]/], ['-a', /Could not apply snapshot 's': .*external data file \[ENOTSUP\]/],
      ['-d', /Could not delete snapshot 's': .*snapshot not found \[ENOENT\]/]] as const) {
      const result = await ours([flag, 's', image]);
      expect(result.code).toBe(1);
      expect(result.stderr).toMatch(pattern);
      expect((await qemuImg(['snapshot', flag, 's', image])).code).toBe(1);
    }
    expect(await expectSameList(image)).toBe('');
    await qemuImgCheckClean(image);
  });

  it('answers usage errors and unknown snapshots with exit status 1; no action leaves the image as it was', async () => {
    const image = tmp.file('img.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', image, '4M']);
    await qemuIoOk(image, ['write -P 1 0 64k']);
    await oursOk(['-c', 'only', image]);
    const before = await readFile(image);
    const cases: [string[], RegExp][] = [
      [['-l', '-c', 'x', image], /Cannot mix '-l', '-a', '-c', '-d'/],
      [['-l'], /Expecting one image file name/],
      [['-l', image, image], /Expecting one image file name/],
      [['-f', 'raw', '-l', image], /only qcow2/],
      [['-x', image], /unknown option '-x'/],
      [['-l', tmp.file('missing.qcow2')], /Could not open '.*missing\.qcow2'/],
      [['-d', 'nope', image], /Could not delete snapshot 'nope': .*snapshot not found \[ENOENT\]/],
      [['-a', 'nope', image], /Could not apply snapshot 'nope': .*'nope' \[ENOENT\]/],
    ];
    for (const [args, pattern] of cases) {
      const result = await ours(args);
      expect(result.code, args.join(' ')).toBe(1);
      expect(result.stderr, args.join(' ')).toMatch(pattern);
      expect(result.stdout).toBe('');
    }
    expect(await ours([image])).toEqual({ code: 0, stdout: '', stderr: '' });
    expect((await ours(['-h'])).stdout).toMatch(/^usage: qcow2fuse snapshot/);
    expect((await readFile(image)).equals(before)).toBe(true);
  });

  it('works on an image open for compressed writes, with writes racing the snapshot (library API)', async () => {
    const image = tmp.file('img.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', image, '8M']);
    const cs = 64 * KiB;
    const nbClusters = 32;
    const first = Array.from({ length: nbClusters }, (_, i) => patternBuffer(cs, 100 + i, i * cs, 'compressible'));
    const second = Array.from({ length: nbClusters }, (_, i) => patternBuffer(cs, 200 + i, i * cs, 'compressible'));
    const img = await openImage(image, { readOnly: false, compress: true });
    try {
      for (const [i, data] of first.entries()) await img.write(i * cs, data);
      const before = await createSnapshot(img, 'before');
      expect(before).toMatchObject({ id: '1', name: 'before', l1Entries: 1, vmStateBytes: 0, vmClockNsec: 0, icount: 0, diskSize: 8 * MiB });
      // Writes in flight while the next snapshot is taken: each cluster is either old or new in it.
      const racing = second.map((data, i) => img.write(i * cs, data));
      const during = createSnapshot(img, 'during');
      await Promise.all([...racing, during]);
      const view = await openSnapshotView(img, 'during');
      for (let i = 0; i < nbClusters; i++) {
        const got = await view.read(i * cs, cs);
        expect(got.equals(first[i]) || got.equals(second[i]), `cluster ${i} of 'during'`).toBe(true);
      }
      await view.close();
      // A snapshot of an image with pending compressed clusters, applied and deleted while open.
      await applySnapshot(img, 'before');
      expect((await img.read(0, nbClusters * cs)).equals(Buffer.concat(first))).toBe(true);
      await img.write(0, second[0]);
      expect((await deleteSnapshot(img, 'during')).id).toBe('2');
    } finally {
      await img.close();
    }
    const active = Buffer.concat([second[0], ...first.slice(1), Buffer.alloc(8 * MiB - nbClusters * cs)]);
    await expectState(image, active, new Map([['before', Buffer.concat([...first, Buffer.alloc(8 * MiB - nbClusters * cs)])]]));
    expect((await qemuImgCheckClean(image))['compressed-clusters']).toBeGreaterThan(0);
  });
});

/**
 * What `qemu-img check` (no repair) says about a survivor, sorted into what a crash inside a
 * snapshot operation may leave — leaks, and COPIED flags not yet brought in line with refcounts in
 * the safe direction (clear while the refcount is 1: only costs a copy; set while the refcount is
 * higher only when the extra count is itself a leak, so no second reference exists) — and anything
 * else, which is corruption.
 */
function unsafeFindings(stderr: string, clusterBytes: number): string[] {
  const lines = stderr.split('\n').filter((l) => l.trim() !== '');
  const leakedToOne = new Set<number>();
  for (const l of lines) {
    const m = /^Leaked cluster (\d+) refcount=\d+ reference=1$/.exec(l);
    if (m) leakedToOne.add(Number(m[1]));
  }
  return lines.filter((l) => {
    if (/^Leaked cluster \d+ refcount=\d+ reference=\d+$/.test(l)) return false;
    const m = /^ERROR OFLAG_COPIED (?:data cluster: l2_entry|L2 cluster: l1_index=\d+ l1_entry)=([0-9a-f]+) refcount=(\d+)$/.exec(l);
    if (!m) return true;
    const entry = BigInt(`0x${m[1]}`);
    const copied = (entry >> 63n) === 1n;
    const cluster = Number((entry & 0x00fffffffffffe00n) / BigInt(clusterBytes));
    return copied ? !leakedToOne.has(cluster) : m[2] !== '1';
  });
}

describe.skipIf(!hasQemu)('power cut inside snapshot operations', () => {
  const tmp = useTempDir('snapshot-powercut');
  const seed = seedFromEnv();
  const cs = 4096;
  const size = 2 * MiB;

  it('leaves an image that only leaks, and whose snapshots and active layer read as before or after the operation', async () => {
    const path = tmp.file('img.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, path, String(size)]);
    await qemuIoOk(path, [`write -P 1 0 ${64 * cs}`, `write -c -P 2 ${256 * cs} ${16 * cs}`, `write -P 3 ${300 * cs} ${8 * cs}`]);
    await qemuImgOk(['snapshot', '-c', 'q', path]);
    await qemuIoOk(path, [`write -P 4 ${8 * cs} ${8 * cs}`]);
    const initial = await readFile(path);
    const contents = { q: await raw(path, '1'), base: await raw(path) };
    const aData = patternBuffer(4 * cs, seed, 0);

    // The operations, each followed by the active contents it leaves; a flush ends every one.
    type Step = { name: string; op: (image: Qcow2Image) => Promise<unknown>; active: Buffer };
    const withWrite = Buffer.from(contents.base);
    aData.copy(withWrite, 260 * cs);
    const steps: Step[] = [
      { name: 'create a', op: (image) => createSnapshot(image, 'a'), active: contents.base },
      { name: 'write', op: (image) => image.write(260 * cs, aData), active: withWrite },
      { name: 'delete q', op: (image) => deleteSnapshot(image, 'q'), active: withWrite },
      { name: 'apply a', op: (image) => applySnapshot(image, 'a'), active: contents.base },
      { name: 'create b', op: (image) => createSnapshot(image, 'b'), active: contents.base },
      { name: 'delete a', op: (image) => deleteSnapshot(image, 'a'), active: contents.base },
      // The last snapshot: active clusters fall back to refcount 1 and get COPIED again.
      { name: 'delete b', op: (image) => deleteSnapshot(image, 'b'), active: contents.base },
    ];
    const snapshotContents: Record<string, Buffer> = { q: contents.q, a: contents.base, b: contents.base };

    const runWithCut = async (cutAt: number, runSeed: number): Promise<{ events: number; survivor?: MemoryHostFile; stepIndex: number }> => {
      const faulty = await FaultyHostFile.wrap(MemoryHostFile.from(initial), { journal: true, seed: runSeed, keepProbability: new Prng(runSeed).float() });
      const power = new PowerSwitch(faulty, cutAt);
      const image = await openImage(path, { readOnly: false, file: power, lock: false });
      for (const [stepIndex, step] of steps.entries()) {
        try {
          await step.op(image);
          await image.flush();
        } catch (err) {
          if (power.cut === undefined) throw err;
          return { events: power.events, survivor: await power.cut, stepIndex };
        }
      }
      const events = power.events;
      await image.close();
      return { events, stepIndex: steps.length };
    };

    const dry = await runWithCut(0, seed);
    expect(dry.survivor).toBeUndefined();
    const rng = new Prng(seed);
    const cuts = Array.from({ length: dry.events }, (_, i) => i + 1).filter(() => dry.events <= 120 || rng.chance(120 / dry.events));
    for (const cutAt of cuts) {
      const runSeed = (seed + cutAt * 7919) >>> 0;
      const result = await runWithCut(cutAt, runSeed);
      const where = `cut at I/O event ${cutAt} of ${dry.events} (seed ${runSeed}), during '${steps[result.stepIndex]?.name}'`;
      expect(result.survivor, where).toBeDefined();
      const survivorPath = tmp.file('survivor.qcow2');
      await writeFile(survivorPath, result.survivor!.snapshot());
      const check = await qemuImgCheck(survivorPath);
      expect(check.report?.['check-errors'], `${where}: ${check.stderr}`).toBe(0);
      expect(unsafeFindings(check.stderr, cs), where).toEqual([]);
      // Every snapshot the survivor lists reads as taken; the active layer as before or after the step.
      const reader = await openImage(survivorPath, { readOnly: true, file: MemoryHostFile.from(result.survivor!.snapshot()), lock: false });
      try {
        for (const s of reader.snapshots) {
          const view = await openSnapshotView(reader, { id: s.id });
          expect((await view.read(0, size)).equals(snapshotContents[s.name]), `${where}: snapshot '${s.name}'`).toBe(true);
        }
        const active = await reader.read(0, size);
        const allowed = [result.stepIndex === 0 ? contents.base : steps[result.stepIndex - 1].active, steps[result.stepIndex].active];
        expect(allowed.some((a) => a.equals(active)), `${where}: active layer`).toBe(true);
      } finally {
        await reader.close();
      }
      // qemu-img check -r all leaves it clean.
      const repaired = await qemuImgCheck(survivorPath, 'all');
      expect(repaired.report?.['check-errors'], where).toBe(0);
      await qemuImgCheckClean(survivorPath);
    }
  });
});
