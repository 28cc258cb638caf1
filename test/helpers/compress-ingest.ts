/**
 * Compressed ingest through a real mount (issue 7), shared by test/integration/compress-*.test.ts and
 * test/bench/compress-ingest.ts: `qcow2fuse mount -o compress` / `unmount` / kill -9 of the daemon,
 * writers started as child processes (cp, dd), a reader that chases a writer (reads back what it has
 * just written while the copy goes on), and the checks every ingest ends with (qemu-img check,
 * compare, compressed clusters, size against `qemu-img convert -c`).
 *
 * No vitest import: the benchmark runs this from dist/ under plain Node.
 */
import { spawn } from 'node:child_process';
import { mkdir, open, readdir, readFile, readlink, realpath, stat } from 'node:fs/promises';
import { constants } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { readState } from '../../src/fuse/runtime.js';
import { run, waitForExit, type ExecResult } from './exec.js';
import { findTool } from './tools.js';
import { forceUnmount, isMounted, registerMount, unregisterMount } from './mount.js';
import { qemuImg, qemuImgCheck, qemuImgCompare, type QemuImgCheckReport } from './qemu.js';

export const MiB = 2 ** 20;

export type Codec = 'zlib' | 'zstd';

const here = dirname(fileURLToPath(import.meta.url));
/** The compiled CLI: from test/helpers (vitest, sources) or dist/test/helpers (bench). */
export const CLI = here.includes('/dist/test/') ? resolve(here, '../../src/cli/main.js') : resolve(here, '../../dist/src/cli/main.js');

/** Parse '256M', '2G', '64k' or a plain byte count (binary units). */
export function parseByteCount(text: string): number {
  const match = /^\s*(\d+)\s*([kmgt]?)i?b?\s*$/i.exec(text);
  if (match === null) throw new Error(`not a byte count: '${text}'`);
  const bytes = Number(match[1]) * ({ '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[(match[2] ?? '').toLowerCase()] ?? 1);
  if (!Number.isSafeInteger(bytes)) throw new Error(`byte count too large: '${text}'`);
  return bytes;
}

/** A byte count from the environment variable `name`, or `fallback`. */
export function envByteCount(name: string, fallback: number): number {
  const text = process.env[name];
  return text === undefined || text === '' ? fallback : parseByteCount(text);
}

/** Bytes of `path` resident in the page cache (`fincore`). */
export async function residentBytes(path: string): Promise<number> {
  const result = await run('fincore', ['--bytes', '--noheadings', '--output', 'RES', path]);
  if (result.code !== 0) throw new Error(`fincore ${path} failed: ${result.stderr.trim()}`);
  return Number(result.stdout.trim());
}

/** Drop `path` from the page cache (`dd iflag=nocache count=0`: fadvise DONTNEED on the whole file). */
export async function evictFromPageCache(path: string): Promise<void> {
  const result = await run('dd', [`if=${path}`, 'iflag=nocache', 'count=0', 'status=none']);
  if (result.code !== 0) throw new Error(`dd iflag=nocache ${path} failed: ${result.stderr.trim()}`);
}

/** Peak resident set (VmHWM) of a live process, in bytes. */
export async function peakRssBytes(pid: number): Promise<number> {
  const match = /^VmHWM:\s+(\d+) kB/m.exec(await readFile(`/proc/${pid}/status`, 'utf8'));
  if (match === null) throw new Error(`no VmHWM for process ${pid}`);
  return Number(match[1]) * 1024;
}

/** CPU seconds (user + system) a live process has used so far. */
export async function cpuSeconds(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** Write a file of `bytes` bytes, every one 0xFF (the seed's "disk filled with ones"). */
export async function writeOnesFile(path: string, bytes: number): Promise<void> {
  const handle = await open(path, 'w');
  try {
    const block = Buffer.alloc(Math.min(bytes, 4 * MiB), 0xff);
    for (let offset = 0; offset < bytes; offset += block.length) {
      await handle.write(block, 0, Math.min(block.length, bytes - offset), offset);
    }
  } finally {
    await handle.close();
  }
}

/**
 * Python (ctypes) side of openResidencyProbe: holds FILE open; for each line on stdin (a byte count)
 * it maps that much of the file (PROT_NONE, MAP_SHARED), asks mincore(2) which pages are resident and
 * prints the byte count — or "direct_io" when the kernel refuses the mapping (ENODEV: a FUSE file
 * opened direct_io, which has no page cache at all). It never stats the file: a getattr on a FUSE file
 * whose mtime changed drops its cache when the daemon asked for auto_inval_data (libfuse 3's default,
 * qemu-storage-daemon's export).
 */
const MINCORE_PY = `
import ctypes, errno, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
page = os.sysconf("SC_PAGE_SIZE")
print("ready", flush=True)
for line in sys.stdin:
    size = int(line)
    if size == 0:
        print(0, flush=True); continue
    addr = libc.mmap(None, size, 0, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        e = ctypes.get_errno()
        print("direct_io" if e == errno.ENODEV else "error " + os.strerror(e), flush=True); continue
    vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
    rc = libc.mincore(addr, size, vec)
    e = ctypes.get_errno()
    libc.munmap(addr, size)
    print(sum(v & 1 for v in vec) * page if rc == 0 else "error " + os.strerror(e), flush=True)
`;

/** Page-cache residency of one file, seen through a descriptor opened before the file was written. */
export interface ResidencyProbe {
  /** Bytes of the first `sizeBytes` resident now, or 'direct_io' when the file cannot be cached at all. */
  measure(sizeBytes: number): Promise<number | 'direct_io'>;
  close(): Promise<void>;
}

/**
 * Open `path` and keep it open to measure its page cache later. Unlike `fincore PATH`, which opens
 * the file when it measures, this works for FUSE files: a FUSE open without keep_cache drops the
 * file's cache, so only a descriptor opened beforehand sees what a copy left cached (DESIGN §4:
 * "fincore cannot see a FUSE file's cache").
 */
export async function openResidencyProbe(path: string): Promise<ResidencyProbe> {
  const child = spawn(findTool('python3') ?? 'python3', ['-c', MINCORE_PY, path], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (s: string) => { stderr += s; });
  const lines: string[] = [];
  const waiting: ((line: string | undefined) => void)[] = [];
  let buffered = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => {
    buffered += s;
    for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      const waiter = waiting.shift();
      if (waiter) waiter(line);
      else lines.push(line);
    }
  });
  const exited = new Promise<void>((resolveExit) => child.on('close', () => resolveExit()));
  void exited.then(() => { for (const w of waiting.splice(0)) w(undefined); });
  const nextLine = (): Promise<string> => new Promise<string>((resolveLine, rejectLine) => {
    const line = lines.shift();
    if (line !== undefined) { resolveLine(line); return; }
    waiting.push((l) => (l === undefined ? rejectLine(new Error(`residency probe of ${path} ended: ${stderr.trim()}`)) : resolveLine(l)));
  });
  if (await nextLine() !== 'ready') throw new Error(`residency probe of ${path} did not start: ${stderr.trim()}`);
  return {
    async measure(sizeBytes) {
      child.stdin.write(`${sizeBytes}\n`);
      const line = await nextLine();
      if (line === 'direct_io') return 'direct_io';
      if (!/^\d+$/.test(line)) throw new Error(`residency probe of ${path}: ${line}`);
      return Number(line);
    },
    async close() {
      child.stdin.end();
      await exited;
    },
  };
}

/** A child process: its pid and its completion (output and exit code; never rejects once started). */
export interface Started {
  pid: number;
  done: Promise<ExecResult>;
}

/** Start `command ARGS` as a child process, collecting its output. */
export function start(command: string, args: readonly string[], env: NodeJS.ProcessEnv = process.env): Started {
  const child = spawn(command, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => { stdout += s; });
  child.stderr.setEncoding('utf8').on('data', (s: string) => { stderr += s; });
  const done = new Promise<ExecResult>((resolveDone, rejectDone) => {
    child.on('error', rejectDone);
    child.on('close', (code, signal) => resolveDone({ stdout, stderr, code: code ?? 128 + (signal === null ? 0 : constants.signals[signal]) }));
  });
  if (child.pid === undefined) throw new Error(`could not start ${command}`);
  return { pid: child.pid, done };
}

/** Throw with the command's stderr unless it exited 0. */
export function expectSuccess(what: string, result: ExecResult): ExecResult {
  if (result.code !== 0) throw new Error(`${what} exited ${result.code}: ${result.stderr.trim()}`);
  return result;
}

/**
 * One mount of an image with `qcow2fuse mount` (background daemon, private runtime directory).
 * `mount()` resolves with the daemon's pid once the mount is live; `unmount()` returns once the
 * image is flushed and closed; `kill()` is kill -9 of the daemon and a lazy unmount of what is left.
 */
export class IngestMount {
  readonly env: NodeJS.ProcessEnv;
  pid: number | undefined;

  /**
   * `nodeArgs` go to `node` before the CLI (e.g. --cpu-prof); the daemon inherits them, being started
   * with the mount command's execArgv.
   */
  constructor(readonly image: string, readonly mnt: string, readonly runtime: string, env: NodeJS.ProcessEnv = {}, readonly nodeArgs: readonly string[] = []) {
    this.env = { ...process.env, QCOW2FUSE_RUNTIME_DIR: runtime, ...env };
  }

  get disk(): string {
    return join(this.mnt, 'disk.raw');
  }

  async mount(options: readonly string[] = ['compress']): Promise<number> {
    await mkdir(this.mnt, { recursive: true });
    registerMount(this.mnt);
    const result = await run(process.execPath, [...this.nodeArgs, CLI, 'mount', ...options.flatMap((o) => ['-o', o]), this.image, this.mnt], { env: this.env });
    expectSuccess(`qcow2fuse mount ${options.join(',')} ${this.image}`, result);
    const state = await readState(await realpath(this.mnt), this.runtime);
    if (state === undefined) throw new Error(`no daemon recorded for ${this.mnt}`);
    this.pid = state.pid;
    return state.pid;
  }

  async unmount(): Promise<void> {
    expectSuccess(`qcow2fuse unmount ${this.mnt}`, await run(process.execPath, [CLI, 'unmount', this.mnt], { env: this.env }));
    if (await isMounted(this.mnt)) throw new Error(`${this.mnt} is still mounted after qcow2fuse unmount`);
    unregisterMount(this.mnt);
    this.pid = undefined;
  }

  /** kill -9 the daemon, wait until it is gone, and detach the dead mount. */
  async kill(): Promise<void> {
    const pid = this.pid;
    if (pid === undefined) throw new Error('not mounted');
    process.kill(pid, 'SIGKILL');
    await waitForExit(pid);
    await forceUnmount(this.mnt);
    unregisterMount(this.mnt);
    this.pid = undefined;
  }

  /** Safety net for finally blocks: detach whatever is still mounted. */
  async cleanup(): Promise<void> {
    await forceUnmount(this.mnt);
    unregisterMount(this.mnt);
  }
}


/** The file descriptor process `pid` has open on `path`, or undefined. */
async function findFd(pid: number, path: string): Promise<number | undefined> {
  let fds: string[];
  try {
    fds = await readdir(`/proc/${pid}/fd`);
  } catch {
    return undefined;
  }
  for (const fd of fds) {
    if (await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '') === path) return Number(fd);
  }
  return undefined;
}

/** The file position of `fd` in process `pid` (/proc/PID/fdinfo), or undefined once it is closed. */
async function filePosition(pid: number, fd: number): Promise<number | undefined> {
  const text = await readFile(`/proc/${pid}/fdinfo/${fd}`, 'utf8').catch(() => undefined);
  const match = text === undefined ? null : /^pos:\s+(\d+)/m.exec(text);
  return match === null ? undefined : Number(match[1]);
}

/**
 * Resolves true once `writer`'s file position on `target` has reached `position` (it has written up
 * to there), false when it ends first.
 */
export async function waitForWriterPosition(writer: Started, target: string, position: number): Promise<boolean> {
  let finished = false;
  const settle = (): void => { finished = true; };
  writer.done.then(settle, settle);
  let fd: number | undefined;
  while (!finished) {
    fd ??= await findFd(writer.pid, target);
    const at = fd === undefined ? undefined : await filePosition(writer.pid, fd);
    if (at !== undefined && at >= position) return true;
    await sleep(2);
  }
  return false;
}

export interface ChaseOptions {
  /** The file the writer writes (the mount's disk.raw). */
  target: string;
  /** Where the written bytes come from; target offset X holds source offset X. */
  source: string;
  /** The writer's range in the target: only [start, end) is read back. */
  start: number;
  end: number;
  /** How far behind the writer's position to read back at each step (default 256 KiB). */
  windowBytes?: number;
}

export interface ChaseResult {
  /** Read-backs done while the writer was running. */
  reads: number;
  bytes: number;
  /** Ranges where the read-back differed from the source. */
  mismatches: string[];
}

/**
 * Follow a writer process: while it runs, watch its file position on `target` (/proc/PID/fdinfo) and
 * read back the window just behind it — bytes whose write() has returned, most of them still held by
 * the compressed writer (gathered, compressing, or in a host cluster not yet written) — comparing each
 * read with the source. A write() returns before the position moves, so everything read was written.
 */
export async function chaseWriter(writer: Started, options: ChaseOptions): Promise<ChaseResult> {
  const result: ChaseResult = { reads: 0, bytes: 0, mismatches: [] };
  const windowBytes = options.windowBytes ?? 256 * 1024;
  let finished = false;
  const settle = (): void => { finished = true; };
  writer.done.then(settle, settle);
  let fd: number | undefined;
  while (!finished && fd === undefined) {
    fd = await findFd(writer.pid, options.target);
    if (fd === undefined) await sleep(5);
  }
  if (fd === undefined) return result;
  const target = await open(options.target, 'r');
  const source = await open(options.source, 'r');
  try {
    let checked = options.start;
    const got = Buffer.alloc(windowBytes);
    const want = Buffer.alloc(windowBytes);
    while (!finished) {
      const position = await filePosition(writer.pid, fd);
      if (position === undefined) break;
      const upTo = Math.min(position, options.end);
      if (upTo > checked) {
        const from = Math.max(checked, upTo - windowBytes);
        const bytes = upTo - from;
        const { bytesRead } = await target.read(got, 0, bytes, from);
        await source.read(want, 0, bytesRead, from);
        if (!got.subarray(0, bytesRead).equals(want.subarray(0, bytesRead))) result.mismatches.push(`[${from}, +${bytesRead})`);
        result.reads++;
        result.bytes += bytesRead;
        checked = upTo;
      }
      await sleep(20);
    }
  } finally {
    await target.close();
    await source.close();
  }
  return result;
}

/** `qemu-img convert -c -O qcow2 [-o compression_type=zstd] SRC DST`: the size reference. */
export async function qemuImgConvertCompressed(src: string, dst: string, codec: Codec): Promise<void> {
  const args = ['convert', '-c', '-O', 'qcow2', ...(codec === 'zstd' ? ['-o', 'compression_type=zstd'] : []), src, dst];
  expectSuccess(`qemu-img ${args.join(' ')}`, await qemuImg(args));
}

/** An empty image for a compressed mount: `qemu-img create -f qcow2 -o compression_type=CODEC IMG SIZE`. */
export async function createEmptyImage(path: string, bytes: number, codec: Codec): Promise<void> {
  expectSuccess('qemu-img create', await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `compression_type=${codec}`, path, String(bytes)]));
}

export interface IngestReport {
  check: QemuImgCheckReport;
  /** File size (apparent) and allocated bytes of the image. */
  imageBytes: number;
  allocatedBytes: number;
}

/**
 * What every compressed ingest ends with, after unmount: `qemu-img check` clean (exit 0: no
 * corruptions, no leaks, no check errors) and `qemu-img compare` identical with the source. Throws
 * with qemu's findings otherwise.
 */
export async function checkIngested(image: string, source: string): Promise<IngestReport> {
  const result = await qemuImgCheck(image);
  if (result.code !== 0 || result.report === undefined) {
    throw new Error(`qemu-img check ${image} exited ${result.code}: ${result.report === undefined ? result.stderr.trim() : JSON.stringify(result.report)}`);
  }
  if (!await qemuImgCompare(image, source, { formatA: 'qcow2', formatB: 'raw' })) throw new Error(`qemu-img compare: ${image} differs from ${source}`);
  const info = await stat(image);
  return { check: result.report, imageBytes: info.size, allocatedBytes: info.blocks * 512 };
}
