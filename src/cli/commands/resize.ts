/**
 * `qcow2fuse resize [--shrink] IMAGE [+|-]SIZE` — qemu-img resize: grow, or shrink with --shrink
 * (clusters past the new end are freed).
 */
import { parseArgs, parseSize } from '../args.js';
import { openImage } from '../../node.js';
import { resizeImage } from '../../qcow2/tools/resize.js';

export const summary = 'change the virtual size of an image (qemu-img resize)';

const USAGE = 'usage: qcow2fuse resize [--shrink] [-q] FILENAME [+|-]SIZE\n';

export async function run(argv: string[]): Promise<number> {
  if (argv.includes('--help')) {
    process.stdout.write(USAGE);
    return 0;
  }
  // A leading '-' on the size is a shrink request, not a flag: separate it before getopt.
  const sizeIndex = argv.findIndex((a, i) => i > 0 && /^[+-]?\d/.test(a));
  const sizeText = sizeIndex >= 0 ? argv[sizeIndex] : undefined;
  const rest = argv.filter((_, i) => i !== sizeIndex);
  const { flags, positional } = parseArgs(rest, ['-f'], ['--shrink', '-q']);
  const [path] = positional;
  if (path === undefined || sizeText === undefined || positional.length !== 1) {
    process.stderr.write(USAGE);
    return 1;
  }
  const image = await openImage(path, { readOnly: false });
  try {
    const delta = sizeText.startsWith('+') || sizeText.startsWith('-');
    const amount = parseSize(sizeText.replace(/^[+-]/, ''));
    const newSize = delta ? image.virtualSize + (sizeText.startsWith('-') ? -amount : amount) : amount;
    if (newSize < 0) throw new Error('New image size must be positive');
    if (newSize < image.virtualSize && !flags.has('--shrink')) {
      process.stderr.write('qemu-img: Use the --shrink option to perform a shrink operation.\n');
      return 1;
    }
    await resizeImage(image, newSize);
  } finally {
    await image.close();
  }
  if (!flags.has('-q')) process.stdout.write('Image resized.\n');
  return 0;
}
