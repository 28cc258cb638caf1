/**
 * `qcow2fuse unmount MOUNTPOINT`: unmount, and return only once the image is flushed, closed and
 * unlocked (the mount's daemon has exited). Exit 0 on a clean close, 1 otherwise (with the reason).
 */
import { errorMessage, unmountMountpoint } from '../../fuse/daemon.js';

export const summary = 'unmount a mounted image; returns once it is flushed, closed and unlocked';

const USAGE = `usage: qcow2fuse unmount MOUNTPOINT

Unmounts MOUNTPOINT (refused while files in it are open) and waits until the daemon has flushed,
closed and unlocked the image. A mount whose daemon died is cleared and reported.`;

export async function run(argv: string[]): Promise<number> {
  if (argv.includes('-h') || argv.includes('--help')) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  if (argv.length !== 1 || argv[0].startsWith('-')) {
    process.stderr.write(`qcow2fuse unmount: expected one MOUNTPOINT\n${USAGE}\n`);
    return 1;
  }
  try {
    await unmountMountpoint({
      mountpoint: argv[0],
      onSlowClose: (state) => process.stderr.write(`qcow2fuse: waiting for the daemon (pid ${state.pid}) to flush and close ${state.image}…\n`),
    });
    return 0;
  } catch (err) {
    process.stderr.write(`qcow2fuse unmount: ${errorMessage(err)}\n`);
    return 1;
  }
}
