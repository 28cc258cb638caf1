/**
 * Job 1 without a mount: open a qcow2 image read-only and copy its guest contents to a raw file —
 * what `qcow2fuse convert -O raw` does, through the library API.
 *
 *   node dist/examples/read-image.js IMAGE.qcow2 OUT.raw
 */
import { open } from 'node:fs/promises';
import { openImage } from '../src/index.js';

const [imagePath, outPath] = process.argv.slice(2);
if (imagePath === undefined || outPath === undefined) {
  process.stderr.write('usage: node dist/examples/read-image.js IMAGE.qcow2 OUT.raw\n');
  process.exit(1);
}
const image = await openImage(imagePath);
const out = await open(outPath, 'w');
try {
  const chunkBytes = 4 * 1024 * 1024;
  for (let offset = 0; offset < image.virtualSize; offset += chunkBytes) {
    const data = await image.read(offset, Math.min(chunkBytes, image.virtualSize - offset));
    await out.write(data, 0, data.length, offset);
  }
  await out.truncate(image.virtualSize);
  process.stdout.write(`${imagePath}: ${image.virtualSize} bytes written to ${outPath}\n`);
} finally {
  await out.close();
  await image.close();
}
