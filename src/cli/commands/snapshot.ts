/**
 * `qcow2fuse snapshot [-q] [-U] [-f qcow2] [-l | -c NAME | -d NAME | -a NAME] IMAGE` — qemu-img
 * snapshot: list the internal snapshots (the same table qemu-img 7.2 prints), create one, delete one
 * (looked up by name, then id) or apply one (by id, then name). Without an action the image is
 * opened for writing and closed again, as qemu-img does. Listing is refused while another process
 * writes the image, unless -U / --force-share (list only). Exit status 1 on any failure.
 */
import { Qcow2Image } from '../../qcow2/engine/image.js';
import { applySnapshot, createSnapshot, deleteSnapshot } from '../../qcow2/tools/snapshot-ops.js';
import type { SnapshotEntry } from '../../qcow2/format/snapshot-table.js';
import { parseArgs } from '../args.js';
import { FORCE_SHARE_FLAGS, FORCE_SHARE_USAGE, forceShareOf, warnIfForceShared } from '../force-share.js';
import { commandError, sizeToStr, writeOut } from '../output.js';

export const summary = 'list, create, delete or apply internal snapshots (qemu-img snapshot)';

const USAGE = `usage: qcow2fuse snapshot [-q] [-U] [-f qcow2] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILENAME
  -l             list the snapshots
  -c SNAPSHOT    create a snapshot named SNAPSHOT
  -d SNAPSHOT    delete the snapshot named (or else with id) SNAPSHOT
  -a SNAPSHOT    revert the image to the snapshot with id (or else named) SNAPSHOT
${FORCE_SHARE_USAGE}
`;

type Action = { kind: 'list' } | { kind: 'none' } | { kind: 'create' | 'delete' | 'apply'; name: string };

const ACTION_FLAGS = { '-c': 'create', '-d': 'delete', '-a': 'apply' } as const;

/** Width of a printf field in bytes, as C pads it (UTF-8 names take their byte length). */
function padBytes(text: string, widthBytes: number, alignLeft: boolean): string {
  const pad = ' '.repeat(Math.max(0, widthBytes - Buffer.byteLength(text, 'utf8')));
  return alignLeft ? text + pad : pad + text;
}

/** One line of QEMU's bdrv_snapshot_dump ("%-9s %-16s %8s%20s%13s%11s"), or its header line. */
function snapshotLine(s: SnapshotEntry | undefined): string {
  if (!s) return `${padBytes('ID', 10, true)}${padBytes('TAG', 17, true)}${padBytes('VM SIZE', 8, false)}${padBytes('DATE', 20, false)}${padBytes('VM CLOCK', 13, false)}${padBytes('ICOUNT', 11, false)}`;
  const two = (n: number): string => String(n).padStart(2, '0');
  const date = new Date(s.dateSec * 1000);
  const dateText = `${date.getFullYear()}-${two(date.getMonth() + 1)}-${two(date.getDate())} ${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}`;
  const clockSec = Math.floor(s.vmClockNsec / 1e9);
  const clockMs = Math.floor(s.vmClockNsec / 1e6) % 1000;
  const clockText = `${two(Math.floor(clockSec / 3600))}:${two(Math.floor(clockSec / 60) % 60)}:${two(clockSec % 60)}.${String(clockMs).padStart(3, '0')}`;
  const icountText = s.icount === undefined || s.icount < 0 ? '' : String(s.icount);
  return `${padBytes(s.id, 9, true)} ${padBytes(s.name, 16, true)} ${padBytes(sizeToStr(s.vmStateBytes), 8, false)}${padBytes(dateText, 20, false)}`
    + `${padBytes(clockText, 13, false)}${padBytes(icountText, 11, false)}`;
}

/** What `qemu-img snapshot -l` prints for these snapshots (nothing at all when there are none). */
export function formatSnapshotList(snapshots: readonly SnapshotEntry[]): string {
  if (snapshots.length === 0) return '';
  return `${['Snapshot list:', snapshotLine(undefined), ...snapshots.map((s) => snapshotLine(s))].join('\n')}\n`;
}

function parse(argv: string[]): { action: Action; path: string; forceShare: boolean } {
  const { flags, positional } = parseArgs(argv, ['-c', '-d', '-a', '-f'], ['-l', '-q', ...FORCE_SHARE_FLAGS]);
  const format = flags.get('-f') ?? 'qcow2';
  if (format !== 'qcow2') throw new Error(`only qcow2 images are supported (got -f ${format})`);
  const actions: Action[] = [];
  if (flags.has('-l')) actions.push({ kind: 'list' });
  for (const [flag, kind] of Object.entries(ACTION_FLAGS)) {
    const name = flags.get(flag);
    if (name !== undefined) actions.push({ kind, name });
  }
  if (actions.length > 1) throw new Error("Cannot mix '-l', '-a', '-c', '-d'");
  if (positional.length !== 1) throw new Error('Expecting one image file name');
  return { action: actions[0] ?? { kind: 'none' }, path: positional[0], forceShare: forceShareOf(flags) };
}

export async function run(argv: string[]): Promise<number> {
  if (argv.includes('-h') || argv.includes('--help')) {
    process.stdout.write(USAGE);
    return 0;
  }
  let args: { action: Action; path: string; forceShare: boolean };
  try {
    args = parse(argv);
  } catch (err) {
    process.stderr.write(`qcow2fuse snapshot: ${commandError(err)}\n${USAGE}`);
    return 1;
  }
  const { action, path, forceShare } = args;
  let image: Qcow2Image;
  try {
    warnIfForceShared('snapshot', path, forceShare);
    image = await Qcow2Image.open(path, { readOnly: action.kind === 'list', forceShare });
  } catch (err) {
    process.stderr.write(`qcow2fuse snapshot: Could not open '${path}': ${commandError(err)}\n`);
    return 1;
  }
  try {
    switch (action.kind) {
      case 'list':
        await writeOut(formatSnapshotList(image.snapshots));
        break;
      case 'create':
        await createSnapshot(image, action.name);
        break;
      case 'delete':
        await deleteSnapshot(image, action.name);
        break;
      case 'apply':
        await applySnapshot(image, action.name);
        break;
      case 'none':
        break;
    }
    await image.close();
    return 0;
  } catch (err) {
    await image.close().catch(() => undefined);
    const what = action.kind === 'list' || action.kind === 'none' ? 'list snapshots' : `${action.kind} snapshot '${action.name}'`;
    process.stderr.write(`qcow2fuse snapshot: Could not ${what}: ${commandError(err)}\n`);
    return 1;
  }
}
