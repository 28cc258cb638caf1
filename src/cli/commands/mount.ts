/**
 * `qcow2fuse mount [-o OPTS]... [-f] IMAGE MOUNTPOINT`
 *
 * By default the mount runs in a background daemon: this process spawns it, waits until the mount is
 * live, and exits 0 — or non-zero with the daemon's reason (image locked or invalid, mountpoint busy
 * or stale …). With -f the mount is served in this process until it is unmounted (Ctrl-C works).
 * The daemon is this same command re-run with an internal flag; its output goes to a log file in the
 * runtime directory (see src/fuse/runtime.ts).
 *
 * mount(8) reaches it as `qcow2fuse IMAGE MOUNTPOINT -o OPTIONS` (through mount.fuse3, for
 * `mount -t fuse.qcow2fuse` and fstab lines): main.ts turns that form into this command.
 */
import { realpath } from 'node:fs/promises';
import { resolve } from 'node:path';
import type { InspectableDevice } from '../../qcow2/engine/block-device.js';
import { CodedError } from '../../io/errors.js';
import { errorMessage, reportToParent, serveMount, startBackgroundMount } from '../../fuse/daemon.js';
import type { DeviceOpener } from '../../fuse/mount.js';
import { parseMountOptions, type DeviceOpenOptions, type MountOptions } from '../../fuse/options.js';
import { logPath, runtimeDir } from '../../fuse/runtime.js';
import { forceShareWarning } from '../force-share.js';

export const summary = 'mount an image as a raw file (plus inspection files) with FUSE';

/** Internal: marks the re-run that is the daemon; it reports to its parent on fd 3. */
export const DAEMON_FLAG = '--daemon-child';
const REPORT_FD = 3;

export const USAGE = `usage: qcow2fuse mount [-o OPTIONS]... [-f] IMAGE MOUNTPOINT

       qcow2fuse IMAGE MOUNTPOINT [-o OPTIONS]      (the same; the form mount(8) and fstab use)

Shows, in MOUNTPOINT: disk.raw (the guest contents, read-write), info.json, map.json, layout.txt,
check.json (generated when opened) and snapshots/NAME.raw (read-only snapshot views).
Runs in the background once the mount is live; unmount with \`qcow2fuse unmount MOUNTPOINT\`
(umount, fusermount -u, SIGINT and SIGTERM also close the image cleanly). The image is locked as
QEMU locks it: a mount is refused while another process writes the image, and keeps writers out.

  -f                 stay in the foreground
  -o OPTIONS         comma-separated, any of:
     ro | rw           read-only | read-write (the default)
     force-share       with ro: mount even while another process writes the image (qemu-img -U);
                       keeps nobody out; what is read may be stale or inconsistent
     compress          store full clusters compressed (implies direct_io unless kernel_cache)
     nogrow            keep the virtual size: truncate fails EPERM, writes past the end EFBIG
     direct_io         bypass the kernel page cache for the mounted files
     kernel_cache      keep the kernel page cache across opens
     cache=writeback|none|writethrough   host I/O mode (none = O_DIRECT)
     l2-cache-size=SIZE, refcount-cache-size=SIZE   table caches (K, M, G suffixes)
     allow_other       let other users access the mount
     name=NAME         name of the raw file (default disk.raw)
     attr_timeout=S, entry_timeout=S   kernel attribute/lookup cache in seconds (default 0, 1)
     writeback_cache | no_writeback_cache   the kernel caches writes and sends them coalesced
                       (default on for read-write mounts without compress, nogrow or direct_io);
                       fsync, close and unmount still write them back first
     dev, suid, exec, noatime, _netdev, nofail, noauto, user, defaults, x-systemd.*, comment=…
                       (what mount(8), mount.fuse3 and systemd pass): accepted and ignored`;

export interface MountArgs {
  optionSpecs: string[];
  foreground: boolean;
  daemonChild: boolean;
  help: boolean;
  image?: string;
  mountpoint?: string;
}

/** mount(8)'s helper flags (mount.TYPE SPEC DIR [-sfnv] [-o OPTS] [-t TYPE]), for /sbin/mount.fuse.qcow2fuse: ignored. */
const MOUNT_HELPER_FLAGS: readonly string[] = ['-n', '-s', '-v'];

/** Parse the command line; throws an EINVAL-coded error for a malformed one. */
export function parseMountArgs(argv: readonly string[]): MountArgs {
  const args: MountArgs = { optionSpecs: [], foreground: false, daemonChild: false, help: false };
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-h' || arg === '--help') args.help = true;
    else if (arg === '-f') args.foreground = true;
    else if (arg === DAEMON_FLAG) args.daemonChild = true;
    else if (MOUNT_HELPER_FLAGS.includes(arg)) continue;
    else if (arg === '-t') {
      const type = argv[++i];
      if (type !== 'fuse.qcow2fuse' && type !== 'qcow2fuse') throw new CodedError('EINVAL', `-t ${type ?? ''}: only fuse.qcow2fuse mounts are served`);
    }
    else if (arg === '-o') {
      const spec = argv[++i];
      if (spec === undefined) throw new CodedError('EINVAL', '-o needs an argument');
      args.optionSpecs.push(spec);
    } else if (arg.startsWith('-o')) args.optionSpecs.push(arg.slice(2));
    else if (arg === '--') {
      positional.push(...argv.slice(i + 1));
      break;
    }
    else if (arg.startsWith('-') && arg !== '-') throw new CodedError('EINVAL', `unknown option '${arg}'`);
    else positional.push(arg);
  }
  if (args.help) return args;
  if (positional.length !== 2) throw new CodedError('EINVAL', `expected IMAGE and MOUNTPOINT, got ${positional.length} argument(s)`);
  [args.image, args.mountpoint] = positional;
  return args;
}

/** The real opener: a qcow2 image (loaded on first use, so the memory-device tests do not load the driver). */
export const openQcow2Image: DeviceOpener = async (imagePath: string, options: DeviceOpenOptions): Promise<InspectableDevice> => {
  const { Qcow2Device } = await import('../../fuse/qcow2-device.js');
  return Qcow2Device.open(imagePath, options);
};

export interface MountEnvironment {
  opener: DeviceOpener;
  /** Arguments for process.execPath that re-run this command; the daemon flag and the user's arguments are appended. */
  daemonArgs: readonly string[];
}

const stderrLine = (line: string) => process.stderr.write(`${line}\n`);
const daemonLog = (line: string) => process.stderr.write(`${new Date().toISOString()} qcow2fuse[${process.pid}]: ${line}\n`);

async function mountpointKey(mountpoint: string): Promise<string> {
  return realpath(mountpoint).catch(() => mountpoint);
}

/**
 * The command with an injectable opener (tests run it over a memory device). The daemon and -f paths
 * end the process when the mount has ended: fuse-native's threads are not joined, so exiting is the
 * only reliable end.
 */
export async function runMount(argv: readonly string[], env: MountEnvironment): Promise<number> {
  let args: MountArgs;
  let options: MountOptions;
  try {
    args = parseMountArgs(argv);
    if (args.help) {
      process.stdout.write(`${USAGE}\n`);
      return 0;
    }
    options = parseMountOptions(args.optionSpecs);
  } catch (err) {
    stderrLine(`qcow2fuse mount: ${errorMessage(err)}\n${USAGE}`);
    return 1;
  }
  const image = resolve(args.image as string);
  const mountpoint = resolve(args.mountpoint as string);
  const logFile = logPath(await mountpointKey(mountpoint));
  if (options.forceShare) {
    const warning = forceShareWarning(image);
    if (warning !== undefined) (args.daemonChild ? daemonLog : stderrLine)(`qcow2fuse mount: ${warning}`);
  }
  const serve = { image, mountpoint, options, opener: env.opener, optionSpecs: args.optionSpecs, runtimeDir: runtimeDir(), logFile };

  if (args.daemonChild) {
    let code: number;
    try {
      daemonLog(`starting: ${image} on ${mountpoint}${args.optionSpecs.length > 0 ? ` -o ${args.optionSpecs.join(',')}` : ''}`);
      code = await serveMount({
        ...serve, log: daemonLog,
        onReady: () => {
          const failure = reportToParent(REPORT_FD, { ok: true, pid: process.pid });
          if (failure !== undefined) daemonLog(`could not tell the parent the mount is live (${failure.message}); serving anyway`);
        },
      });
    } catch (err) {
      daemonLog(`mount failed: ${errorMessage(err)}`);
      reportToParent(REPORT_FD, { ok: false, pid: process.pid, message: errorMessage(err) });
      code = 1;
    }
    process.exit(code);
  }

  if (args.foreground) {
    let code: number;
    try {
      code = await serveMount({
        ...serve, log: daemonLog,
        onReady: () => stderrLine(`qcow2fuse: ${image} mounted on ${mountpoint}; Ctrl-C or \`qcow2fuse unmount ${mountpoint}\` to unmount`),
      });
    } catch (err) {
      stderrLine(`qcow2fuse mount: ${errorMessage(err)}`);
      code = 1;
    }
    process.exit(code);
  }

  try {
    const daemonArgv = [DAEMON_FLAG, ...args.optionSpecs.flatMap((spec) => ['-o', spec]), '--', image, mountpoint];
    await startBackgroundMount({ args: [...env.daemonArgs, ...daemonArgv], logFile, runtimeDir: serve.runtimeDir });
    return 0;
  } catch (err) {
    stderrLine(`qcow2fuse mount: ${errorMessage(err)}`);
    return 1;
  }
}

export function run(argv: string[]): Promise<number> {
  return runMount(argv, { opener: openQcow2Image, daemonArgs: [...process.execArgv, process.argv[1], 'mount'] });
}
