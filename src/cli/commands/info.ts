/**
 * `qcow2fuse info [-f qcow2] [-U] [--output=human|json] IMAGE` — qemu-img info: what the image is
 * (sizes, cluster size, backing file, snapshots, qcow2 features), as the same JSON object qemu-img
 * prints, or its human text. The image is opened read-only with QEMU's reader locks: refused while
 * another process writes it, unless -U / --force-share (then read anyway, with a warning).
 */
import { nodeHostAllocationProbe } from '../../io/host-allocation.js';
import { imageInfo } from '../../qcow2/tools/info.js';
import { Qcow2Image } from '../../qcow2/engine/image.js';
import { parseArgs } from '../args.js';
import { FORCE_SHARE_FLAGS, FORCE_SHARE_USAGE, forceShareOf, warnIfForceShared } from '../force-share.js';
import { commandError, formatInfoHuman, qemuJson, trace, writeOut } from '../output.js';

export const summary = 'show what an image is (qemu-img info; --output=json for the same JSON)';

const USAGE = `usage: qcow2fuse info [-f qcow2] [-U] [--output=human|json] FILENAME\n${FORCE_SHARE_USAGE}\n`;

export async function run(argv: string[]): Promise<number> {
  let path: string;
  let json: boolean;
  let forceShare: boolean;
  try {
    const { flags, positional } = parseArgs(argv, ['-f', '--output'], [...FORCE_SHARE_FLAGS, '-h', '--help']);
    if (flags.has('-h') || flags.has('--help')) {
      process.stdout.write(USAGE);
      return 0;
    }
    const format = flags.get('-f') ?? 'qcow2';
    if (format !== 'qcow2') throw new Error(`only qcow2 images are supported (got -f ${format})`);
    const output = flags.get('--output') ?? 'human';
    if (output !== 'human' && output !== 'json') throw new Error(`--output must be human or json, got '${output}'`);
    if (positional.length !== 1) throw new Error('expected one FILENAME');
    path = positional[0]!;
    json = output === 'json';
    forceShare = forceShareOf(flags);
  } catch (err) {
    process.stderr.write(`qcow2fuse info: ${commandError(err)}\n${USAGE}`);
    return 1;
  }
  const probe = nodeHostAllocationProbe();
  try {
    warnIfForceShared('info', path, forceShare);
    // As qemu-img info: the header names the backing file; the chain is not opened (nor locked).
    const image = await Qcow2Image.open(path, { readOnly: true, forceShare, noBacking: true });
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
