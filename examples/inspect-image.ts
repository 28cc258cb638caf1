/**
 * Job 3 without a mount: what an image is made of — the same data the mount's info.json, map.json
 * and check.json show, from the library.
 *
 *   node dist/examples/inspect-image.js IMAGE.qcow2
 */
import { checkImage, openImage } from '../src/index.js';

const [imagePath] = process.argv.slice(2);
if (imagePath === undefined) {
  process.stderr.write('usage: node dist/examples/inspect-image.js IMAGE.qcow2\n');
  process.exit(1);
}
const image = await openImage(imagePath);
try {
  const g = image.geometry;
  process.stdout.write(`${imagePath}: qcow2 v${image.version}, ${image.virtualSize} bytes virtual, ` +
    `${g.clusterSize}-byte clusters, ${g.refcountBits}-bit refcounts, ${image.snapshots.length} snapshot(s)\n`);
  const report = await checkImage(image, {});
  process.stdout.write(`check: ${JSON.stringify(report)}\n`);
} finally {
  await image.close();
}
