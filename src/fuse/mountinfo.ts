/**
 * The mount table as the kernel shows it (/proc/self/mountinfo, proc(5)): the checks before a mount,
 * the mount's id and bdi once made, and — for fuse-native only, which does not notice an external
 * `umount` — the poll that learns its mount is gone.
 */
import { readFile } from 'node:fs/promises';

export interface MountEntry {
  mountId: number;
  /** The mount's device as 'major:minor' (for a FUSE mount, also the name of its bdi in /sys/class/bdi). */
  device: string;
  /** Absolute mount point, octal escapes decoded. */
  mountPoint: string;
  /** e.g. 'fuse.qcow2fuse', 'ext4'. */
  fsType: string;
  source: string;
}

/** Our mounts' type (libfuse `subtype=qcow2fuse`). */
export const FS_TYPE = 'fuse.qcow2fuse';

const unescape = (field: string) => field.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));

/** Parse mountinfo text into entries, in mount order (a later entry on the same point is on top). */
export function parseMountinfo(text: string): MountEntry[] {
  const entries: MountEntry[] = [];
  for (const line of text.split('\n')) {
    const fields = line.split(' ');
    const dash = fields.indexOf('-', 6);
    if (dash < 0 || fields.length < dash + 3) continue;
    entries.push({
      mountId: Number(fields[0]),
      device: fields[2],
      mountPoint: unescape(fields[4]),
      fsType: fields[dash + 1],
      source: unescape(fields[dash + 2]),
    });
  }
  return entries;
}

export async function readMounts(): Promise<MountEntry[]> {
  return parseMountinfo(await readFile('/proc/self/mountinfo', 'utf8'));
}

/** The topmost mount on exactly `mountPoint` (an absolute, resolved path), if any. */
export async function findMount(mountPoint: string): Promise<MountEntry | undefined> {
  return (await readMounts()).filter((m) => m.mountPoint === mountPoint).at(-1);
}

/** True while the mount with this id is in the table. */
export async function isMountPresent(mountId: number): Promise<boolean> {
  return (await readMounts()).some((m) => m.mountId === mountId);
}
