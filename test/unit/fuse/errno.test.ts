/** Errors → FUSE errnos: from `code`, never from Node's (negative) `errno`. */
import { constants } from 'node:os';
import { describe, expect, it } from 'vitest';
import { errnoName, errnoNumber, fsError, toFuseErrno } from '../../../src/fuse/errno.js';
import { HostIoError, LockError } from '../../../src/io/errors.js';
import { Qcow2CorruptError, Qcow2RangeError, Qcow2ReadOnlyError } from '../../../src/qcow2/format/errors.js';

describe('errno mapping', () => {
  it('maps the project error classes by code', () => {
    expect(toFuseErrno(new HostIoError('ENOSPC', '/i', 'pwrite', 0))).toBe(-constants.errno.ENOSPC);
    expect(toFuseErrno(new HostIoError('EIO', '/i', 'pread', 0))).toBe(-constants.errno.EIO);
    expect(toFuseErrno(new Qcow2ReadOnlyError('/i', 'corrupt'))).toBe(-constants.errno.EROFS);
    expect(toFuseErrno(new Qcow2RangeError('/i', 'past end'))).toBe(-constants.errno.ERANGE);
    expect(toFuseErrno(new Qcow2CorruptError('bad', { image: '/i' }, true))).toBe(-constants.errno.EIO);
    expect(toFuseErrno(new LockError('/i', 'locked'))).toBe(-constants.errno.EBUSY);
    expect(toFuseErrno(fsError('EFBIG', 'too big'))).toBe(-constants.errno.EFBIG);
  });

  it('uses code, not the (already negative, platform) errno number', () => {
    const nodeError = Object.assign(new Error('x'), { code: 'EACCES', errno: -999 });
    expect(toFuseErrno(nodeError)).toBe(-constants.errno.EACCES);
  });

  it('answers EIO for anything it does not recognise', () => {
    for (const thrown of [new Error('plain'), { code: 'ERR_SOMETHING' }, { code: 42 }, null, undefined, 'text']) {
      expect(errnoName(thrown)).toBe('EIO');
      expect(toFuseErrno(thrown)).toBe(-constants.errno.EIO);
    }
  });

  it('knows errno names, and our own codes', () => {
    expect(errnoNumber('ENOENT')).toBe(constants.errno.ENOENT);
    expect(errnoNumber('ECORRUPT')).toBe(constants.errno.EIO);
    expect(errnoNumber('NOPE')).toBeUndefined();
  });
});
