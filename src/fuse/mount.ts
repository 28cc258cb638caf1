/**
 * Mounting an image: the lifecycle from open to close, over either transport.
 *
 * MountSession owns one mounted image: start() opens the device (through an injectable opener, so
 * tests can mount a memory device), checks the mountpoint, builds the handlers (ops.ts) and mounts
 * them through the chosen transport — our libfuse3 session (session.ts, the default) or fuse-native
 * on libfuse 2 (fuse-native.ts, `-o transport=fuse-native`) — and watches for an external unmount
 * (the session notices it itself; fuse-native's mount is polled). However the mount ends — stop()
 * (signals, the unmount command) or an external unmount — the session unmounts if still mounted,
 * waits for in-flight requests, releases open handles and closes (flushes and unlocks) the device;
 * `closed` settles when that is done.
 */
import { dirname, resolve } from 'node:path';
import type { InspectableDevice } from '../qcow2/engine/block-device.js';
import { createFuseAdapter } from './adapter.js';
import { errnoName } from './errno.js';
import { mountFuse } from './fuse-native.js';
import type { CaptureOptions } from './inspect.js';
import { createHandlers, type FsHandlers } from './ops.js';
import { deviceOpenOptions, libfuse3Options, libfuseOptions, type DeviceOpenOptions, type MountOptions } from './options.js';
import { mountSession } from './session.js';
import { createSessionAdapter } from './session-adapter.js';
import { checkMountpoint, MountError, type TransportMount } from './transport.js';

export { checkMountpoint, fusermountUnmount, MountError } from './transport.js';

/** Opens the image a mount serves (Qcow2Image.open in the CLI, a memory device in tests). */
export type DeviceOpener = (imagePath: string, options: DeviceOpenOptions) => Promise<InspectableDevice>;

/** Requests in flight at an adapter, whichever transport. */
interface InFlight {
  inFlight(): number;
  drained(): Promise<void>;
}

export interface SessionRequest {
  image: string;
  mountpoint: string;
  options: MountOptions;
  opener: DeviceOpener;
  /** Lifecycle events and errors answered EIO/ENOSPC (default: nothing). */
  log?: (line: string) => void;
  /** How often fuse-native's mount is checked for an external unmount (default 200 ms; the session needs no polling). */
  pollIntervalMs?: number;
  /** How inspection files are captured. */
  capture?: CaptureOptions;
}

/** The message for an image that cannot be opened; a lock held elsewhere is named as such. */
function openFailure(image: string, err: unknown): MountError {
  const message = err instanceof Error ? err.message : String(err);
  const code = (err as { code?: unknown }).code;
  if (code === 'ELOCKED') {
    // The lock error names the image, the holder's QEMU permission and what to do (-o ro,force-share …).
    return new MountError('ELOCKED', `cannot mount ${message}`, {}, err);
  }
  return new MountError(typeof code === 'string' ? code : 'EIO', `cannot mount ${image}: ${message}`, {}, err);
}

export class MountSession {
  /** Settles once the image is closed after the mount ended: resolves on a clean close, rejects otherwise. */
  readonly closed: Promise<void>;
  private stopping: Promise<void> | undefined;
  private readonly stopWatch: () => void;
  private settle!: { resolve: () => void; reject: (err: unknown) => void };

  private constructor(
    readonly image: string,
    readonly mountpoint: string,
    readonly device: InspectableDevice,
    private readonly handlers: FsHandlers,
    private readonly adapter: InFlight,
    private readonly mount: TransportMount,
    private readonly log: (line: string) => void,
  ) {
    this.closed = new Promise((resolvePromise, reject) => {
      this.settle = { resolve: resolvePromise, reject };
    });
    this.closed.catch(() => undefined);
    this.stopWatch = mount.watch(() => void this.stop('unmounted externally').catch(() => undefined));
  }

  /** Open the image, mount it and start watching the mount. Throws a MountError (nothing left open) on failure. */
  static async start(req: SessionRequest): Promise<MountSession> {
    const log = req.log ?? (() => undefined);
    const image = resolve(req.image);
    const mountpoint = await checkMountpoint(req.mountpoint);
    let device: InspectableDevice;
    try {
      device = await req.opener(image, deviceOpenOptions(req.options));
    } catch (err) {
      throw openFailure(image, err);
    }
    try {
      const options = { ...req.options, readOnly: req.options.readOnly || device.readOnly };
      const handlers = createHandlers(device, {
        readOnly: options.readOnly, nogrow: options.nogrow, rawName: options.name,
        statfsPath: dirname(image), uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, capture: req.capture,
      });
      const { adapter, mount } = await MountSession.mountTransport(mountpoint, image, handlers, options, log, req.pollIntervalMs);
      log(`mounted ${image} on ${mountpoint}${options.readOnly ? ' (read-only)' : ''} (transport ${options.transport})`);
      return new MountSession(image, mountpoint, device, handlers, adapter, mount, log);
    } catch (err) {
      await device.close().catch((closeErr: unknown) => log(`closing ${image} after a failed mount: ${String(closeErr)}`));
      throw err;
    }
  }

  /** Mount `handlers` on `mountpoint` through the transport the options name. */
  private static async mountTransport(mountpoint: string, image: string, handlers: FsHandlers, options: MountOptions,
    log: (line: string) => void, pollIntervalMs = 200): Promise<{ adapter: InFlight; mount: TransportMount }> {
    const onError = (op: string, path: string, err: unknown, errno: string) =>
      log(`${op} ${path}: ${errno}: ${err instanceof Error ? err.message : String(err)}`);
    if (options.transport === 'fuse-native') {
      const adapter = createFuseAdapter(handlers, { onError });
      const mount = await mountFuse(mountpoint, adapter.ops, libfuseOptions(options, image), options.readaheadBytes, pollIntervalMs);
      return { adapter, mount };
    }
    const adapter = createSessionAdapter(handlers, {
      onError, attrTimeout: options.attrTimeout, entryTimeout: options.entryTimeout, kernelCache: options.kernelCache,
      writebackCache: options.writebackCache, dropCachedData: options.writebackCache && options.compress, rawPath: `/${options.name}`,
    });
    const mount = await mountSession(mountpoint, adapter, libfuse3Options(options, image), options.readaheadBytes, options.writebackCache);
    return { adapter, mount };
  }

  /**
   * End the mount (idempotent) and close the image; resolves like `closed`. Unmounts if still mounted —
   * detaching lazily when the mount is busy, since the caller asked to stop — then waits for in-flight
   * requests, releases handles and closes the device.
   */
  stop(reason: string): Promise<void> {
    if (this.stopping === undefined) {
      this.stopping = this.shutdown(reason);
      this.stopping.then(this.settle.resolve, this.settle.reject);
    }
    return this.closed;
  }

  private async shutdown(reason: string): Promise<void> {
    this.stopWatch();
    this.log(`stopping: ${reason}`);
    try {
      if (await this.mount.isMounted()) {
        try {
          await this.mount.unmount(false);
        } catch (err) {
          this.log(`${(err as Error).message}; detaching lazily`);
          await this.mount.unmount(true);
        }
      }
    } catch (err) {
      this.log(`could not unmount ${this.mountpoint} (${(err as Error).message}); closing the image anyway`);
    }
    if (this.adapter.inFlight() > 0) {
      this.log(`waiting for ${this.adapter.inFlight()} request(s) in flight`);
      await this.adapter.drained();
    }
    let failure: Error | undefined;
    const asError = (err: unknown) => (err instanceof Error ? err : new Error(String(err)));
    try {
      this.log(`releasing ${this.handlers.openHandles()} open handle(s)`);
      await this.handlers.dispose();
    } catch (err) {
      failure = asError(err);
    }
    try {
      this.log(`closing ${this.image}`);
      await this.device.close();
    } catch (err) {
      failure ??= asError(err);
    }
    this.mount.release();
    if (failure !== undefined) {
      this.log(`closing ${this.image} failed: ${errnoName(failure)}: ${failure.message}`);
      throw failure;
    }
    this.log(`closed ${this.image}`);
  }
}
