/**
 * The read path against the oracle (issue 3 acceptance): images made by qemu-img / qemu-io over the
 * matrix compat 0.10|1.1 × cluster size 512 B|4 KiB|64 KiB|2 MiB × refcount_bits 1|16|64, each
 * holding one kind of content. For every image: our `convert -O raw` output is byte-identical to
 * `qemu-img convert -O raw`, our info JSON is the exact text of `qemu-img info --output=json`, and
 * our map JSON the exact text of `qemu-img map --output=json`. Combinations that cannot exist (a v3
 * feature on compat=0.10, extended L2 below 16 KiB clusters, snapshots with 1-bit refcounts) are refused
 * by both tools alike.
 */
import { describe, expect, it } from 'vitest';
import { access, copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { run as convert } from '../../../../src/cli/commands/convert.js';
import { run as ourCreate } from '../../../../src/cli/commands/create.js';
import { run as ourSnapshot } from '../../../../src/cli/commands/snapshot.js';
import { qemuJson } from '../../../../src/cli/output.js';
import { nodeHostAllocationProbe } from '../../../../src/io/host-allocation.js';
import { imageInfo } from '../../../../src/qcow2/tools/info.js';
import { mapEntries, mapJsonChunks } from '../../../../src/qcow2/tools/map.js';
import { settleFiles, sha256File } from '../../../helpers/files.js';
import { QemuError, qemuIo, qemuIoOk, run } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTools } from '../../../helpers/tools.js';
import { openImage } from '../../../../src/node.js';

const hasQemu = requireTools('qemu-img', 'qemu-io');

const exists = (path: string): Promise<boolean> => access(path).then(() => true, () => false);

/** How one of our commands ends, as main.ts turns it into an exit status: its code, or the error's code when it throws. */
async function ourOutcome(command: (argv: string[]) => Promise<number>, argv: string[]): Promise<number | string> {
  try {
    return await command(argv);
  } catch (err) {
    return (err as { code?: string }).code ?? 'thrown';
  }
}

const KiB = 1024;
const MiB = 1024 * KiB;

interface Config {
  compat: '0.10' | '1.1';
  clusterSize: number;
  refcountBits: number;
}

const CLUSTER_SIZES = [512, 4 * KiB, 64 * KiB, 2 * MiB];
const REFCOUNT_BITS = [1, 16, 64];

function label(c: Config): string {
  const cs = c.clusterSize >= MiB ? `${c.clusterSize / MiB}M` : c.clusterSize >= KiB ? `${c.clusterSize / KiB}k` : `${c.clusterSize}`;
  return `compat=${c.compat} cluster_size=${cs} refcount_bits=${c.refcountBits}`;
}

/** -o string of a config plus extra options. */
function options(c: Config, extra: Record<string, string | number> = {}): string {
  const all: Record<string, string | number> = { compat: c.compat, cluster_size: c.clusterSize, refcount_bits: c.refcountBits, ...extra };
  return Object.entries(all).map(([k, v]) => `${k}=${String(v).replaceAll(',', ',,')}`).join(',');
}

/** Small disks keep the matrix quick: 8 MiB (512 B clusters: 16384 of them), 16 MiB, 32 MiB (2 MiB clusters). */
function virtualSize(c: Config): number {
  return c.clusterSize >= 2 * MiB ? 32 * MiB : c.clusterSize <= 512 ? 8 * MiB : 16 * MiB;
}

async function qemuOk(args: string[], cwd?: string): Promise<string> {
  const result = await run('qemu-img', args, cwd === undefined ? {} : { cwd });
  if (result.code !== 0) throw new QemuError(['qemu-img', ...args], result);
  return result.stdout;
}

async function create(path: string, c: Config, size: number, extra: Record<string, string | number> = {}, backing?: { file: string; format: string }, cwd?: string): Promise<void> {
  const args = ['create', '-q', '-f', 'qcow2', '-o', options(c, extra)];
  if (backing) args.push('-b', backing.file, '-F', backing.format);
  await qemuOk([...args, path, String(size)], cwd);
}

/**
 * Writes at unaligned offsets, spanning clusters, compressed clusters, zero writes (whole clusters
 * get zero flags on v3; partial ones are written) and discards of data and compressed clusters.
 */
function contentCommands(c: Config, size: number, { compressed = true } = {}): string[] {
  const cs = c.clusterSize;
  const sixteenth = size / 16;
  const cmds = [
    `write -P 0x11 1000 ${2 * cs + 3000}`,
    `write -P 0x22 ${4 * cs + 777} 5000`,
    `write -P 0x55 ${5 * sixteenth + 3} 70001`,
    `write -P 0x44 ${size - 3 * cs - 100} ${cs + 200}`,
    `write -z ${10 * cs} ${2 * cs}`,
    `write -z ${6 * sixteenth + 100} 3000`,
    `discard ${cs} ${cs}`,
  ];
  // Compressed writes need unallocated clusters: 7/16 of the disk + 3 clusters is free for every cluster size.
  const free = 7 * sixteenth;
  if (compressed) cmds.push(`write -c -P 0x33 ${free} ${2 * cs}`, `write -c -P 0x66 ${free + 2 * cs} ${cs}`, `discard ${free + cs} ${cs}`);
  return cmds;
}

/** Our convert -O raw, info JSON and map JSON against qemu-img's, for one image. */
async function expectSameAsQemu(image: string, dir: string, cwd?: string): Promise<void> {
  await settleFiles(dir);
  const qemuMap = await qemuOk(['map', '--output=json', image], cwd);
  const qemuInfo = await qemuOk(['info', '--output=json', image], cwd);
  const probe = nodeHostAllocationProbe();
  const ours = await openImage(image, { readOnly: true });
  try {
    let map = '';
    for await (const chunk of mapJsonChunks(mapEntries(ours, { probe }))) map += chunk;
    expect(map).toBe(qemuMap);
    expect(qemuJson(await imageInfo(ours, { probe }))).toBe(qemuInfo);
  } finally {
    await ours.close();
    probe.close();
  }
  const theirsRaw = join(dir, 'theirs.raw');
  const oursRaw = join(dir, 'ours.raw');
  await qemuOk(['convert', '-O', 'raw', image, theirsRaw], cwd);
  expect(await convert(['-O', 'raw', image, oursRaw])).toBe(0);
  expect(await sha256File(oursRaw)).toBe(await sha256File(theirsRaw));
}

/**
 * Why a variant cannot be built for a config, and the step both tools must refuse: creating an image
 * with these extra -o options, or (`snapshot`) taking an internal snapshot of a valid image.
 */
interface Refusal {
  why: string;
  create?: Record<string, string | number>;
  snapshot?: true;
}

interface Variant {
  name: string;
  /** The refusal when the variant does not apply to a config (undefined: it does). */
  inapplicable?: (c: Config) => Refusal | undefined;
  /** Build the image; returns its path and the directory qemu must run in (relative data files). */
  build: (c: Config, dir: string) => Promise<{ image: string; cwd?: string }>;
}

/** A v3-only feature, refused at create time on compat=0.10. */
function v3Only(create: Record<string, string | number>): (c: Config) => Refusal | undefined {
  return (c) => (c.compat === '0.10' ? { why: 'needs compat=1.1', create } : undefined);
}

/** Extended L2 needs v3 and clusters of 16 KiB or more. */
const extendedL2Refusal = (c: Config): Refusal | undefined => v3Only({ extended_l2: 'on' })(c)
  ?? (c.clusterSize < 16 * KiB ? { why: 'extended L2 needs clusters of 16 KiB or more', create: { extended_l2: 'on' } } : undefined);

const VARIANTS: Variant[] = [
  {
    name: 'patterned, zero, discarded and compressed clusters',
    async build(c, dir) {
      const image = join(dir, 'img.qcow2');
      await create(image, c, virtualSize(c));
      await qemuIoOk(image, contentCommands(c, virtualSize(c)));
      return { image };
    },
  },
  {
    name: 'zstd compressed clusters (qemu-io write -c)',
    inapplicable: v3Only({ compression_type: 'zstd' }),
    async build(c, dir) {
      const image = join(dir, 'img.qcow2');
      await create(image, c, virtualSize(c), { compression_type: 'zstd' });
      await qemuIoOk(image, contentCommands(c, virtualSize(c)));
      return { image };
    },
  },
  ...(['zlib', 'zstd'] as const).map((type): Variant => ({
    name: `qemu-img convert -c (${type})`,
    inapplicable: type === 'zstd' ? v3Only({ compression_type: 'zstd' }) : undefined,
    async build(c, dir) {
      const raw = join(dir, 'src.raw');
      await qemuOk(['create', '-q', '-f', 'raw', raw, String(virtualSize(c))]);
      await qemuIoOk(raw, ['write -P 0x71 0 300000', `write -P 0x72 ${3 * MiB + 5} 1000000`, `write -P 0x73 ${virtualSize(c) - 4097} 4097`], { format: 'raw' });
      const image = join(dir, 'img.qcow2');
      await qemuOk(['convert', '-c', '-O', 'qcow2', '-o', options(c, type === 'zstd' ? { compression_type: 'zstd' } : {}), raw, image]);
      return { image };
    },
  })),
  {
    name: 'extended L2, subcluster-sized writes',
    inapplicable: extendedL2Refusal,
    async build(c, dir) {
      const sub = c.clusterSize / 32;
      const image = join(dir, 'img.qcow2');
      await create(image, c, virtualSize(c), { extended_l2: 'on' });
      await qemuIoOk(image, [
        `write -P 0x01 ${3 * sub + 100} 2000`, `write -P 0x02 ${c.clusterSize + 7 * sub} ${3 * sub}`, `write -z ${c.clusterSize + 20 * sub} ${2 * sub}`,
        `write -z ${4 * c.clusterSize} ${sub}`, `write -c -P 0x03 ${6 * c.clusterSize} ${c.clusterSize}`, `write -P 0x04 ${6 * c.clusterSize + sub} ${sub}`,
        `discard ${c.clusterSize + 7 * sub} ${sub}`,
      ]);
      return { image };
    },
  },
  {
    name: 'extended L2 overlay on a qcow2 backing file',
    inapplicable: extendedL2Refusal,
    async build(c, dir) {
      const sub = c.clusterSize / 32;
      const base = join(dir, 'base.qcow2');
      const image = join(dir, 'img.qcow2');
      await create(base, c, virtualSize(c));
      await qemuIoOk(base, [`write -P 0x61 0 ${4 * c.clusterSize}`]);
      await create(image, c, virtualSize(c), { extended_l2: 'on' }, { file: 'base.qcow2', format: 'qcow2' });
      await qemuIoOk(image, [`write -P 0x62 ${sub * 2} ${sub}`, `write -z ${c.clusterSize + sub * 4} ${sub * 3}`, `discard ${2 * c.clusterSize} ${c.clusterSize}`]);
      return { image };
    },
  },
  {
    name: 'lazy refcounts',
    inapplicable: v3Only({ lazy_refcounts: 'on' }),
    async build(c, dir) {
      const image = join(dir, 'img.qcow2');
      await create(image, c, virtualSize(c), { lazy_refcounts: 'on' });
      await qemuIoOk(image, contentCommands(c, virtualSize(c)));
      return { image };
    },
  },
  {
    name: 'lazy refcounts, left dirty (qemu-io abort)',
    inapplicable: v3Only({ lazy_refcounts: 'on' }),
    async build(c, dir) {
      const image = join(dir, 'img.qcow2');
      await create(image, c, virtualSize(c), { lazy_refcounts: 'on' });
      await qemuIo(image, [`write -P 0x21 ${c.clusterSize + 5} 9000`, 'flush', 'abort']);
      return { image };
    },
  },
  ...(['metadata', 'falloc', 'full'] as const).map((mode): Variant => ({
    name: `preallocation=${mode}`,
    async build(c, dir) {
      const image = join(dir, 'img.qcow2');
      await create(image, c, virtualSize(c), { preallocation: mode });
      await qemuIoOk(image, [`write -P 0x31 ${c.clusterSize * 3 + 11} 7000`, `write -z ${5 * MiB} ${2 * c.clusterSize}`]);
      return { image };
    },
  })),
  {
    name: '3-deep backing chain: qcow2 → qcow2 → shorter raw',
    async build(c, dir) {
      const size = virtualSize(c);
      const base = join(dir, 'base.raw');
      const mid = join(dir, 'mid.qcow2');
      const image = join(dir, 'img.qcow2');
      await qemuOk(['create', '-q', '-f', 'raw', base, String(4 * MiB)]);
      await qemuIoOk(base, ['write -P 0x07 0 65536', `write -P 0x08 ${MiB} ${MiB / 2}`, `write -P 0x09 ${4 * MiB - 512} 512`], { format: 'raw' });
      await create(mid, c, size / 2, {}, { file: 'base.raw', format: 'raw' });
      await qemuIoOk(mid, [`write -P 0x0a ${MiB / 2} 65536`, `write -P 0x0b ${3 * MiB + 1} 70000`, `write -z ${MiB + 4096} ${2 * c.clusterSize}`]);
      await create(image, c, size, {}, { file: 'mid.qcow2', format: 'qcow2' });
      await qemuIoOk(image, [`write -P 0x0c 32768 4096`, `write -z ${MiB} 65536`, `write -P 0x0d ${size - 5000} 5000`, `discard ${3 * MiB} ${2 * c.clusterSize}`]);
      return { image };
    },
  },
  {
    name: 'internal snapshots taken, then overwritten',
    inapplicable: (c) => (c.refcountBits < 2 ? { why: 'a snapshot needs refcounts of 2: refcount_bits ≥ 2', snapshot: true } : undefined),
    async build(c, dir) {
      const image = join(dir, 'img.qcow2');
      await create(image, c, virtualSize(c));
      await qemuIoOk(image, contentCommands(c, virtualSize(c)));
      await qemuOk(['snapshot', '-c', 'first', image]);
      await qemuIoOk(image, [`write -P 0x91 500 ${3 * c.clusterSize}`, `write -z ${8 * c.clusterSize} ${c.clusterSize}`, `discard ${5 * MiB} ${MiB}`]);
      await qemuOk(['snapshot', '-c', 'second one', image]);
      await qemuIoOk(image, [`write -P 0x92 ${2 * c.clusterSize} ${c.clusterSize + 1}`]);
      return { image };
    },
  },
  ...([false, true] as const).map((raw): Variant => ({
    name: `external data file${raw ? ' (data_file_raw=on)' : ''}`,
    inapplicable: v3Only({ data_file: 'img.data', ...(raw ? { data_file_raw: 'on' } : {}) }),
    async build(c, dir) {
      const image = join(dir, 'img.qcow2');
      await create(image, c, virtualSize(c), { data_file: 'img.data', ...(raw ? { data_file_raw: 'on' } : {}) }, undefined, dir);
      await qemuIoOk(image, contentCommands(c, virtualSize(c), { compressed: false }), { cwd: dir });
      return { image, cwd: dir };
    },
  })),
];

const CONFIGS: { config: Config; invalid?: Refusal }[] = (['0.10', '1.1'] as const).flatMap((compat) =>
  CLUSTER_SIZES.flatMap((clusterSize) => REFCOUNT_BITS.map((refcountBits) => ({
    config: { compat, clusterSize, refcountBits },
    ...(compat === '0.10' && refcountBits !== 16 ? { invalid: { why: 'refcount_bits other than 16 needs compat=1.1', create: {} } } : {}),
  }))));

/**
 * An impossible combination is refused by qemu-img and by us alike: the create (or the snapshot)
 * fails with both tools, and neither leaves an image behind (a snapshot we refuse leaves the image clean).
 */
async function expectBothRefuse(c: Config, refusal: Refusal, dir: string): Promise<void> {
  const size = String(virtualSize(c));
  if (refusal.create !== undefined) {
    const opts = options(c, refusal.create);
    const theirs = join(dir, 'theirs.qcow2');
    const ours = join(dir, 'ours.qcow2');
    const qemu = await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts, theirs, size], { cwd: dir });
    expect([opts, qemu.code === 0, await exists(theirs)]).toEqual([opts, false, false]);
    expect([opts, await ourOutcome(ourCreate, ['-q', '-f', 'qcow2', '-o', opts, ours, size]), await exists(ours)]).toEqual([opts, 'EINVAL', false]);
    return;
  }
  expect(refusal.snapshot).toBe(true);
  const image = join(dir, 'img.qcow2');
  await create(image, c, virtualSize(c));
  // Data clusters to share: an empty image snapshots fine even with 1-bit refcounts.
  await qemuIoOk(image, contentCommands(c, virtualSize(c)));
  const ours = join(dir, 'ours.qcow2');
  await copyFile(image, ours);
  expect((await run('qemu-img', ['snapshot', '-c', 'first', image])).code).not.toBe(0);
  expect(await ourOutcome(ourSnapshot, ['-c', 'first', ours])).toBe(1);
  // qemu-img leaks the snapshot L1 it had allocated (check exit 3); we refuse before allocating.
  expect([0, 3]).toContain((await run('qemu-img', ['check', image])).code);
  expect((await run('qemu-img', ['check', ours])).code).toBe(0);
  expect(await qemuOk(['snapshot', '-l', ours])).toBe('');
}

describe.skipIf(!hasQemu)('read matrix: convert -O raw, info and map equal qemu-img\'s', () => {
  const tmp = useTempDir('read-matrix');
  for (const { config, invalid } of CONFIGS) {
    describe(label(config), () => {
      for (const variant of VARIANTS) {
        const refusal = invalid ?? variant.inapplicable?.(config);
        if (refusal !== undefined) {
          it(`${variant.name} — not a valid combination (${refusal.why}): both tools refuse it`, async () => {
            await expectBothRefuse(config, refusal, tmp.path);
          });
          continue;
        }
        it(variant.name, async () => {
          const { image, cwd } = await variant.build(config, tmp.path);
          await expectSameAsQemu(image, tmp.path, cwd);
        });
      }
    });
  }
});
