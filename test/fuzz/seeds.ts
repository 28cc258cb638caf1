/**
 * Seed images for the fuzzer, made with qemu-img and qemu-io: every on-disk structure the driver
 * reads appears in at least one seed (v2 and v3 headers, 512 B to 2 MiB clusters, 1- to 64-bit
 * refcounts, extended L2, zlib and zstd compressed clusters, internal snapshots, a backing file,
 * persistent bitmaps, a dirty lazy-refcounts image). Small, so a case runs in well under a second.
 */
import { copyFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuImg, qemuIo } from '../helpers/qemu.js';

export interface Seed {
  name: string;
  path: string;
}

/** Name the backing file of the backing seed has; it must sit beside every case image. */
export const BACKING_NAME = 'fuzz-backing.qcow2';

const WRITES = ['write -P 0x11 0 200k', 'write -P 0x22 3M 64k', 'write -z 5M 64k', 'write -P 0x44 7M 128k'];
const COMPRESSED = ['write -c -P 0x33 4M 64k', 'write -c -P 0x35 6M 128k'];

interface SeedSpec {
  name: string;
  size: string;
  options: string;
  commands: string[];
  backing?: boolean;
  after?: (path: string) => Promise<void>;
}

async function must(result: Promise<{ code: number; stderr: string }>, what: string): Promise<void> {
  const r = await result;
  if (r.code !== 0) throw new Error(`${what} failed: ${r.stderr}`);
}

const SPECS: SeedSpec[] = [
  { name: 'v3-zlib', size: '16M', options: 'compat=1.1', commands: [...WRITES, ...COMPRESSED] },
  { name: 'v2', size: '16M', options: 'compat=0.10', commands: WRITES },
  { name: 'c512-r2', size: '4M', options: 'cluster_size=512,refcount_bits=2', commands: ['write -P 0x11 0 40k', 'write -P 0x22 1M 8k', 'write -c -P 0x33 2M 4k'] },
  { name: 'c4k-r64', size: '16M', options: 'cluster_size=4096,refcount_bits=64', commands: [...WRITES, ...COMPRESSED] },
  { name: 'c2m-r8', size: '16M', options: 'cluster_size=2M,refcount_bits=8', commands: ['write -P 0x11 0 200k', 'write -c -P 0x33 4M 2M'] },
  { name: 'extl2', size: '16M', options: 'extended_l2=on,cluster_size=64k', commands: [...WRITES, 'write -P 0x55 9M 4k', 'write -P 0x56 9478144 2k', ...COMPRESSED] },
  { name: 'zstd', size: '16M', options: 'compression_type=zstd', commands: [...WRITES, ...COMPRESSED] },
  {
    name: 'snapshots', size: '16M', options: '', commands: [...WRITES, ...COMPRESSED],
    after: async (path) => {
      await must(qemuImg(['snapshot', '-c', 's1', path]), 'snapshot');
      await must(qemuIo(path, ['write -P 0x66 0 64k', 'write -c -P 0x67 10M 64k']), 'qemu-io');
      await must(qemuImg(['snapshot', '-c', 'second', path]), 'snapshot');
      await must(qemuIo(path, ['write -P 0x68 3M 64k']), 'qemu-io');
    },
  },
  { name: 'backing', size: '16M', options: '', commands: ['write -P 0x77 64k 64k', 'write -c -P 0x78 8M 64k'], backing: true },
  {
    name: 'bitmaps', size: '16M', options: '', commands: WRITES,
    after: async (path) => {
      await must(qemuImg(['bitmap', '--add', path, 'b0']), 'bitmap');
      await must(qemuImg(['bitmap', '--add', '-g', '256k', path, 'b1']), 'bitmap');
    },
  },
  {
    name: 'dirty-lazy', size: '16M', options: 'lazy_refcounts=on', commands: [],
    after: async (path) => {
      // qemu-iotests 039: killed mid-session, refcounts stale, dirty bit set.
      await qemuIo(path, [...WRITES, 'sigraise 9'], { cache: 'writethrough' });
    },
  },
];

/** Build the seeds in `dir` (and the backing file the backing seed refers to). */
export async function makeSeeds(dir: string): Promise<Seed[]> {
  await mkdir(dir, { recursive: true });
  const backing = join(dir, BACKING_NAME);
  await must(qemuImg(['create', '-q', '-f', 'qcow2', backing, '16M']), 'create backing');
  await must(qemuIo(backing, ['write -P 0x99 0 1M', 'write -P 0x9a 12M 64k']), 'qemu-io backing');
  const seeds: Seed[] = [];
  for (const spec of SPECS) {
    const path = join(dir, `${spec.name}.qcow2`);
    const args = ['create', '-q', '-f', 'qcow2'];
    if (spec.options !== '') args.push('-o', spec.options);
    if (spec.backing === true) args.push('-b', BACKING_NAME, '-F', 'qcow2');
    args.push(path, spec.size);
    await must(qemuImg(args, { cwd: dir }), `create ${spec.name}`);
    if (spec.commands.length > 0) await must(qemuIo(path, spec.commands), `qemu-io ${spec.name}`);
    await spec.after?.(path);
    seeds.push({ name: spec.name, path });
  }
  return seeds;
}

/** Put the backing file beside the case images in `caseDir`. */
export async function provideBacking(seedDir: string, caseDir: string): Promise<void> {
  await copyFile(join(seedDir, BACKING_NAME), join(caseDir, BACKING_NAME));
}
