/** Our check driven as the CLI drives it, for tests that compare it with qemu-img check. */
import { checkExitCode } from '../../src/cli/commands/check.js';
import { CheckFailedError, checkImage, type CheckResult, type RepairMode } from '../../src/qcow2/check/check.js';
import { Qcow2Image } from '../../src/qcow2/engine/image.js';
import { openImage } from '../../src/node.js';

/** Exit code and report (none when the image could not be opened or the check could not run). */
export async function ourCheck(path: string, repair?: RepairMode): Promise<{ code: number; report?: CheckResult }> {
  let image: Qcow2Image;
  try {
    image = await openImage(path, { readOnly: repair === undefined, check: true });
  } catch {
    return { code: 1 };
  }
  try {
    const report = await checkImage(image, { repair });
    return { code: checkExitCode(report), report };
  } catch (err) {
    if (err instanceof CheckFailedError) return { code: 1 };
    throw err;
  } finally {
    await image.close();
  }
}

