/**
 * `check` against `qemu-img check` on deliberately corrupted images: for every scenario and every
 * mode (no repair, -r leaks, -r all) the exit code and the report equal qemu-img's; after -r all,
 * where qemu-img's repair leaves a clean image, both tools call our repaired image clean, its guest
 * contents equal qemu-img's repaired image, and the data that was intact reads back unchanged.
 */
import { copyFile } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { qemuImgCheck, qemuImgCompare, qemuIo } from '../helpers/qemu.js';
import { useTempDir } from '../helpers/tmp.js';
import { requireTools } from '../helpers/tools.js';
import { ourCheck } from './our-check.js';
import { CHECK_SCENARIOS, intactRegions, makeScenarioImage } from './scenarios.js';
import { openImage } from '../../src/node.js';

const hasQemu = requireTools('qemu-img', 'qemu-io');

function withoutFilename(report: { filename: string } | undefined): Record<string, unknown> | undefined {
  if (report === undefined) return undefined;
  const { filename: _filename, ...rest } = report;
  return rest;
}

describe.skipIf(!hasQemu)('check matches qemu-img check on corrupted images', () => {
  const tmp = useTempDir('check-vs-qemu');

  for (const scenario of CHECK_SCENARIOS) {
    it(scenario.name, async () => {
      const original = tmp.file('original.qcow2');
      await makeScenarioImage(original, scenario);
      for (const repair of [undefined, 'leaks', 'all'] as const) {
        const theirs = tmp.file(`qemu-${repair ?? 'none'}.qcow2`);
        const ours = tmp.file(`ours-${repair ?? 'none'}.qcow2`);
        await copyFile(original, theirs);
        await copyFile(original, ours);
        const qemu = await qemuImgCheck(theirs, repair);
        const own = await ourCheck(ours, repair);
        expect({ mode: repair ?? 'none', code: own.code, report: withoutFilename(own.report) })
          .toEqual({ mode: repair ?? 'none', code: qemu.code, report: withoutFilename(qemu.report) });
        if (repair !== 'all') continue;
        const qemuAfter = await qemuImgCheck(theirs);
        if (qemuAfter.code !== 0) continue; // qemu-img could not make it clean either: outcomes compared above
        expect((await qemuImgCheck(ours)).code).toBe(0);
        expect((await ourCheck(ours)).code).toBe(0);
        expect(await qemuImgCompare(theirs, ours)).toBe(true);
        const image = await openImage(ours, { readOnly: true });
        try {
          for (const region of intactRegions(scenario)) {
            expect((await image.read(region.offset, region.bytes)).equals(Buffer.alloc(region.bytes, region.pattern))).toBe(true);
            const verify = await qemuIo(ours, [`read -P ${region.pattern} ${region.offset} ${region.bytes}`], { readOnly: true });
            expect(verify.code).toBe(0);
          }
        } finally {
          await image.close();
        }
      }
    });
  }
});
