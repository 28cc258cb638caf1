/**
 * Internal snapshot reads (issue 3 acceptance): the guest view of every snapshot, read through its
 * own L1 table, equals `qemu-img convert -l SNAPSHOT -O raw`; views are read-only, stay unchanged
 * while the active layer is written, and look snapshots up by id or name as qemu does.
 */
import { describe, expect, it } from 'vitest';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { run as convert } from '../../../../src/cli/commands/convert.js';
import { findSnapshot, listSnapshots, openSnapshotView } from '../../../../src/qcow2/engine/snapshot.js';
import { qemuImg, qemuImgCheck, qemuImgConvertToRaw, qemuIoOk } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTools } from '../../../helpers/tools.js';
import { openImage } from '../../../../src/node.js';

const hasQemu = requireTools('qemu-img', 'qemu-io');

const MiB = 1024 * 1024;

async function qemuImgOk(args: string[]): Promise<void> {
  const result = await qemuImg(args);
  if (result.code !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${result.stderr}`);
}

/** What qemu-img convert -l gives for each snapshot name. */
async function qemuSnapshotRaw(image: string, dir: string, name: string): Promise<Buffer> {
  const out = join(dir, `qemu-${name.replace(/\W/g, '_')}.raw`);
  await qemuImgConvertToRaw(image, out, { snapshot: name });
  return readFile(out);
}

interface Scenario {
  name: string;
  /** Builds the image and returns its path and the snapshots (name, recorded size), oldest first. */
  build(dir: string): Promise<{ image: string; snapshots: { name: string; sizeBytes: number }[] }>;
}

/**
 * Snapshots between rounds of writes: data, compressed, zeros, discards, and (v3: qemu cannot resize
 * a v2 image with snapshots) a resize. Returns each snapshot's name and recorded guest size.
 */
async function history(image: string, cs: number, v3: boolean): Promise<{ name: string; sizeBytes: number }[]> {
  const compressedAt = 10 * MiB; // cluster aligned for every cluster size, untouched by the other writes
  await qemuIoOk(image, [`write -P 0x11 1000 ${3 * cs}`, `write -c -P 0x12 ${compressedAt} ${2 * cs}`, `write -P 0x13 ${5 * MiB + 7} 9000`]);
  await qemuImgOk(['snapshot', '-c', 'one', image]);
  await qemuIoOk(image, [`write -P 0x21 ${cs + 5} ${cs}`, `${v3 ? 'write -z' : 'write -P 0'} ${compressedAt} ${cs}`, `discard ${5 * MiB} ${MiB}`]);
  await qemuImgOk(['snapshot', '-c', 'two words', image]);
  if (v3) await qemuImgOk(['resize', '-q', image, '+4M']);
  await qemuIoOk(image, [`write -P 0x31 ${(v3 ? 16 * MiB : 12 * MiB) + 3} 5000`, `write -P 0x32 0 ${cs}`]);
  await qemuImgOk(['snapshot', '-c', 'three', image]);
  await qemuIoOk(image, [`write -P 0x41 ${2 * MiB} ${MiB}`, `discard 0 ${4 * cs}`]);
  return [{ name: 'one', sizeBytes: 16 * MiB }, { name: 'two words', sizeBytes: 16 * MiB }, { name: 'three', sizeBytes: v3 ? 20 * MiB : 16 * MiB }];
}

const SCENARIOS: Scenario[] = [
  ...([['compat=1.1', 64 * 1024], ['compat=0.10', 64 * 1024], ['compat=1.1,cluster_size=512', 512], ['compat=1.1,cluster_size=2M,refcount_bits=64', 2 * MiB],
    ['compat=1.1,compression_type=zstd,lazy_refcounts=on', 64 * 1024], ['compat=1.1,extended_l2=on,cluster_size=128k', 128 * 1024]] as const)
    .map(([opts, cs]): Scenario => ({
      name: opts,
      async build(dir) {
        const image = join(dir, 'img.qcow2');
        await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', opts, image, '16M']);
        return { image, snapshots: await history(image, cs, opts.includes('1.1')) };
      },
    })),
  {
    name: 'overlay on a backing file (snapshot reads fall through to it)',
    async build(dir) {
      const base = join(dir, 'base.qcow2');
      const image = join(dir, 'img.qcow2');
      await qemuImgOk(['create', '-q', '-f', 'qcow2', base, '16M']);
      await qemuIoOk(base, ['write -P 0x51 0 16M']);
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', image]);
      return { image, snapshots: await history(image, 64 * 1024, true) };
    },
  },
];

describe.skipIf(!hasQemu)('snapshot reads equal qemu-img convert -l', () => {
  const tmp = useTempDir('snapshot-read');

  for (const scenario of SCENARIOS) {
    it(scenario.name, async () => {
      const { image, snapshots: recorded } = await scenario.build(tmp.path);
      const snapshots = recorded.map((s) => s.name);
      const expected = new Map<string, Buffer>();
      for (const name of snapshots) expected.set(name, await qemuSnapshotRaw(image, tmp.path, name));
      const ours = await openImage(image, { readOnly: true });
      try {
        expect(listSnapshots(ours).map((s) => s.name)).toEqual(snapshots);
        for (const [i, name] of snapshots.entries()) {
          const want = expected.get(name)!;
          // As qemu-img: the snapshot's tables, the image's current size.
          const view = await openSnapshotView(ours, name, { virtualSizeBytes: ours.virtualSize });
          expect(view.virtualSize).toBe(want.length);
          expect((await view.read(0, view.virtualSize)).equals(want), `snapshot '${name}'`).toBe(true);
          // Small unaligned reads agree with the whole.
          for (const [offset, bytes] of [[1000, 100], [5 * MiB + 3, 70000], [want.length - 4097, 4097]] as const) {
            expect((await view.read(offset, bytes)).equals(want.subarray(offset, offset + bytes))).toBe(true);
          }
          // By id: the same snapshot; by default the view has the size recorded in the snapshot.
          const byId = await openSnapshotView(ours, String(i + 1));
          expect(byId.snapshot.name).toBe(name);
          expect(byId.virtualSize).toBe(recorded[i].sizeBytes);
          expect((await byId.read(0, byId.virtualSize)).equals(want.subarray(0, byId.virtualSize))).toBe(true);
          await byId.close();
          await view.close();
        }
      } finally {
        await ours.close();
      }
      // The CLI's convert -l (name, snapshot.id=, snapshot.name=) writes the same bytes.
      for (const [i, name] of snapshots.entries()) {
        for (const ref of [name, `snapshot.id=${i + 1}`, `snapshot.name=${name}`]) {
          const out = join(tmp.path, 'ours.raw');
          expect(await convert(['-l', ref, '-O', 'raw', image, out])).toBe(0);
          expect((await readFile(out)).equals(expected.get(name)!), `convert -l ${ref}`).toBe(true);
        }
      }
    });
  }

  it('keeps a snapshot view unchanged while the active layer is written, and the image stays clean', async () => {
    const image = join(tmp.path, 'img.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', image, '16M']);
    const first = (await history(image, 64 * 1024, true))[0].name;
    const want = await qemuSnapshotRaw(image, tmp.path, first);
    const ours = await openImage(image, { readOnly: false });
    try {
      const view = await openSnapshotView(ours, first, { virtualSizeBytes: ours.virtualSize });
      // Overwrite everything the snapshot shares with the active layer (its L2 tables get copied).
      await ours.write(0, Buffer.alloc(4 * MiB, 0x77));
      await ours.writeZeroes(10 * MiB, 2 * 64 * 1024);
      await ours.discard(5 * MiB, MiB);
      expect((await view.read(0, view.virtualSize)).equals(want)).toBe(true);
      await expect(view.write(0, Buffer.alloc(512))).rejects.toMatchObject({ code: 'EROFS' });
      await expect(view.discard(0, 512)).rejects.toMatchObject({ code: 'EROFS' });
      expect(await view.allocatedBytes()).toBeGreaterThan(0);
      await view.close();
      await expect(view.read(0, 512)).rejects.toMatchObject({ code: 'EBADF' });
    } finally {
      await ours.close();
    }
    expect((await qemuImgCheck(image)).code).toBe(0);
    expect((await qemuSnapshotRaw(image, tmp.path, first)).equals(want)).toBe(true);
  });

  it('looks snapshots up by id before name, refuses unknown ones and reads past the view', async () => {
    const image = join(tmp.path, 'img.qcow2');
    await qemuImgOk(['create', '-q', '-f', 'qcow2', image, '4M']);
    await qemuIoOk(image, ['write -P 0x01 0 64k']);
    await qemuImgOk(['snapshot', '-c', '2', image]); // id 1, named "2"
    await qemuIoOk(image, ['write -P 0x02 0 64k']);
    await qemuImgOk(['snapshot', '-c', 'later', image]); // id 2
    const ours = await openImage(image, { readOnly: true });
    try {
      expect(findSnapshot(ours, '2')?.name).toBe('later');
      expect(findSnapshot(ours, { name: '2' })?.id).toBe('1');
      expect(findSnapshot(ours, { id: '1' })?.name).toBe('2');
      const named = await openSnapshotView(ours, { name: '2' });
      expect((await named.read(0, 4096)).every((b) => b === 0x01)).toBe(true);
      await expect(named.read(4 * MiB - 10, 11)).rejects.toMatchObject({ code: 'ERANGE' });
      await expect(openSnapshotView(ours, 'missing')).rejects.toMatchObject({ code: 'ENOENT' });
      await expect(openSnapshotView(ours, { id: '9' })).rejects.toMatchObject({ code: 'ENOENT' });
    } finally {
      await ours.close();
    }
  });
});
