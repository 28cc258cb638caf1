import { afterEach, describe, expect, it, vi } from 'vitest';
import { findAnyTool, findTool, isCI, MissingToolError, requireAnyTool, requireTool } from '../../helpers/tools.js';

describe('tools', () => {
  const savedCI = process.env.CI;
  afterEach(() => {
    if (savedCI === undefined) delete process.env.CI;
    else process.env.CI = savedCI;
    vi.restoreAllMocks();
  });

  it('finds executables in PATH and sbin, and paths by existence', () => {
    expect(findTool('sh')).toMatch(/\/sh$/);
    expect(findTool('/proc/self/mountinfo')).toBe('/proc/self/mountinfo');
    expect(findTool('no-such-tool-qcow2fuse')).toBeUndefined();
    expect(findTool('/no/such/path')).toBeUndefined();
    expect(findAnyTool('no-such-tool-qcow2fuse', 'sh')).toBe(findTool('sh'));
  });

  it('under CI a missing tool throws', () => {
    process.env.CI = 'true';
    expect(isCI()).toBe(true);
    expect(requireTool('sh')).toBe(true);
    expect(() => requireTool('no-such-tool-qcow2fuse')).toThrow(MissingToolError);
    expect(() => requireAnyTool('no-such-a', 'no-such-b')).toThrow(/no-such-a\|no-such-b.*CI=true/);
  });

  it('outside CI a missing tool warns loudly once and returns false', () => {
    process.env.CI = 'false';
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => undefined);
    expect(requireTool('no-such-tool-qcow2fuse-2')).toBe(false);
    expect(requireTool('no-such-tool-qcow2fuse-2')).toBe(false);
    expect(warn).toHaveBeenCalledTimes(1);
    expect(String(warn.mock.calls[0]?.[0])).toMatch(/SKIPPING.*no-such-tool-qcow2fuse-2/);
  });
});
