/**
 * `qcow2fuse info [-f qcow2] [-U] [--output=human|json] IMAGE` — qemu-img info: what the image is
 * (sizes, cluster size, backing file, snapshots, qcow2 features), as the same JSON object qemu-img
 * prints, or its human text. The image is opened read-only with QEMU's reader locks: refused while
 * another process writes it, unless -U / --force-share (then read anyway, with a warning).
 */
import { nodeHostAllocationProbe } from '../../io/host-allocation.js';
import { imageInfo } from '../../qcow2/tools/info.js';
import { FORCE_SHARE_USAGE, warnIfForceShared } from '../force-share.js';
import { parseReportArgs } from '../report-args.js';
import { commandError, formatInfoHuman, qemuJson, trace, writeOut } from '../output.js';
import { openImage } from '../../node.js';

export const summary = 'show what an image is (qemu-img info; --output=json for the same JSON)';

const USAGE = `usage: qcow2fuse info [-f qcow2] [-U] [--output=human|json] FILENAME\n${FORCE_SHARE_USAGE}\n`;

export async function run(argv: string[]): Promise<number> {
  const args = parseReportArgs('info', argv, USAGE);
  if (typeof args === 'number') return args;
  const { path, json, forceShare } = args;
  const probe = nodeHostAllocationProbe();
  try {
    warnIfForceShared('info', path, forceShare);
    // As qemu-img info: the header names the backing file; the chain is not opened (nor locked).
    const image = await openImage(path, { readOnly: true, forceShare, noBacking: true });
    try {
      const info = await imageInfo(image, { probe });
      trace('info %s: %o', path, info);
      await writeOut(json ? qemuJson(info) : formatInfoHuman(info));
    } finally {
      await image.close();
    }
    return 0;
  } catch (err) {
    process.stderr.write(`qcow2fuse info: ${commandError(err)}\n`);
    return 1;
  } finally {
    probe.close();
  }
}
