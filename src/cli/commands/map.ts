/**
 * `qcow2fuse map [-f qcow2] [-U] [--output=human|json] IMAGE` — qemu-img map: where every guest byte
 * comes from (which layer of the backing chain, data or zeros, which host offset), streamed. The JSON
 * is QEMU 7.2's, extent for extent; the human table lists only data with a host offset and fails
 * (exit 1) on compressed data, as qemu-img does. Refused while another process writes the image,
 * unless -U / --force-share.
 */
import { nodeHostAllocationProbe } from '../../io/host-allocation.js';
import { Qcow2Image } from '../../qcow2/engine/image.js';
import { mapEntries, mapJsonChunks } from '../../qcow2/tools/map.js';
import { parseArgs } from '../args.js';
import { FORCE_SHARE_FLAGS, FORCE_SHARE_USAGE, forceShareOf, warnIfForceShared } from '../force-share.js';
import { commandError, MAP_HUMAN_HEADER, mapHumanLine, trace, writeOut } from '../output.js';

export const summary = 'show the allocation map of an image (qemu-img map; --output=json for the same JSON)';

const USAGE = `usage: qcow2fuse map [-f qcow2] [-U] [--output=human|json] FILENAME\n${FORCE_SHARE_USAGE}\n`;

/** Human lines gathered before one write. */
const HUMAN_CHUNK_CHARS = 64 * 1024;

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
    process.stderr.write(`qcow2fuse map: ${commandError(err)}\n${USAGE}`);
    return 1;
  }
  const probe = nodeHostAllocationProbe();
  try {
    warnIfForceShared('map', path, forceShare);
    const image = await Qcow2Image.open(path, { readOnly: true, forceShare });
    try {
      const entries = mapEntries(image, { probe });
      if (json) {
        for await (const chunk of mapJsonChunks(entries)) await writeOut(chunk);
        return 0;
      }
      let pending = MAP_HUMAN_HEADER;
      for await (const entry of entries) {
        const { line, error } = mapHumanLine(entry);
        if (error !== undefined) {
          await writeOut(pending);
          process.stderr.write(`qcow2fuse map: ${error}\n`);
          return 1;
        }
        if (line !== undefined) pending += line;
        if (pending.length >= HUMAN_CHUNK_CHARS) {
          await writeOut(pending);
          pending = '';
        }
      }
      await writeOut(pending);
      trace('map %s done', path);
      return 0;
    } finally {
      await image.close();
    }
  } catch (err) {
    process.stderr.write(`qcow2fuse map: ${commandError(err)}\n`);
    return 1;
  } finally {
    probe.close();
  }
}
