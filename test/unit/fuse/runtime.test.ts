/** The mount table parser and the daemon state files. */
import { spawn } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import { describe, expect, it } from 'vitest';
import { parseMountinfo } from '../../../src/fuse/mountinfo.js';
import { isDaemonAlive, logPath, processStartTime, readState, removeState, statePath, writeState, type DaemonState } from '../../../src/fuse/runtime.js';
import { tempDir } from '../../helpers/tmp.js';

describe('parseMountinfo', () => {
  it('decodes escapes and finds type and source after the separator', () => {
    const text = [
      '22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw',
      '42 22 0:39 / /mnt/with\\040space rw,nosuid,nodev,relatime shared:5 master:1 - fuse.qcow2fuse /img/a\\134b.qcow2 rw,user_id=0',
      '',
    ].join('\n');
    expect(parseMountinfo(text)).toEqual([
      { mountId: 22, device: '8:1', mountPoint: '/', fsType: 'ext4', source: '/dev/sda1' },
      { mountId: 42, device: '0:39', mountPoint: '/mnt/with space', fsType: 'fuse.qcow2fuse', source: '/img/a\\b.qcow2' },
    ]);
  });
});

describe('daemon state', () => {
  it('writes, reads and removes the state of a mountpoint', async () => {
    const dir = await tempDir('runtime');
    const state: DaemonState = {
      pid: process.pid, startTime: processStartTime(process.pid) as string, mountpoint: '/mnt/x', image: '/i.qcow2', options: ['ro'],
      mountedAt: new Date().toISOString(),
    };
    await writeState(state, dir);
    expect(await readState('/mnt/x', dir)).toEqual(state);
    expect(await readState('/mnt/y', dir)).toBeUndefined();
    expect(statePath('/mnt/x', dir)).not.toBe(statePath('/mnt/y', dir));
    expect(logPath('/mnt/x', dir).startsWith(dir)).toBe(true);
    expect(isDaemonAlive(state)).toBe(true);
    await removeState('/mnt/x', dir);
    expect(await readdir(dir)).toEqual([]);
  });

  it('does not mistake a recycled pid or an exited process for the daemon', async () => {
    const self = { pid: process.pid, startTime: processStartTime(process.pid) as string } as DaemonState;
    expect(isDaemonAlive({ ...self, startTime: '1' })).toBe(false);
    const child = spawn('true');
    const pid = child.pid as number;
    await new Promise((resolve) => child.on('exit', resolve));
    expect(processStartTime(pid)).toBeUndefined();
  });
});
