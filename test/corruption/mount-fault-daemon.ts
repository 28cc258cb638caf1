/**
 * Test entry point (run from dist/ with node): `qcow2fuse mount`'s exact command code over a real
 * qcow2 image whose host file fails the way a sick or full disk does. The image file is wrapped in a
 * FaultyHostFile armed from QCOW2FUSE_TEST_FAULT=CODE:POINT:NTH:TIMES (e.g. `ENOSPC:data:40:Infinity`:
 * from the 40th guest-data write on, every one fails with ENOSPC; `EIO:l2:3:2`: the 3rd and 4th L2
 * table writebacks fail with EIO). POINT `any` counts every write. Backing files open unwrapped.
 */
import { runMount } from '../../src/cli/commands/mount.js';
import { Qcow2Device } from '../../src/fuse/qcow2-device.js';
import type { DeviceOpener } from '../../src/fuse/mount.js';
import type { DeviceOpenOptions } from '../../src/fuse/options.js';
import { FaultyHostFile, type WriteFault } from '../../src/io/faulty-host-file.js';
import type { HostFileOpener, WritePoint } from '../../src/io/host-file.js';
import { openNodeHostFile } from '../../src/io/node-host-file.js';

function parseFault(spec: string): WriteFault {
  const [code, point, nth, times] = spec.split(':');
  if ((code !== 'EIO' && code !== 'ENOSPC') || point === undefined || nth === undefined || times === undefined) {
    throw new Error(`QCOW2FUSE_TEST_FAULT must be CODE:POINT:NTH:TIMES, got '${spec}'`);
  }
  return {
    code: code,
    nth: Number(nth),
    times: times === 'Infinity' ? Number.POSITIVE_INFINITY : Number(times),
    ...(point === 'any' ? {} : { point: point as WritePoint }),
  };
}

const spec = process.env.QCOW2FUSE_TEST_FAULT;
const fault = spec === undefined || spec === '' ? undefined : parseFault(spec);

const openFaulty = (imagePath: string): HostFileOpener => async (path, options) => {
  const file = await openNodeHostFile(path, options);
  return path === imagePath && fault !== undefined && !options.readOnly ? FaultyHostFile.wrap(file, { writeFault: fault }) : file;
};

/** Qcow2Device.open hands its options to Qcow2Image.open, so the host-file opener rides along. */
const opener: DeviceOpener = (path, options) => Qcow2Device.open(path, { ...options, openHostFile: openFaulty(path) } as DeviceOpenOptions);

process.exitCode = await runMount(process.argv.slice(2), { opener, daemonArgs: [...process.execArgv, process.argv[1]] });
