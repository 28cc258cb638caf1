/**
 * Job 2 without a mount: store a raw disk (or any file) as a compressed qcow2 image — every full
 * cluster goes through the compressed writer (gathered, compressed on the threadpool, packed into
 * host clusters written with O_DIRECT).
 *
 *   node dist/examples/compressed-backup.js SOURCE.raw BACKUP.qcow2 [zlib|zstd]
 */
import { open, stat } from 'node:fs/promises';
import { openImage } from '../src/index.js';
import { createImage } from '../src/node.js';

const [sourcePath, imagePath, compression = 'zlib'] = process.argv.slice(2);
if (sourcePath === undefined || imagePath === undefined || (compression !== 'zlib' && compression !== 'zstd')) {
  process.stderr.write('usage: node dist/examples/compressed-backup.js SOURCE.raw BACKUP.qcow2 [zlib|zstd]\n');
  process.exit(1);
}
const sizeBytes = (await stat(sourcePath)).size;
await createImage(imagePath, { virtualSize: sizeBytes, compressionType: compression });
const image = await openImage(imagePath, { readOnly: false, compress: true });
const source = await open(sourcePath, 'r');
try {
  const chunk = Buffer.alloc(1024 * 1024);
  for (let offset = 0; offset < sizeBytes; offset += chunk.length) {
    const { bytesRead } = await source.read(chunk, 0, Math.min(chunk.length, sizeBytes - offset), offset);
    await image.write(offset, chunk.subarray(0, bytesRead));
  }
} finally {
  await source.close();
  await image.close();
}
process.stdout.write(`${sourcePath} (${sizeBytes} bytes) stored in ${imagePath} (${(await stat(imagePath)).size} bytes)\n`);
