import { describe, expect, it } from 'vitest';
import { run } from '../../helpers/exec.js';

describe('run', () => {
  it('returns stdout, stderr and the exit code without throwing', async () => {
    await expect(run('sh', ['-c', 'echo out; echo err >&2; exit 3'])).resolves.toEqual({ stdout: 'out\n', stderr: 'err\n', code: 3 });
  });

  it('feeds stdin and reports a kill by timeout as 128+SIGTERM', async () => {
    expect((await run('cat', [], { input: 'abc' })).stdout).toBe('abc');
    const slow = await run('sleep', ['10'], { timeoutMs: 100 });
    expect(slow.code).toBe(128 + 15);
  });

  it('rejects when the command does not exist', async () => {
    await expect(run('no-such-command-qcow2fuse', [])).rejects.toMatchObject({ code: 'ENOENT' });
  });
});
