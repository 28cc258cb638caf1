/**
 * `qcow2fuse resize` as a user runs it (`node dist/src/cli/main.js`, built by `npm run build`), against
 * `qemu-img resize` on a copy of the same image: growing an overlay over a longer backing file makes
 * the new area read as zeros (QEMU's truncate zeroes it rather than let the backing data show), the
 * old contents stay, and the result compares equal to qemu-img's and checks clean.
 */
import { describe, expect, it } from 'vitest';
import { copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { qemuImgCheckClean, qemuImgCompare, qemuImgMap, qemuIoOk, run } from '../helpers/qemu.js';
import { useTempDir } from '../helpers/tmp.js';
import { requireTools } from '../helpers/tools.js';

const root = fileURLToPath(new URL('../../', import.meta.url));
const CLI = join(root, 'dist/src/cli/main.js');
const ready = requireTools('qemu-img', 'qemu-io', CLI);
const MiB = 1024 * 1024;

async function ok(command: string, args: string[], cwd: string): Promise<string> {
  const result = await run(command, args, { cwd });
  if (result.code !== 0) throw new Error(`${command} ${args.join(' ')}: exit ${result.code}: ${result.stderr}`);
  return result.stdout;
}

/** In `dir`: base.qcow2 (8 MiB of 0xab) and overlay.qcow2 of `overlaySize` bytes over it. */
async function overlayOverLongerBase(dir: string, compat: string, overlaySize: number): Promise<string> {
  await ok('qemu-img', ['create', '-q', '-f', 'qcow2', 'base.qcow2', '8M'], dir);
  await qemuIoOk(join(dir, 'base.qcow2'), ['write -P 0xab 0 8M']);
  await ok('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `compat=${compat}`, '-b', 'base.qcow2', '-F', 'qcow2', 'overlay.qcow2', String(overlaySize)], dir);
  await qemuIoOk(join(dir, 'overlay.qcow2'), ['write -P 0x5c 64k 64k']);
  return join(dir, 'overlay.qcow2');
}

describe.skipIf(!ready)('qcow2fuse resize (dist build)', () => {
  const tmp = useTempDir('cli-resize');

  for (const oldSize of [4 * MiB, 4 * MiB + 1536]) {
    it(`grows a v3 overlay of ${oldSize} bytes over a longer backing file: zeros there, as qemu-img resize`, async () => {
      const overlay = await overlayOverLongerBase(tmp.path, '1.1', oldSize);
      const theirs = tmp.file('theirs.qcow2');
      await copyFile(overlay, theirs);
      await ok('qemu-img', ['resize', '-q', theirs, '12M'], tmp.path);
      expect(await ok(process.execPath, [CLI, 'resize', overlay, '12M'], tmp.path)).toBe('Image resized.\n');
      await qemuIoOk(overlay, [`read -P 0xab 0 64k`, 'read -P 0x5c 64k 64k', `read -P 0xab 128k ${oldSize - 128 * 1024}`,
        `read -P 0 ${oldSize} ${12 * MiB - oldSize}`]);
      expect(await qemuImgCompare(overlay, theirs)).toBe(true);
      expect(await qemuImgMap(overlay)).toEqual(await qemuImgMap(theirs));
      await qemuImgCheckClean(overlay);
    });
  }

  it('grows a v2 overlay over a longer backing file with written zeros (qemu-img refuses: no zero clusters in v2)', async () => {
    const overlay = await overlayOverLongerBase(tmp.path, '0.10', 4 * MiB + 1536);
    await ok(process.execPath, [CLI, 'resize', '-q', overlay, '+8M'], tmp.path);
    await qemuIoOk(overlay, ['read -P 0xab 0 64k', 'read -P 0x5c 64k 64k', `read -P 0 ${4 * MiB + 1536} ${8 * MiB}`]);
    const dataEnd = Math.max(...(await qemuImgMap(overlay)).filter((e) => e.depth === 0 && e.data).map((e) => e.start + e.length));
    expect(dataEnd).toBe(8 * MiB);
    await qemuImgCheckClean(overlay);
  });

  it('grows over a shorter backing file without writing anything new (the area past it reads as zeros already)', async () => {
    await ok('qemu-img', ['create', '-q', '-f', 'qcow2', 'base.qcow2', '2M'], tmp.path);
    await qemuIoOk(tmp.file('base.qcow2'), ['write -P 0xab 0 2M']);
    await ok('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'overlay.qcow2', '4M'], tmp.path);
    const theirs = tmp.file('theirs.qcow2');
    await copyFile(tmp.file('overlay.qcow2'), theirs);
    await ok('qemu-img', ['resize', '-q', theirs, '8M'], tmp.path);
    await ok(process.execPath, [CLI, 'resize', '-q', 'overlay.qcow2', '8M'], tmp.path);
    await qemuIoOk(tmp.file('overlay.qcow2'), ['read -P 0xab 0 2M', 'read -P 0 2M 6M']);
    expect(await qemuImgMap(tmp.file('overlay.qcow2'))).toEqual(await qemuImgMap(theirs));
    await qemuImgCheckClean(tmp.file('overlay.qcow2'));
  });
});
