import { describe, expect, it } from 'vitest';

import { HostIoError } from '../../../src/io/errors.js';
import { FaultyHostFile } from '../../../src/io/faulty-host-file.js';
import { MemoryHostFile } from '../../../src/io/memory-host-file.js';

function filled(bytes: number, value: number): Buffer {
  return Buffer.alloc(bytes, value);
}

describe('write faults', () => {
  it('fails exactly the nth pwrite with EIO and leaves the file untouched', async () => {
    const inner = new MemoryHostFile({ path: 'img' });
    const file = await FaultyHostFile.wrap(inner, { writeFault: { nth: 3 } });
    await file.pwrite(filled(10, 1), 0);
    await file.pwrite(filled(10, 2), 10);
    const failure = await file.pwrite(filled(10, 3), 20, 'l2').catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(HostIoError);
    expect(failure).toMatchObject({ code: 'EIO', details: { path: 'img', hostOffset: 20 } });
    expect((failure as Error).message).toContain('pwrite (l2)');
    expect(await inner.size()).toBe(20);
    await file.pwrite(filled(10, 4), 20);
    expect(file.stats).toMatchObject({ pwrites: 4, injectedWriteFaults: 1 });
  });

  it('counts only writes at a named point when given one', async () => {
    const file = await FaultyHostFile.wrap(new MemoryHostFile(), { writeFault: { nth: 2, point: 'refblock', code: 'ENOSPC' } });
    await file.pwrite(filled(1, 0), 0, 'refblock');
    await file.pwrite(filled(1, 0), 0, 'data');
    await file.pwrite(filled(1, 0), 0, 'l2');
    await file.pwrite(filled(1, 0), 0);
    await expect(file.pwrite(filled(1, 0), 0, 'refblock')).rejects.toMatchObject({ code: 'ENOSPC' });
    await file.pwrite(filled(1, 0), 0, 'refblock');
    expect(file.stats.pwritesByPoint.get('refblock')).toBe(3);
  });

  it('can fail every write from the nth on (a full disk) and be disarmed', async () => {
    const file = await FaultyHostFile.wrap(new MemoryHostFile());
    await file.pwrite(filled(1, 0), 0);
    file.failWrite({ nth: 2, code: 'ENOSPC', times: Infinity });
    await file.pwrite(filled(1, 0), 0);
    for (let i = 0; i < 5; i++) {
      await expect(file.pwrite(filled(1, 0), 0)).rejects.toMatchObject({ code: 'ENOSPC' });
    }
    file.clearFaults();
    await file.pwrite(filled(1, 0), 0);
  });

  it('validates nth', async () => {
    const file = await FaultyHostFile.wrap(new MemoryHostFile());
    expect(() => file.failWrite({ nth: 0 })).toThrow(RangeError);
  });
});

describe('sync faults', () => {
  it('fails the nth fdatasync', async () => {
    const file = await FaultyHostFile.wrap(new MemoryHostFile(), { syncFault: { nth: 2, code: 'EIO' } });
    await file.fdatasync();
    await expect(file.fdatasync()).rejects.toMatchObject({ code: 'EIO', details: { operation: 'fdatasync' } });
    await file.fdatasync();
    expect(file.stats).toMatchObject({ fdatasyncs: 3, injectedSyncFaults: 1 });
  });
});

describe('power cut', () => {
  it('keeps exactly the state of the last successful fdatasync when nothing else survives', async () => {
    const inner = MemoryHostFile.from(filled(4096, 0xaa));
    const file = await FaultyHostFile.wrap(inner, { journal: true, keepProbability: 0 });
    await file.pwrite(filled(100, 1), 0);
    await file.fdatasync();
    await file.pwrite(filled(100, 2), 100);
    await file.truncate(8192);
    expect(file.unflushedChanges).toBe(2);
    const survivor = await file.powerCut();
    const expected = filled(4096, 0xaa);
    expected.fill(1, 0, 100);
    expect(survivor.snapshot().equals(expected)).toBe(true);
  });

  it('keeps everything when every change survives', async () => {
    const inner = new MemoryHostFile();
    const file = await FaultyHostFile.wrap(inner, { journal: true, keepProbability: 1 });
    await file.pwrite(filled(100, 1), 0);
    await file.zeroRange(10, 10);
    await file.punchHole(50, 10);
    await file.allocate(0, 1000);
    await file.pwrite(filled(10, 7), 500);
    const survivor = await file.powerCut();
    expect(survivor.snapshot().equals(inner.snapshot())).toBe(true);
    expect(await survivor.size()).toBe(1000);
  });

  it('keeps a seeded random subset of unflushed writes, reproducibly', async () => {
    const outcome = async (seed: number): Promise<string> => {
      const file = await FaultyHostFile.wrap(new MemoryHostFile(), { journal: true, seed });
      for (let i = 0; i < 16; i++) {
        await file.pwrite(filled(1, i + 1), i);
      }
      const survivor = await file.powerCut();
      const bytes = Buffer.alloc(16);
      await survivor.pread(bytes, 0);
      return bytes.toString('hex');
    };
    expect(await outcome(42)).toBe(await outcome(42));
    const outcomes = new Set<string>();
    for (let seed = 1; seed <= 12; seed++) {
      outcomes.add(await outcome(seed));
    }
    expect(outcomes.size).toBeGreaterThan(6);
    for (const hex of outcomes) {
      const bytes = Buffer.from(hex, 'hex');
      bytes.forEach((value, index) => expect([0, index + 1]).toContain(value));
    }
  });

  it('tears writes at sector granularity when asked', async () => {
    const file = await FaultyHostFile.wrap(new MemoryHostFile(), { journal: true, seed: 7, tornSectorBytes: 512 });
    await file.pwrite(filled(64 * 512, 0x11), 0);
    const survivor = await file.powerCut();
    const bytes = survivor.snapshot();
    const sectors = new Set<number>();
    for (let sector = 0; sector * 512 < bytes.length; sector++) {
      const slice = bytes.subarray(sector * 512, (sector + 1) * 512);
      expect(slice.every((b) => b === slice[0])).toBe(true);
      sectors.add(slice[0] ?? 0);
    }
    expect([...sectors].sort()).toEqual([0, 0x11]);
  });

  it('does not make anything durable on a failed fdatasync', async () => {
    const file = await FaultyHostFile.wrap(new MemoryHostFile(), { journal: true, keepProbability: 0, syncFault: { nth: 1 } });
    await file.pwrite(filled(10, 5), 0);
    await expect(file.fdatasync()).rejects.toMatchObject({ code: 'EIO' });
    expect(file.unflushedChanges).toBe(1);
    expect((await file.powerCut()).snapshot().length).toBe(0);
  });

  it('leaves the wrapper dead, and needs journal mode', async () => {
    const file = await FaultyHostFile.wrap(new MemoryHostFile(), { journal: true });
    await file.powerCut();
    await expect(file.pread(Buffer.alloc(1), 0)).rejects.toMatchObject({ code: 'EIO' });
    await expect(file.pwrite(Buffer.alloc(1), 0)).rejects.toMatchObject({ code: 'EIO' });
    const plain = await FaultyHostFile.wrap(new MemoryHostFile());
    await expect(plain.powerCut()).rejects.toThrow(/journal/);
  });

  it('starts from the wrapped file contents', async () => {
    const file = await FaultyHostFile.wrap(MemoryHostFile.from(filled(3000, 9)), { journal: true });
    const survivor = await file.powerCut();
    expect(survivor.snapshot().equals(filled(3000, 9))).toBe(true);
  });

  it('journals only writes that completed before the fdatasync began', async () => {
    const inner = new MemoryHostFile();
    const file = await FaultyHostFile.wrap(inner, { journal: true, keepProbability: 0 });
    await file.pwrite(filled(4, 1), 0);
    const sync = file.fdatasync();
    const late = file.pwrite(filled(4, 2), 4);
    await Promise.all([sync, late]);
    const survivor = await file.powerCut();
    expect(survivor.snapshot().equals(filled(4, 1))).toBe(true);
  });
});

describe('forwarding', () => {
  it('passes through identity and every operation', async () => {
    const inner = new MemoryHostFile({ path: 'inner', directAlignment: 512, checkMemoryAlignment: false });
    const file = await FaultyHostFile.wrap(inner);
    expect(file.path).toBe('inner');
    expect(file.direct).toBe(true);
    expect(file.dioAlignment).toBe(512);
    expect(file.readOnly).toBe(false);
    await file.pwrite(filled(512, 3), 512);
    expect(await file.size()).toBe(1024);
    const back = Buffer.alloc(512);
    expect(await file.pread(back, 512)).toBe(512);
    expect(back.equals(filled(512, 3))).toBe(true);
    await file.dropCache(0, 0);
    await file.close();
    await expect(inner.size()).rejects.toMatchObject({ code: 'EBADF' });
  });
});
