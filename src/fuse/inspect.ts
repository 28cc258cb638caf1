/**
 * The mount's inspection files: what each one contains, and the per-open content snapshot that serves
 * its reads.
 *
 * Each file is generated as a stream of text chunks from the live image (the map and the layout are
 * streamed from the driver's async iterables, so a huge image never becomes one giant string). map.json
 * uses the driver's formatter, so it is byte-identical to `qcow2fuse map --output=json`.
 * A file's content is captured whole into a ContentSnapshot: in memory while small, spilled to an
 * unlinked temporary file beyond a limit. Reads on a handle see exactly the snapshot it was opened on
 * (consistent even while the image changes). The InspectionCache keeps the latest snapshot of each
 * file with the image generation it was made at: getattr and open share it while the image has not
 * changed and generate a new one when it has, so `ls -l` shows the real size before anyone opens the
 * file, and tools that trust st_size (`cat`, `cp`, `wc -c`, `tail`, `jq`) read exactly that length.
 */
import { randomBytes } from 'node:crypto';
import debugFactory from 'debug';
import { open, unlink, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { InspectableDevice, LayoutEntry } from '../qcow2/engine/block-device.js';
import { mapJsonChunks } from '../qcow2/tools/map.js';

const trace = debugFactory('qcow2fuse:fuse:inspect');

/** A generator of one inspection file's text. */
export type ContentGenerator = (device: InspectableDevice) => AsyncIterable<string>;

/** Chunks handed on at about this size (fewer, larger writes into the snapshot). */
const CHUNK_CHARS = 64 * 1024;

/** JSON the way qemu-img prints it with --output=json (4-space indentation, trailing newline). */
export function qemuJson(value: unknown): string {
  return `${JSON.stringify(value, null, 4)}\n`;
}

export const LAYOUT_HEADER = '# host_offset\tbytes\tkind\tguest_offset\tnote\n';

/** One line of layout.txt: tab-separated decimal offsets, '-' where an entry serves no guest offset. */
export function layoutLine(entry: LayoutEntry): string {
  const note = entry.note === undefined || entry.note === '' ? '' : `\t${entry.note.replace(/[\t\n]/g, ' ')}`;
  return `${entry.hostOffset}\t${entry.bytes}\t${entry.kind}\t${entry.guestOffset ?? '-'}${note}\n`;
}

/** layout.txt: a header line, then every host cluster (or run) of the image file in host order. */
export async function* layoutText(entries: AsyncIterable<LayoutEntry>): AsyncIterable<string> {
  let pending = LAYOUT_HEADER;
  for await (const entry of entries) {
    pending += layoutLine(entry);
    if (pending.length >= CHUNK_CHARS) {
      yield pending;
      pending = '';
    }
  }
  yield pending;
}

/** The inspection files in the mount's root, by name. */
export const INSPECTION_FILES: ReadonlyMap<string, ContentGenerator> = new Map<string, ContentGenerator>([
  ['info.json', async function* info(device) { yield qemuJson(await device.infoJson()); }],
  ['map.json', (device) => mapJsonChunks(device.mapExtents(), CHUNK_CHARS)],
  ['layout.txt', (device) => layoutText(device.layout())],
  ['check.json', async function* check(device) { yield qemuJson(await device.check()); }],
]);

export interface CaptureOptions {
  /** Content larger than this spills to a temporary file (default 4 MiB). */
  memoryLimitBytes?: number;
  /** Where spill files are created (and immediately unlinked); default os.tmpdir(). */
  spillDir?: string;
}

/**
 * One generated version of an inspection file, immutable once captured. Memory stays bounded by
 * `memoryLimitBytes` whatever the size of the content. close() releases the spill file; reads after
 * close fail.
 */
export class ContentSnapshot {
  readonly generatedAt: Date;

  private constructor(
    readonly size: number,
    private readonly memory: Buffer | undefined,
    private readonly file: FileHandle | undefined,
  ) {
    this.generatedAt = new Date();
  }

  /** Consume `chunks` to the end and keep the result. On failure nothing is left behind. */
  static async capture(chunks: AsyncIterable<string | Uint8Array>, options: CaptureOptions = {}): Promise<ContentSnapshot> {
    const limit = options.memoryLimitBytes ?? 4 * 1024 * 1024;
    const held: Buffer[] = [];
    let heldBytes = 0;
    let file: FileHandle | undefined;
    let size = 0;
    try {
      for await (const chunk of chunks) {
        const bytes = typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : Buffer.from(chunk);
        if (bytes.length === 0) continue;
        if (file === undefined && heldBytes + bytes.length > limit) {
          file = await openSpillFile(options.spillDir ?? tmpdir());
          if (heldBytes > 0) await writeAll(file, Buffer.concat(held, heldBytes), 0);
          held.length = 0;
        }
        if (file === undefined) {
          held.push(bytes);
          heldBytes += bytes.length;
        } else {
          await writeAll(file, bytes, size);
        }
        size += bytes.length;
      }
    } catch (err) {
      await file?.close();
      throw err;
    }
    return new ContentSnapshot(size, file === undefined ? Buffer.concat(held, heldBytes) : undefined, file);
  }

  /** Up to `length` bytes at `position` (fewer at the end; none past it). */
  async read(position: number, length: number): Promise<Buffer> {
    const end = Math.min(this.size, position + length);
    if (position >= end) return Buffer.alloc(0);
    if (this.memory !== undefined) return this.memory.subarray(position, end);
    const buf = Buffer.allocUnsafe(end - position);
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await (this.file as FileHandle).read(buf, done, buf.length - done, position + done);
      if (bytesRead === 0) throw new Error(`inspection spill file ended early at ${position + done}`);
      done += bytesRead;
    }
    return buf;
  }

  async close(): Promise<void> {
    await this.file?.close();
  }
}

/** A new temporary file, already unlinked, so nothing remains if the process dies. */
async function openSpillFile(dir: string): Promise<FileHandle> {
  const path = join(dir, `.qcow2fuse-inspect-${process.pid}-${randomBytes(6).toString('hex')}`);
  const file = await open(path, 'wx+', 0o600);
  await unlink(path);
  return file;
}

async function writeAll(file: FileHandle, bytes: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < bytes.length) {
    const { bytesWritten } = await file.write(bytes, done, bytes.length - done, position + done);
    done += bytesWritten;
  }
}

interface CacheEntry {
  name: string;
  generation: number;
  capture: Promise<ContentSnapshot>;
  /** Open handles reading this snapshot. */
  refs: number;
  /** Still the newest snapshot of its file (kept for getattr and later opens). */
  latest: boolean;
}

/** A snapshot acquired for an open handle; release() when the handle closes. */
export interface AcquiredContent {
  snapshot: ContentSnapshot;
  release(): Promise<void>;
}

/**
 * The latest content of each inspection file, per image generation (a counter the caller bumps on
 * every change). A snapshot is closed once it is neither the latest nor read by an open handle.
 */
export class InspectionCache {
  private readonly entries = new Map<string, CacheEntry>();

  /**
   * @param beforeGenerate runs before each generation (the mount trims the image to the file size, so
   *   the content describes the image as it will be left)
   */
  constructor(
    private readonly device: InspectableDevice,
    private readonly options: CaptureOptions | undefined,
    private readonly beforeGenerate: () => Promise<void>,
  ) {}

  /** Size and generation time of `name`'s content at `generation` (generated when needed). */
  async stat(name: string, generation: number): Promise<{ size: number; at: Date }> {
    const snapshot = await this.current(name, generation).capture;
    return { size: snapshot.size, at: snapshot.generatedAt };
  }

  /** The content of `name` at `generation`, held until release(). */
  async acquire(name: string, generation: number): Promise<AcquiredContent> {
    const entry = this.current(name, generation);
    entry.refs++;
    let snapshot: ContentSnapshot;
    try {
      snapshot = await entry.capture;
    } catch (err) {
      entry.refs--;
      throw err;
    }
    let released = false;
    return {
      snapshot,
      release: async () => {
        if (released) return;
        released = true;
        entry.refs--;
        await this.closeIfUnused(entry);
      },
    };
  }

  /** Close every snapshot no handle reads (the others close with their handles). */
  async dispose(): Promise<void> {
    const entries = [...this.entries.values()];
    this.entries.clear();
    for (const entry of entries) entry.latest = false;
    await Promise.all(entries.map((entry) => this.closeIfUnused(entry)));
  }

  private current(name: string, generation: number): CacheEntry {
    const cached = this.entries.get(name);
    if (cached !== undefined && cached.generation === generation) return cached;
    if (cached !== undefined) {
      cached.latest = false;
      this.closeIfUnused(cached).catch((err: unknown) => trace('closing an old %s snapshot failed: %O', name, err));
    }
    const generate = INSPECTION_FILES.get(name);
    if (generate === undefined) throw new Error(`${name} is not an inspection file`);
    const capture = this.beforeGenerate().then(() => ContentSnapshot.capture(generate(this.device), this.options));
    const entry: CacheEntry = { name, generation, capture, refs: 0, latest: true };
    this.entries.set(name, entry);
    capture.catch(() => {
      if (this.entries.get(name) === entry) this.entries.delete(name);
    });
    return entry;
  }

  private async closeIfUnused(entry: CacheEntry): Promise<void> {
    if (entry.refs > 0 || entry.latest) return;
    const snapshot = await entry.capture.catch(() => undefined);
    await snapshot?.close();
  }
}
