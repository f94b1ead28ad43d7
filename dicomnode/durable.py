"""Writing files so that a crash leaves the old content or the new, never a torn file.

Temporary file in the target folder, fsync, rename over the target, fsync of the folder: the
sequence every durable write of the node (received instances, results) goes through.
"""

from __future__ import annotations

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
    make_folder_durably(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
