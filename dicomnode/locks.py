"""Locks that several processes on one state folder share: byte ranges of a lock file.

Open file description locks (Linux's F_OFD_SETLK): held by one open of the file, so two
threads of one process holding their own descriptors exclude each other as two processes do,
and released by the kernel when the descriptor is closed, the holder's death included. A
byte stands for what is locked (a study, an association slot); the file stays empty.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _flock(kind: int, offset: int) -> bytes:
    """struct flock (l_type, l_whence, l_start, l_len, l_pid) for one byte; l_pid 0 as OFD needs."""
    return struct.pack("hhxxxxqqixxxx", kind, os.SEEK_SET, offset, 1, 0)


def lock_byte(fd: int, offset: int, *, exclusive: bool, wait: bool) -> bool:
    """Lock the byte at `offset` through `fd`, shared or exclusive; False if `wait` is false and
    another holds it in a conflicting way."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, _flock(kind, offset))
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another
        if wait:
            raise
        return False
    return True


@contextmanager
def byte_locked(path: Path, offset: int, *, exclusive: bool) -> Iterator[None]:
    """Hold the byte at `offset` of `path` (shared or exclusive) for the block; waits for it."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        lock_byte(fd, offset, exclusive=exclusive, wait=True)
        yield
    finally:
        os.close(fd)  # releases the lock


def take_slot(path: Path, slots: int) -> int | None:
    """A descriptor holding one of `slots` bytes of `path` exclusively; None when all are held.

    The slot is given back by closing the descriptor (or by the holder's death).
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    for slot in range(slots):
        if lock_byte(fd, slot, exclusive=True, wait=False):
            return fd
    os.close(fd)
    return None
