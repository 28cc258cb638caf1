#!/usr/bin/env python3
"""System calls Node cannot make, for the mount tests (lseek SEEK_DATA/SEEK_HOLE, fallocate modes, mmap).

  file-ops.py seek PATH OFFSET...          one JSON line: {"OFFSET": [data, hole], ...}, each an offset or an errno name
  file-ops.py write-seek PATH OFF:LEN:BYTE... -- OFFSET...   pwrite the ranges, then like seek on the same open descriptor
  file-ops.py extents PATH                 one JSON line: the data extents [[start, end], ...] found with SEEK_DATA/SEEK_HOLE
  file-ops.py fallocate PATH MODE OFF LEN  fallocate(2) with the numeric MODE on PATH opened O_RDWR (or O_RDONLY with MODE
                                           prefixed 'r'); prints 'ok', the errno name, or 'open ERRNO' when the open fails
  file-ops.py sizes SEED STEPS A B [nommap]  the same random sequence of size-changing operations (truncate to unaligned
                                           sizes, writes ending at unaligned offsets, mmap reads and writes of the last
                                           page, fallocate allocate/punch/zero at unaligned ranges) on files A and B;
                                           after each step both must agree in st_size and bytes, and every hole that
                                           SEEK_HOLE/SEEK_DATA report in B must read as zeros. 'nommap' leaves mmap out
                                           (a direct_io file cannot be mapped shared).
                                           Prints one JSON line {"steps": N, "size": final size}; exits 1 at the first
                                           difference with a description.
"""
import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import random
import sys

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def errname_of(number):
    """The errno name (EOPNOTSUPP rather than its Linux alias ENOTSUP)."""
    return "EOPNOTSUPP" if number == errno.EOPNOTSUPP else errno.errorcode.get(number, str(number))


def errname(err):
    return errname_of(err.errno)


def seek_both(fd, offset):
    out = []
    for whence in (os.SEEK_DATA, os.SEEK_HOLE):
        try:
            out.append(os.lseek(fd, offset, whence))
        except OSError as err:
            out.append(errname(err))
    return out


def cmd_seek(path, offsets):
    fd = os.open(path, os.O_RDONLY)
    try:
        print(json.dumps({str(o): seek_both(fd, o) for o in map(int, offsets)}))
    finally:
        os.close(fd)


def cmd_write_seek(path, args):
    """Write OFFSET:LENGTH:BYTE ranges, then (the descriptor still open, the data possibly still in the
    kernel's cache) SEEK_DATA/SEEK_HOLE at the offsets after "--"."""
    split = args.index("--")
    fd = os.open(path, os.O_RDWR)
    try:
        for spec in args[:split]:
            offset, length, byte = (int(x, 0) for x in spec.split(":"))
            os.pwrite(fd, bytes([byte]) * length, offset)
        print(json.dumps({str(o): seek_both(fd, o) for o in map(int, args[split + 1:])}))
    finally:
        os.close(fd)


def cmd_extents(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        extents, pos = [], 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append([start, end])
            pos = end
        print(json.dumps(extents))
    finally:
        os.close(fd)


def cmd_fallocate(path, mode, offset, length):
    flags = os.O_RDONLY if mode.startswith("r") else os.O_RDWR
    try:
        fd = os.open(path, flags)
    except OSError as err:
        print(f"open {errname(err)}")
        return
    try:
        if libc.fallocate(fd, int(mode.lstrip("r"), 0), int(offset), int(length)) != 0:
            print(errname_of(ctypes.get_errno()))
        else:
            print("ok")
    finally:
        os.close(fd)


PAGE = mmap.PAGESIZE


FALLOCATE_MODES = {"allocate": 0, "punch": 0x03, "zero": 0x10, "zero-keep-size": 0x11}


def fallocate(fd, mode, offset, length):
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def step(rng, fds, size, max_size, kinds):
    """One random operation of `kinds` applied to every fd; returns its description."""
    kind = rng.choice(kinds)
    if kind == "fallocate":
        name = rng.choice(sorted(FALLOCATE_MODES))
        offset = rng.randrange(0, max_size)
        length = rng.randrange(1, max(2, min(max_size - offset, 4 * 65536)))
        for fd in fds:
            fallocate(fd, FALLOCATE_MODES[name], offset, length)
        return f"fallocate {name} [{offset}, {offset + length})"
    if kind == "truncate":
        new = rng.randrange(0, max_size)
        for fd in fds:
            os.ftruncate(fd, new)
        return f"truncate {new}"
    if kind == "write":
        end = rng.randrange(1, max_size)
        start = max(0, end - rng.randrange(1, 3 * PAGE))
        data = bytes(rng.randrange(1, 256) for _ in range(end - start))
        for fd in fds:
            os.pwrite(fd, data, start)
        return f"write [{start}, {end})"
    if size == 0:
        return "mmap of an empty file skipped"
    last = (size - 1) // PAGE * PAGE
    length = size - last
    if kind == "mmap-read":
        seen = []
        for fd in fds:
            with mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=last) as m:
                seen.append(m[:])
        if seen[0] != seen[1]:
            raise AssertionError(f"mmap read of the last page at {last} differs")
        return f"mmap-read last page {last}+{length}"
    at = rng.randrange(0, length)
    n = rng.randrange(1, length - at + 1)
    data = bytes(rng.randrange(1, 256) for _ in range(n))
    for fd in fds:
        with mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=last) as m:
            m[at:at + n] = data
            m.flush()
    return f"mmap-write [{last + at}, {last + at + n})"


def check_holes(fd, size, what):
    """Every hole SEEK_DATA/SEEK_HOLE report in fd reads as zeros."""
    pos = 0
    while pos < size:
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        if hole >= size:
            return
        try:
            data = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            data = size
        if any(os.pread(fd, data - hole, hole)):
            raise AssertionError(f"after {what}: the hole [{hole}, {data}) does not read as zeros")
        pos = data


def compare(fds, what):
    sizes = [os.fstat(fd).st_size for fd in fds]
    if sizes[0] != sizes[1]:
        raise AssertionError(f"after {what}: st_size {sizes[0]} vs {sizes[1]}")
    contents = [os.pread(fd, sizes[0] + 2 * PAGE, 0) for fd in fds]
    if contents[0] != contents[1]:
        first = next(i for i, (a, b) in enumerate(zip(contents[0], contents[1])) if a != b) if len(contents[0]) == len(contents[1]) else min(map(len, contents))
        raise AssertionError(f"after {what}: contents differ at byte {first} (lengths {len(contents[0])}, {len(contents[1])})")
    check_holes(fds[1], sizes[1], what)
    return sizes[0]


def cmd_sizes(seed, steps, a, b, mmap_mode="mmap"):
    rng = random.Random(int(seed))
    kinds = ["truncate", "truncate", "write", "write", "fallocate", "fallocate"]
    if mmap_mode == "mmap":
        kinds += ["mmap-write", "mmap-read"]
    fds = [os.open(p, os.O_RDWR) for p in (a, b)]
    try:
        size = compare(fds, "open")
        for i in range(int(steps)):
            what = step(rng, fds, size, 3 * 65536 + 777, kinds)
            try:
                size = compare(fds, f"step {i}: {what}")
            except AssertionError as err:
                print(str(err), file=sys.stderr)
                sys.exit(1)
        print(json.dumps({"steps": int(steps), "size": size}))
    finally:
        for fd in fds:
            os.close(fd)


def main(argv):
    commands = {"seek": lambda a: cmd_seek(a[0], a[1:]), "write-seek": lambda a: cmd_write_seek(a[0], a[1:]),
                "extents": lambda a: cmd_extents(a[0]),
                "fallocate": lambda a: cmd_fallocate(*a), "sizes": lambda a: cmd_sizes(*a)}
    if len(argv) < 2 or argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    commands[argv[1]](argv[2:])


if __name__ == "__main__":
    main(sys.argv)
