/**
 * Mounts as mount(8), /etc/fstab and systemd make them: `mount -t fuse.qcow2fuse IMAGE MNT -o …` and a
 * fstab line mounted with `mount -T FSTAB MNT` go through mount.fuse3, which runs
 * `qcow2fuse IMAGE MNT -o OPTIONS` through /bin/sh with mount(8)'s sanitised environment (no PATH:
 * the shell's default /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin). `umount` ends
 * the mount and the daemon flushes and closes the image.
 *
 * So that nothing outside the test is touched, each scenario runs in a private mount namespace
 * (`unshare -m`) in which a temp directory holding a `qcow2fuse` wrapper (exec node
 * dist/src/cli/main.js) is bind-mounted over /usr/local/sbin; the FUSE mounts live and die in that
 * namespace. Writes land as pattern data checked with qemu-img afterwards, and every image ends
 * with `qemu-img check`.
 */
import { chmod, mkdir, readFile, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { run } from '../helpers/exec.js';
import { writePatternFile } from '../helpers/files.js';
import { expectPattern } from '../helpers/patterns.js';
import { qemuImgCheckClean, qemuImgCreate } from '../helpers/qemu.js';
import { tempDir } from '../helpers/tmp.js';
import { requireFuse, requireTools } from '../helpers/tools.js';
import { checkBuild, CLI } from './mount-harness.js';

const MiB = 1024 * 1024;
const ready = requireFuse() && requireTools('qemu-img', 'qemu-io', 'mount', 'umount', 'unshare', 'findmnt', 'dd', 'cmp', '/sbin/mount.fuse3');

/** The options mount(8), mount.fuse3 and systemd hand a FUSE helper from a busy fstab line. */
const MOUNT8_OPTIONS = 'rw,dev,suid,exec,noatime,_netdev,nofail,users,defaults,comment=qcow2fuse-test,x-systemd.device-timeout=5';

interface Scenario {
  dir: string;
  image: string;
  mnt: string;
  out: string;
}

async function scenario(): Promise<Scenario> {
  await checkBuild();
  const dir = await tempDir('fstab');
  const bin = join(dir, 'bin');
  const mnt = join(dir, 'mnt');
  const out = join(dir, 'out');
  await Promise.all([mkdir(bin), mkdir(mnt), mkdir(out)]);
  // What `npm install -g` puts on PATH, as a wrapper: mount(8) clears PATH, so node is named in full.
  await writeFile(join(bin, 'qcow2fuse'), `#!/bin/sh\nQCOW2FUSE_RUNTIME_DIR='${join(dir, 'run')}' exec '${process.execPath}' '${CLI}' "$@"\n`);
  await chmod(join(bin, 'qcow2fuse'), 0o755);
  const image = join(dir, 'vm.qcow2');
  await qemuImgCreate(image, 16 * MiB);
  return { dir, image, mnt, out };
}

/**
 * Run `body` (bash) in a private mount namespace where `qcow2fuse` is on the shell's default PATH.
 * Helpers there: `closed` waits until the image is closed after a umount (qemu-img info gets its
 * reader locks again); on any exit the mountpoint is unmounted, so no daemon outlives the test.
 */
async function inNamespace(s: Scenario, body: string): Promise<{ code: number; stdout: string; stderr: string }> {
  const script = `set -euo pipefail
IMG='${s.image}'; MNT='${s.mnt}'; OUT='${s.out}'; DIR='${s.dir}'
trap 'umount "$MNT" 2>/dev/null || true' EXIT
mount --bind "$DIR/bin" /usr/local/sbin
closed() {
  for _ in $(seq 1 300); do qemu-img info "$IMG" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "image still open 30 s after umount" >&2; return 1
}
${body}
`;
  return run('unshare', ['--mount', '--propagation', 'private', 'bash', '-c', script], { timeoutMs: 110_000 });
}

/** The guest bytes [guestOffset, +bytes) of `image` hold the pattern file written by writePatternFile(…, seed). */
async function expectGuest(image: string, guestOffset: number, bytes: number, seed: number): Promise<void> {
  const raw = join(image.replace(/\.qcow2$/, ''), '..', `check-${seed}.raw`);
  const converted = await run('qemu-img', ['convert', '-O', 'raw', image, raw]);
  expect(converted.stderr).toBe('');
  const data = await readFile(raw);
  expectPattern(data.subarray(guestOffset, guestOffset + bytes), seed, 0);
}

describe.skipIf(!ready)('mount(8) and fstab mounts', () => {
  it('mount -t fuse.qcow2fuse with mount(8)/systemd options writes; umount flushes and closes the image', async () => {
    const s = await scenario();
    await writePatternFile(join(s.dir, 'data1'), MiB, 11);
    const result = await inNamespace(s, `
mount -t fuse.qcow2fuse "$IMG" "$MNT" -o '${MOUNT8_OPTIONS}'
findmnt -n -o FSTYPE,SOURCE,OPTIONS "$MNT" > "$OUT/findmnt"
dd if="$DIR/data1" of="$MNT/disk.raw" bs=64k seek=32 conv=notrunc,fsync status=none
cmp -n ${MiB} -i 0:${2 * MiB} "$DIR/data1" "$MNT/disk.raw"
umount "$MNT"
closed
`);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const [fsType, source, options] = (await readFile(join(s.out, 'findmnt'), 'utf8')).trim().split(/\s+/);
    expect(fsType).toBe('fuse.qcow2fuse');
    expect(source).toBe(s.image);
    expect(options.split(',')).toContain('rw');
    await qemuImgCheckClean(s.image);
    await expectGuest(s.image, 2 * MiB, MiB, 11);
  });

  it('an fstab line (ro,noauto,nofail,x-systemd.automount and rw) mounts with mount -T; a ro mount keeps qemu-io out', async () => {
    const s = await scenario();
    await writePatternFile(join(s.dir, 'data2'), MiB, 12);
    const rwLine = `${s.image} ${s.mnt} fuse.qcow2fuse rw,noauto,nofail,_netdev,noatime,x-systemd.automount 0 0`;
    const roLine = `${s.image} ${s.mnt} fuse.qcow2fuse ro,noauto,nofail,x-systemd.automount,allow_other 0 0`;
    const result = await inNamespace(s, `
printf '%s\\n' '${rwLine}' > "$DIR/fstab.rw"
printf '%s\\n' '${roLine}' > "$DIR/fstab.ro"
mount -T "$DIR/fstab.rw" "$MNT"
dd if="$DIR/data2" of="$MNT/disk.raw" bs=1M seek=5 conv=notrunc status=none
umount "$MNT"
closed
mount -T "$DIR/fstab.ro" "$MNT"
findmnt -n -o OPTIONS "$MNT" > "$OUT/findmnt"
cmp -n ${MiB} -i 0:${5 * MiB} "$DIR/data2" "$MNT/disk.raw"
if dd if=/dev/zero of="$MNT/disk.raw" bs=512 count=1 conv=notrunc status=none 2> "$OUT/dd.err"; then echo "wrote to a ro mount" >&2; exit 1; fi
if qemu-io -c 'write 0 512' "$IMG" > /dev/null 2> "$OUT/qemu-io.err"; then echo "qemu-io wrote under a ro mount" >&2; exit 1; fi
qemu-img info "$IMG" > /dev/null
umount "$MNT"
closed
`);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    expect((await readFile(join(s.out, 'findmnt'), 'utf8')).split(',')).toContain('ro');
    expect(await readFile(join(s.out, 'dd.err'), 'utf8')).toContain('Read-only file system');
    expect(await readFile(join(s.out, 'qemu-io.err'), 'utf8')).toContain('Failed to get "write" lock');
    await qemuImgCheckClean(s.image);
    await expectGuest(s.image, 5 * MiB, MiB, 12);
  });

  it('a /sbin/mount.fuse.qcow2fuse link to qcow2fuse lets mount(8) run it directly, without mount.fuse3', async () => {
    const s = await scenario();
    await writePatternFile(join(s.dir, 'data3'), MiB, 13);
    // A directory holding only the link hides /usr/sbin (= /sbin) in the namespace: no mount.fuse3 there.
    await mkdir(join(s.dir, 'sbin'));
    await symlink(join(s.dir, 'bin', 'qcow2fuse'), join(s.dir, 'sbin', 'mount.fuse.qcow2fuse'));
    const result = await inNamespace(s, `
mount --bind "$DIR/sbin" /usr/sbin
test ! -e /sbin/mount.fuse3
mount -t fuse.qcow2fuse "$IMG" "$MNT" -o '${MOUNT8_OPTIONS}'
dd if="$DIR/data3" of="$MNT/disk.raw" bs=1M seek=9 conv=notrunc status=none
umount "$MNT"
closed
`);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    await qemuImgCheckClean(s.image);
    await expectGuest(s.image, 9 * MiB, MiB, 13);
  });
});
