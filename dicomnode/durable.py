"""Writing files so that a crash leaves the old content or the new, never a torn file.

Temporary file in the target folder, fsync, rename over the target, fsync of the folder: the
sequence every durable write of the node (received instances, results) goes through. A file
written without it is made durable later, with everything else on its file system, by
`sync_file_system`.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folder_durably(path: Path) -> Path:
    """Create folder `path` (and missing parents, 0700) so that each new entry survives a power loss.

    A folder whose creation was not synced to its parent can vanish after a crash, taking
    durable files with it while the journal still points at them.
    """
    missing = []
    folder = Path(path)
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        fsync_dir(folder.parent)
    return path


def fsync_file(path: Path) -> None:
    """Put the data of a file that someone else wrote on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Atomically replace `path` with what `write` puts into the open file it is given."""
    return _replace(path, write, sync=True)


def write_unsynced(path: Path, data: bytes) -> Path:
    """Replace `path` with `data` by a rename, as write_durably does but syncing nothing: for a
    file whose content is held durably elsewhere until `sync_file_system` has run."""
    return _replace(path, lambda handle: handle.write(data), sync=False)


def _replace(path: Path, write: Callable[[BinaryIO], object], *, sync: bool) -> Path:
    make_folder_durably(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(path.parent)
    return path


_libc = ctypes.CDLL(None, use_errno=True)


def sync_file_system(folder: int) -> None:
    """Put everything written to the file system holding the open `folder` on disk: data, names,
    folders.

    One pass of the kernel's write-back (syncfs(2)) with one journal commit, where syncing the
    same files one by one costs a journal commit each. Raises OSError when it fails, and, on
    Linux 5.8 and newer, when a write-back on that file system failed since `folder` was opened
    or since the last call that reported one: keep `folder` open between calls, or a failure of
    the kernel's own write-back in between goes unseen.
    """
    if _libc.syncfs(folder) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_folder(path: Path) -> int:
    """An open descriptor of folder `path`, for sync_file_system."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
