import { describe, expect, it } from 'vitest';
import { parseConvertArgs } from '../../../src/cli/commands/convert.js';
import { readWriteMountsOf } from '../../../src/convert/host-source.js';
import { hasQcow2Magic } from '../../../src/convert/source.js';

describe('convert arguments (qemu-img convert)', () => {
  it('maps every option', () => {
    const a = parseConvertArgs(['-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4k,compression_type=zstd', '-c', '-p', '-S', '64k', '-B', 'base.qcow2', '-F', 'qcow2',
      '-m', '4', '-t', 'writeback', '-T', 'none', 'in.raw', 'out.qcow2']);
    expect(a).toEqual({
      source: 'in.raw', dest: 'out.qcow2', progress: true,
      options: {
        sourceFormat: 'raw', outputFormat: 'qcow2', compress: true, minSparseBytes: 65536, backingFile: 'base.qcow2', backingFormat: 'qcow2',
        jobs: 4, cache: 'writeback', sourceCache: 'none', createOptions: { clusterSize: 4096, compressionType: 'zstd' },
      },
    });
    expect(parseConvertArgs(['-n', '-q', '-p', '-l', 'snapshot.name=x', 'a', 'b'])).toEqual({
      source: 'a', dest: 'b', progress: false, options: { outputFormat: 'raw', noCreate: true, snapshot: { name: 'x' } },
    });
  });

  it('takes -o size= as the size a stream must have (qemu-img takes the size from the source)', () => {
    expect(parseConvertArgs(['-O', 'qcow2', '-o', 'size=1G', '-', 'out.qcow2']).options).toMatchObject({ expectedBytes: 2 ** 30, createOptions: {} });
    expect(parseConvertArgs(['-O', 'qcow2', '-o', 'size=1G', 'in.raw', 'out.qcow2']).options.expectedBytes).toBeUndefined();
  });

  it('rejects what qemu-img rejects, with its messages', () => {
    expect(() => parseConvertArgs(['-S', '1000', 'a', 'b'])).toThrow(/multiples of 512 up to 16777216/);
    expect(() => parseConvertArgs(['-m', '17', 'a', 'b'])).toThrow(/between 1 and 16/);
    expect(() => parseConvertArgs(['-c', '-O', 'raw', 'a', 'b'])).toThrow(/Compression not supported/);
    expect(() => parseConvertArgs(['-f', 'vmdk', 'a', 'b'])).toThrow(/raw or qcow2/);
    expect(() => parseConvertArgs(['-t', 'bogus', 'a', 'b'])).toThrow(/invalid cache mode/);
    expect(() => parseConvertArgs(['-F', 'raw', 'a', 'b'])).toThrow(/-F needs -B/);
    expect(() => parseConvertArgs(['-O', 'qcow2', 'a', '-'])).toThrow(/stdout/);
  });
});

describe('convert source helpers', () => {
  it('finds read-write mounts of a device in mountinfo', () => {
    const mountinfo = [
      '36 35 7:3 / /mnt/a rw,relatime shared:1 - ext4 /dev/loop3 rw',
      '37 35 7:3 / /mnt/b ro,relatime shared:2 - ext4 /dev/loop3 ro',
      '38 35 7:4 / /mnt/with\\040space rw,relatime - ext4 /dev/loop4 rw',
      '39 35 259:1 / /data rw - xfs /dev/nvme0n1p1 rw',
    ].join('\n');
    expect(readWriteMountsOf(mountinfo, 7 * 256 + 3)).toEqual(['/mnt/a']);
    expect(readWriteMountsOf(mountinfo, 7 * 256 + 4)).toEqual(['/mnt/with space']);
    expect(readWriteMountsOf(mountinfo, 259 * 256 + 1)).toEqual(['/data']);
    expect(readWriteMountsOf(mountinfo, 8 * 256)).toEqual([]);
  });

  it('probes the qcow2 magic as qemu-img does', () => {
    expect(hasQcow2Magic(Buffer.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]))).toBe(true);
    expect(hasQcow2Magic(Buffer.from('QFI'))).toBe(false);
    expect(hasQcow2Magic(Buffer.alloc(512))).toBe(false);
  });
});
