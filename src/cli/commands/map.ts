/**
 * `qcow2fuse map [-f qcow2] [-U] [--output=human|json] IMAGE` — qemu-img map: where every guest byte
 * comes from (which layer of the backing chain, data or zeros, which host offset), streamed. The JSON
 * is QEMU 7.2's, extent for extent; the human table lists only data with a host offset and fails
 * (exit 1) on compressed data, as qemu-img does. Refused while another process writes the image,
 * unless -U / --force-share.
 */
import { nodeHostAllocationProbe } from '../../io/host-allocation.js';
import { mapEntries, mapJsonChunks } from '../../qcow2/tools/map.js';
import { FORCE_SHARE_USAGE, warnIfForceShared } from '../force-share.js';
import { parseReportArgs } from '../report-args.js';
import { commandError, MAP_HUMAN_HEADER, mapHumanLine, trace, writeOut } from '../output.js';
import { openImage } from '../../node.js';

export const summary = 'show the allocation map of an image (qemu-img map; --output=json for the same JSON)';

const USAGE = `usage: qcow2fuse map [-f qcow2] [-U] [--output=human|json] FILENAME\n${FORCE_SHARE_USAGE}\n`;

/** Human lines gathered before one write. */
const HUMAN_CHUNK_CHARS = 64 * 1024;

export async function run(argv: string[]): Promise<number> {
  const args = parseReportArgs('map', argv, USAGE);
  if (typeof args === 'number') return args;
  const { path, json, forceShare } = args;
  const probe = nodeHostAllocationProbe();
  try {
    warnIfForceShared('map', path, forceShare);
    const image = await openImage(path, { readOnly: true, forceShare });
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
