/** Mount option parsing and what the options turn into (device open options, libfuse options). */
import { describe, expect, it } from 'vitest';
import { parseMountArgs } from '../../../src/cli/commands/mount.js';
import { deviceOpenOptions, libfuse3Options, libfuseOptions, parseMountOptions, parseSize } from '../../../src/fuse/options.js';

const code = (fn: () => unknown) => {
  try {
    fn();
    return 'no error';
  } catch (err) {
    return `${(err as { code?: string }).code}: ${(err as Error).message}`;
  }
};

describe('parseSize', () => {
  it('accepts bytes and K/M/G/T suffixes (powers of 1024)', () => {
    expect(parseSize('4096')).toBe(4096);
    expect(parseSize('64K')).toBe(65536);
    expect(parseSize('32m')).toBe(32 * 1024 ** 2);
    expect(parseSize('2GiB')).toBe(2 * 1024 ** 3);
    expect(parseSize('1T')).toBe(1024 ** 4);
  });

  it('refuses anything else', () => {
    for (const bad of ['', 'x', '1.5M', '-1', '10Q', '99999999999999999999']) expect(code(() => parseSize(bad))).toMatch(/^EINVAL/);
  });
});

describe('parseMountOptions', () => {
  it('has sensible defaults', () => {
    expect(parseMountOptions([])).toEqual({
      readOnly: false, forceShare: false, compress: false, nogrow: false, kernelCache: 'default', allowOther: false, name: 'disk.raw', attrTimeout: 0,
      entryTimeout: 1, readaheadBytes: 1024 * 1024, transport: 'session', writebackCache: true,
    });
  });

  it('parses every option, across several -o lists', () => {
    expect(parseMountOptions(['ro,nogrow,cache=none,aio=threads', 'l2-cache-size=4M,refcount-cache-size=1M', 'allow_other,name=sda.img,kernel_cache',
      'attr_timeout=2.5,entry_timeout=10,readahead=4M,force-share,transport=fuse-native'])).toEqual({
      readOnly: true, forceShare: true, compress: false, nogrow: true, kernelCache: 'kernel_cache', hostCache: 'none', aio: 'threads', l2CacheBytes: 4 * 1024 ** 2,
      refcountCacheBytes: 1024 ** 2, allowOther: true, name: 'sda.img', attrTimeout: 2.5, entryTimeout: 10, readaheadBytes: 4 * 1024 ** 2,
      transport: 'fuse-native', writebackCache: false,
    });
    expect(parseMountOptions(['ro', 'rw']).readOnly).toBe(false);
  });

  it('refuses an unknown transport, and writeback_cache on fuse-native', () => {
    expect(code(() => parseMountOptions(['transport=fuse2']))).toMatch(/^EINVAL: invalid transport 'fuse2'/);
    expect(parseMountOptions(['writeback_cache']).writebackCache).toBe(true);
    expect(parseMountOptions(['transport=fuse-native']).writebackCache).toBe(false);
    expect(code(() => parseMountOptions(['writeback_cache,transport=fuse-native']))).toMatch(/^EINVAL: .*needs transport=session/);
  });

  it('has the kernel writeback cache by default on read-write, uncompressed, not direct_io session mounts; no_writeback_cache turns it off', () => {
    const wb = (...specs: string[]) => parseMountOptions(specs).writebackCache;
    expect([wb(), wb('kernel_cache'), wb('cache=none'), wb('no_writeback_cache'), wb('ro'), wb('compress'), wb('direct_io'), wb('nogrow')])
      .toEqual([true, true, true, false, false, false, false, false]);
    expect(code(() => parseMountOptions(['nogrow,writeback_cache']))).toMatch(/^EINVAL: mount options writeback_cache and nogrow exclude each other/);
    expect([wb('compress,writeback_cache'), wb('ro,writeback_cache'), wb('writeback_cache', 'no_writeback_cache')]).toEqual([true, true, false]);
    expect(parseMountOptions(['compress']).kernelCache).toBe('direct_io');
    expect(parseMountOptions(['compress,writeback_cache']).kernelCache).toBe('default');
  });

  it('force-share needs ro (QEMU: force-share=on can only be used with read-only images); the device opens force-shared', () => {
    expect(code(() => parseMountOptions(['force-share']))).toMatch(/^EINVAL: mount option force-share needs ro/);
    expect(code(() => parseMountOptions(['ro,force-share', 'rw']))).toMatch(/needs ro/);
    expect(deviceOpenOptions(parseMountOptions(['ro,force-share']))).toEqual({ readOnly: true, forceShare: true });
    expect(deviceOpenOptions(parseMountOptions(['ro']))).toEqual({ readOnly: true });
  });

  it('accepts and ignores what mount(8), mount.fuse3 and systemd pass from fstab', () => {
    const fromFstab = parseMountOptions(['rw,dev,suid,exec,noatime,_netdev,nofail,noauto,auto,user,nouser,users,owner,group,defaults',
      'nodev,nosuid,noexec,atime,relatime,norelatime,strictatime,nostrictatime,lazytime,nolazytime,diratime,nodiratime,sync,async,dirsync',
      'iversion,noiversion,mand,nomand,silent,loud,symfollow,nosymfollow,default_permissions,comment=vm disk',
      'x-systemd.automount,x-systemd.device-timeout=5,x-systemd.requires=a.service,X-mount.mkdir,context=system_u:object_r:tmp_t:s0']);
    expect(fromFstab).toEqual(parseMountOptions([]));
    expect(parseMountOptions(['ro,noauto,nofail,x-systemd.automount,allow_other'])).toEqual({ ...parseMountOptions([]), readOnly: true, allowOther: true, writebackCache: false });
  });

  it('uses direct_io for compressed mounts unless kernel_cache is asked for', () => {
    expect(parseMountOptions(['compress']).kernelCache).toBe('direct_io');
    expect(parseMountOptions(['compress,kernel_cache']).kernelCache).toBe('kernel_cache');
    expect(parseMountOptions(['direct_io']).kernelCache).toBe('direct_io');
    expect(code(() => parseMountOptions(['direct_io,kernel_cache']))).toMatch(/^EINVAL: .*exclude/);
  });

  it('refuses unknown options, bad values and bad names', () => {
    expect(code(() => parseMountOptions(['bogus']))).toBe("EINVAL: unknown mount option 'bogus'");
    expect(code(() => parseMountOptions(['cache=fast']))).toMatch(/^EINVAL: invalid cache mode/);
    expect(code(() => parseMountOptions(['aio=io_uring']))).toMatch(/^EINVAL: invalid aio mode/);
    expect(code(() => parseMountOptions(['ro=1']))).toMatch(/takes no value/);
    expect(code(() => parseMountOptions(['name=']))).toMatch(/needs a value/);
    expect(code(() => parseMountOptions(['name=a/b']))).toMatch(/invalid name/);
    expect(code(() => parseMountOptions(['name=info.json']))).toMatch(/taken by an inspection file/);
    expect(code(() => parseMountOptions(['attr_timeout=-1']))).toMatch(/invalid attr_timeout/);
    expect(code(() => parseMountOptions(['l2-cache-size=lots']))).toMatch(/invalid size/);
    expect(code(() => parseMountOptions(['readahead=1000']))).toMatch(/multiple of 1K/);
  });
});

describe('what the options turn into', () => {
  it('device open options carry only what was set', () => {
    expect(deviceOpenOptions(parseMountOptions([]))).toEqual({ readOnly: false });
    expect(deviceOpenOptions(parseMountOptions(['ro,compress,cache=writethrough,aio=threads,l2-cache-size=1M,refcount-cache-size=256K']))).toEqual({
      readOnly: true, compress: true, cache: 'writethrough', aio: 'threads', l2CacheBytes: 1024 ** 2, refcountCacheBytes: 256 * 1024,
    });
  });

  it('libfuse options always include big_writes and max_write=131072', () => {
    const list = libfuseOptions(parseMountOptions([]), '/images/a.qcow2');
    expect(list).toEqual(expect.arrayContaining(['big_writes', 'max_write=131072', 'default_permissions', 'subtype=qcow2fuse',
      'attr_timeout=0', 'entry_timeout=1', 'fsname=/images/a.qcow2']));
    expect(list).not.toContain('ro');
    expect(libfuseOptions(parseMountOptions(['ro,allow_other,compress']), '/i')).toEqual(expect.arrayContaining(['ro', 'allow_other', 'direct_io']));
    expect(libfuseOptions(parseMountOptions(['kernel_cache']), '/i')).toContain('kernel_cache');
  });

  it('libfuse 3 options carry only mount options (sizes, timeouts and caching are negotiated or per reply)', () => {
    expect(libfuse3Options(parseMountOptions([]), '/a,b\\c')).toEqual(['default_permissions', 'subtype=qcow2fuse', 'fsname=/a\\,b\\\\c']);
    expect(libfuse3Options(parseMountOptions(['ro,allow_other,compress']), '/i')).toEqual(
      ['default_permissions', 'subtype=qcow2fuse', 'fsname=/i', 'ro', 'allow_other']);
  });

  it('escapes commas in the image path and drops an overlong one', () => {
    expect(libfuseOptions(parseMountOptions([]), '/a,b\\c')).toContain('fsname=/a\\,b\\\\c');
    const long = libfuseOptions(parseMountOptions([]), `/${'x'.repeat(2000)}`);
    expect(long).toContain('fsname=qcow2fuse');
    expect(long.join(',').length).toBeLessThan(1000);
  });
});

describe('mount command line', () => {
  it('parses -o (separate or joined), -f and the two paths', () => {
    expect(parseMountArgs(['-o', 'ro', '-onogrow', '-f', 'a.qcow2', 'mnt'])).toEqual({
      optionSpecs: ['ro', 'nogrow'], foreground: true, daemonChild: false, help: false, image: 'a.qcow2', mountpoint: 'mnt',
    });
    expect(parseMountArgs(['--', '-weird.qcow2', 'mnt']).image).toBe('-weird.qcow2');
    expect(parseMountArgs(['--help']).help).toBe(true);
  });

  it('refuses malformed command lines', () => {
    expect(code(() => parseMountArgs(['a.qcow2']))).toMatch(/^EINVAL: expected IMAGE and MOUNTPOINT/);
    expect(code(() => parseMountArgs(['a', 'b', 'c']))).toMatch(/^EINVAL/);
    expect(code(() => parseMountArgs(['-x', 'a', 'b']))).toBe("EINVAL: unknown option '-x'");
    expect(code(() => parseMountArgs(['a', 'b', '-o']))).toMatch(/-o needs an argument/);
  });
});
