/**
 * The Node wiring of the qcow2 driver. src/qcow2 knows only the HostFile interface and takes what
 * it cannot know as options: how host files are opened (`openHostFile`) and how a dirty image is
 * repaired on a writable open (`repairDirtyImage`, which lives in qcow2/check, above the engine that
 * calls it). This module plugs in Node's host files (io/node-host-file) and check/dirty-repair; the
 * CLI, the FUSE layer and the library API (src/index.ts) open and create images through it. Either
 * may still be overridden per call (tests inject faulty or memory host files this way).
 */
import type { HostFileOpener } from './io/host-file.js';
import { openNodeHostFile } from './io/node-host-file.js';
import { repairDirtyImage } from './qcow2/check/dirty-repair.js';
import { Qcow2Image, type Qcow2OpenOptions } from './qcow2/engine/image.js';
import { createImage as createQcow2Image, type CreateOptions as Qcow2CreateOptions } from './qcow2/tools/create.js';

export type { Preallocation } from './qcow2/tools/create.js';

/** Qcow2Image.open's options, with the Node opener and repair as defaults (read-only by default). */
export type OpenOptions = Partial<Qcow2OpenOptions>;

/** createImage's options, with the Node opener as default. */
export type CreateOptions = Omit<Qcow2CreateOptions, 'openHostFile'> & { openHostFile?: HostFileOpener };

/** Open a qcow2 image (read-only unless `readOnly: false`); a dirty image opened writable is repaired first. */
export function openImage(path: string, options: OpenOptions = {}): Promise<Qcow2Image> {
  return Qcow2Image.open(path, {
    readOnly: true, ...options, openHostFile: options.openHostFile ?? openNodeHostFile, repairDirtyImage: options.repairDirtyImage ?? repairDirtyImage,
  });
}

/** Create a qcow2 image as `qemu-img create -f qcow2` does. */
export function createImage(path: string, options: CreateOptions): Promise<void> {
  return createQcow2Image(path, { ...options, openHostFile: options.openHostFile ?? openNodeHostFile });
}
