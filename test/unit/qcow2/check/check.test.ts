/**
 * check on consistent images of every kind qemu-img makes: the report equals qemu-img check's (same
 * keys, same counts, same allocated/fragmented/compressed figures), the human and JSON texts are
 * qemu-img's byte for byte, and the CLI's exit codes and failure reporting follow qemu-img.
 */
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { checkExitCode, formatCheckHuman, formatRepairedBanner, parseCheckArgs, run } from '../../../../src/cli/commands/check.js';
import { qemuJson } from '../../../../src/cli/output.js';
import { CheckFailedError, checkImage } from '../../../../src/qcow2/check/check.js';
import { Qcow2Image } from '../../../../src/qcow2/engine/image.js';
import { patternBuffer } from '../../../helpers/patterns.js';
import { qemuImg, qemuImgCheck, qemuImgCreate, qemuIoOk, type QemuOptionValue } from '../../../helpers/qemu.js';
import { useTempDir } from '../../../helpers/tmp.js';
import { requireTools } from '../../../helpers/tools.js';

const hasQemu = requireTools('qemu-img', 'qemu-io');

interface Kind {
  name: string;
  options: Record<string, QemuOptionValue>;
  writes: string[];
  setup?: (path: string) => Promise<void>;
}

const WRITES = ['write -P 0x11 0 300k', 'write -P 0x22 5M 64k', 'write -c -P 0x33 8M 256k', 'write -z 12M 128k', 'write -P 0x44 40M 1M'];

const KINDS: Kind[] = [
  { name: 'default (compat 1.1, 64 KiB clusters)', options: {}, writes: WRITES },
  { name: 'compat 0.10', options: { compat: '0.10' }, writes: WRITES },
  { name: '512-byte clusters, 1-bit refcounts', options: { cluster_size: 512, refcount_bits: 1 }, writes: ['write -P 0x11 0 300k', 'write -P 0x22 5M 64k'] },
  { name: '4 KiB clusters, 64-bit refcounts', options: { cluster_size: 4096, refcount_bits: 64 }, writes: WRITES },
  { name: '2 MiB clusters, 8-bit refcounts', options: { cluster_size: 2 * 1024 * 1024, refcount_bits: 8 }, writes: ['write -P 0x11 0 300k', 'write -c -P 0x33 8M 2M', 'write -P 0x44 40M 1M'] },
  { name: 'extended L2', options: { extended_l2: true }, writes: [...WRITES, 'write -P 0x55 20M 4k'] },
  { name: 'zstd compression', options: { compression_type: 'zstd' }, writes: WRITES },
  { name: 'lazy refcounts', options: { lazy_refcounts: true }, writes: WRITES },
  { name: 'preallocation=metadata', options: { preallocation: 'metadata' }, writes: ['write -P 0x11 0 300k'] },
  {
    name: 'internal snapshots (shared clusters, refcount 2)',
    options: {},
    writes: WRITES,
    setup: async (path) => {
      await qemuImg(['snapshot', '-c', 's1', path]);
      await qemuIoOk(path, ['write -P 0x66 0 64k', 'write -c -P 0x77 16M 64k']);
      await qemuImg(['snapshot', '-c', 's2', path]);
    },
  },
  {
    name: 'persistent bitmaps',
    options: {},
    writes: WRITES,
    setup: async (path) => {
      await qemuImg(['bitmap', '--add', path, 'b0']);
      await qemuImg(['bitmap', '--add', '-g', '128k', path, 'b1']);
    },
  },
];

describe.skipIf(!hasQemu)('check on consistent images', () => {
  const tmp = useTempDir('check');

  for (const kind of KINDS) {
    it(`reports what qemu-img reports: ${kind.name}`, async () => {
      const path = tmp.file('a.qcow2');
      await qemuImgCreate(path, '64M', kind.options);
      await qemuIoOk(path, kind.writes);
      await kind.setup?.(path);
      const qemu = await qemuImgCheck(path);
      const human = await qemuImg(['check', '-f', 'qcow2', path]);
      const image = await Qcow2Image.open(path, { readOnly: true, check: true });
      try {
        const report = await checkImage(image);
        expect(report).toEqual(qemu.report);
        expect(checkExitCode(report)).toBe(qemu.code);
        expect(formatCheckHuman(report)).toBe(human.stdout);
        const json = await qemuImg(['check', '-f', 'qcow2', '--output=json', path]);
        expect(qemuJson(report)).toBe(json.stdout);
      } finally {
        await image.close();
      }
    });
  }

  it('checks an image we are writing, from the live caches', async () => {
    const path = tmp.file('live.qcow2');
    await qemuImgCreate(path, '64M');
    const image = await Qcow2Image.open(path, { readOnly: false });
    try {
      for (let i = 0; i < 40; i++) await image.write(i * 1_000_003, patternBuffer(70_000, i, i * 1_000_003));
      const report = await checkImage(image);
      expect(report['check-errors']).toBe(0);
      expect(report.corruptions).toBeUndefined();
      expect(report.leaks).toBeUndefined();
      expect(report['allocated-clusters']).toBeGreaterThan(40);
    } finally {
      await image.close();
    }
    expect((await qemuImgCheck(path)).code).toBe(0);
  });

  it('reports progress up to the total', async () => {
    const path = tmp.file('p.qcow2');
    await qemuImgCreate(path, '1G');
    await qemuIoOk(path, ['write -P 1 0 1M', 'write -P 2 900M 1M']);
    const image = await Qcow2Image.open(path, { readOnly: true });
    const seen: [number, number][] = [];
    try {
      await checkImage(image, { onProgress: (done, total) => seen.push([done, total]) });
    } finally {
      await image.close();
    }
    expect(seen.length).toBeGreaterThan(0);
    for (const [done, total] of seen) expect(done).toBeLessThanOrEqual(total);
    expect(seen[seen.length - 1][0]).toBe(seen[seen.length - 1][1]);
  });

  it('refuses to repair an image opened read-only', async () => {
    const path = tmp.file('ro.qcow2');
    await qemuImgCreate(path, '64M');
    const image = await Qcow2Image.open(path, { readOnly: true });
    try {
      await expect(checkImage(image, { repair: 'all' })).rejects.toMatchObject({ code: 'EROFS' });
    } finally {
      await image.close();
    }
  });

  it('fails like qemu-img when -r leaks would need a refcount rebuild', async () => {
    const path = tmp.file('rebuild.qcow2');
    await qemuImgCreate(path, '64M');
    await qemuIoOk(path, ['write -P 1 0 128k']);
    const bytes = await readFile(path);
    const refblock = Number(bytes.readBigUInt64BE(Number(bytes.readBigUInt64BE(48))));
    bytes.writeUInt16BE(0, refblock + 4 * 2); // a data cluster's refcount: 0
    await writeFile(path, bytes);
    const copy = tmp.file('rebuild-qemu.qcow2');
    await copyFile(path, copy);
    const qemu = await qemuImgCheck(copy, 'leaks');
    expect(qemu.code).toBe(1);
    expect(qemu.report).toBeUndefined();
    const image = await Qcow2Image.open(path, { readOnly: false, check: true });
    try {
      const messages: string[] = [];
      const failure = await checkImage(image, { repair: 'leaks', onMessage: (line) => messages.push(line) }).catch((err: unknown) => err);
      expect(failure).toBeInstanceOf(CheckFailedError);
      expect((failure as CheckFailedError).message).toBe('Check failed: Input/output error');
      expect(messages).toContain('ERROR need to rebuild refcount structures');
      expect(qemu.stderr).toContain('ERROR need to rebuild refcount structures');
    } finally {
      await image.close();
    }
  });
});

describe.skipIf(!hasQemu)('qcow2fuse check (CLI)', () => {
  const tmp = useTempDir('check-cli');
  let stdout = '';
  let stderr = '';

  function capture(): void {
    stdout = '';
    stderr = '';
    const fake = (sink: 'out' | 'err') => (chunk: string | Uint8Array, ...rest: unknown[]): boolean => {
      const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString();
      if (sink === 'out') stdout += text;
      else stderr += text;
      const callback = rest.find((r): r is (err?: Error) => void => typeof r === 'function');
      callback?.();
      return true;
    };
    vi.spyOn(process.stdout, 'write').mockImplementation(fake('out'));
    vi.spyOn(process.stderr, 'write').mockImplementation(fake('err'));
  }

  afterEach(() => {
    vi.restoreAllMocks();
  });

  async function leakyImage(path: string): Promise<void> {
    await qemuImgCreate(path, '64M');
    await qemuIoOk(path, ['write -P 1 0 128k']);
    const bytes = await readFile(path);
    const refblock = Number(bytes.readBigUInt64BE(Number(bytes.readBigUInt64BE(48))));
    const spare = Math.ceil(bytes.length / 65536);
    bytes.writeUInt16BE(1, refblock + spare * 2);
    await writeFile(path, Buffer.concat([bytes, Buffer.alloc(spare * 65536 + 65536 - bytes.length)]));
  }

  it('parses qemu-img check arguments', () => {
    expect(parseCheckArgs(['-r', 'all', '--output=json', '-p', 'x.qcow2'])).toEqual({ path: 'x.qcow2', repair: 'all', json: true, progress: true, quiet: false, forceShare: false });
    expect(parseCheckArgs(['-f', 'qcow2', '-q', 'x.qcow2'])).toEqual({ path: 'x.qcow2', repair: undefined, json: false, progress: false, quiet: true, forceShare: false });
    expect(parseCheckArgs(['-U', 'x.qcow2'])).toMatchObject({ forceShare: true });
    expect(parseCheckArgs(['--force-share', 'x.qcow2'])).toMatchObject({ forceShare: true });
    expect(parseCheckArgs(['--help'])).toBe('help');
    expect(() => parseCheckArgs(['-r', 'some', 'x.qcow2'])).toThrow(/leaks or all/);
    expect(() => parseCheckArgs(['-f', 'raw', 'x.qcow2'])).toThrow(/qcow2/);
    expect(() => parseCheckArgs([])).toThrow(/FILENAME/);
  });

  it('exits 3 on leaks only, prints what qemu-img prints, and -r leaks repairs like qemu-img', async () => {
    const ours = tmp.file('leak.qcow2');
    await leakyImage(ours);
    const theirs = tmp.file('leak-qemu.qcow2');
    await copyFile(ours, theirs);
    const qemu = await qemuImg(['check', '-f', 'qcow2', theirs]);
    capture();
    expect(await run([ours])).toBe(qemu.code);
    expect(qemu.code).toBe(3);
    expect(stdout).toBe(qemu.stdout);
    expect(stderr).toContain('Leaked cluster');

    const qemuRepair = await qemuImg(['check', '-f', 'qcow2', '-r', 'leaks', theirs]);
    capture();
    expect(await run(['-r', 'leaks', ours])).toBe(0);
    expect(stdout).toBe(qemuRepair.stdout);
    expect(stdout.startsWith(formatRepairedBanner({ filename: ours, format: 'qcow2', 'check-errors': 0, 'leaks-fixed': 1 }))).toBe(true);
    expect((await qemuImgCheck(ours)).code).toBe(0);
  });

  it('exits 2 on corruptions, 0 after -r all, and prints the JSON qemu-img prints', async () => {
    const ours = tmp.file('c.qcow2');
    await qemuImgCreate(ours, '64M');
    await qemuIoOk(ours, ['write -P 1 0 128k']);
    const bytes = await readFile(ours);
    const l1 = Number(bytes.readBigUInt64BE(40));
    bytes.writeUInt32BE(bytes.readUInt32BE(l1) & 0x7fffffff, l1); // clear COPIED on L1[0]
    await writeFile(ours, bytes);
    const theirs = tmp.file('c-qemu.qcow2');
    await copyFile(ours, theirs);
    const qemu = await qemuImg(['check', '-f', 'qcow2', '--output=json', theirs]);
    capture();
    expect(await run(['--output=json', ours])).toBe(2);
    expect(qemu.code).toBe(2);
    expect(stdout).toBe(qemu.stdout.replace(theirs, ours));
    capture();
    expect(await run(['-r', 'all', '-p', ours])).toBe(0);
    expect(stderr).toContain('Repairing OFLAG_COPIED L2 cluster');
    expect(stderr).toContain('(100.00/100%)');
    expect((await qemuImgCheck(ours)).code).toBe(0);
  });

  it('exits 1 when the image cannot be opened or the check cannot run', async () => {
    capture();
    expect(await run([tmp.file('missing.qcow2')])).toBe(1);
    expect(stderr).toContain('Could not open');
    expect(stdout).toBe('');
    const path = tmp.file('r.qcow2');
    await qemuImgCreate(path, '64M');
    await qemuIoOk(path, ['write -P 1 0 128k']);
    const bytes = await readFile(path);
    const refblock = Number(bytes.readBigUInt64BE(Number(bytes.readBigUInt64BE(48))));
    bytes.writeUInt16BE(0, refblock + 4 * 2);
    await writeFile(path, bytes);
    capture();
    expect(await run(['-r', 'leaks', path])).toBe(1);
    expect(stderr).toContain('Check failed: Input/output error');
    expect(stdout).toBe('');
  });
});
