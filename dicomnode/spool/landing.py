"""The landing log: one receiving process's record of the small instances it acknowledged
before their files were synced.

A group of landed instances is appended here in one write and made durable by one
`fdatasync`, outside the journal's writer lock; their rows are then committed in the journal
without a flush of their own, with the log's mark (the last sequence number committed). Each
receiving process has its own log (the node's is "0", a receiver's its index), so that
processes storing at once flush side by side instead of queueing for the journal's flush one
after another. After a power loss, the records above the journal's mark are the stores whose
commit did not reach the disk, and are done again; those at or below it only have their files
written again where the row still names them (`InstanceStore.replay_landing_logs`).

Two segment files are used in turn, each overwritten from its start (an overwrite's
`fdatasync` on ext4 with a journal: 0.22-0.34 ms for 72 KB, an append's 0.56-0.81 ms). The
settler switches to the other segment, syncs the file system, and the one it left is free.

A record: magic, sequence number, payload length, CRC-32 of those and the payload; the payload
is the row (six strings and the time received) and the file's bytes. Reading a segment stops
at the first record that is torn, corrupt, or not the next number: what follows is either a
write that never completed (never acknowledged) or what the segment held before it was reused.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dicomnode.durable import make_folder_durably
from dicomnode.flow import StoredInstance

_MAGIC = b"DNL1"
_HEADER = struct.Struct("<4sQII")  # magic, sequence number, payload length, CRC-32
_STRING = struct.Struct("<H")
_TIME = struct.Struct("<d")
_FIELDS = (
    "sop_instance_uid",
    "sop_class_uid",
    "study_instance_uid",
    "series_instance_uid",
    "path",
    "calling_ae",
)


@dataclass(frozen=True)
class Landing:
    """One landed instance: its journal row and its file's bytes."""

    seq: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: str
    calling_ae: str
    received_at: float
    content: bytes


def landing_of(stored: StoredInstance, seq: int, received_at: float, content: bytes) -> Landing:
    """The record of a store of `stored` with the file's bytes `content`."""
    return Landing(seq, *(str(getattr(stored, name)) for name in _FIELDS), received_at, content)


def stored_of(landing: Landing) -> StoredInstance:
    """The instance a record stores."""
    return StoredInstance(
        **{name: getattr(landing, name) for name in _FIELDS if name != "path"}, path=Path(landing.path)
    )


def encode(landing: Landing) -> bytes:
    """A record of `landing`, as it is written to a segment."""
    fields = b"".join(_string(getattr(landing, name)) for name in _FIELDS)
    payload = fields + _TIME.pack(landing.received_at) + landing.content
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<QI", landing.seq, len(payload))))
    return _HEADER.pack(_MAGIC, landing.seq, len(payload), crc) + payload


def _string(value: str) -> bytes:
    data = value.encode("utf-8")
    return _STRING.pack(len(data)) + data


def _decode(seq: int, payload: bytes) -> Landing:
    values, offset = [], 0
    for _ in _FIELDS:
        (length,) = _STRING.unpack_from(payload, offset)
        offset += _STRING.size
        values.append(payload[offset : offset + length].decode("utf-8"))
        offset += length
    (received_at,) = _TIME.unpack_from(payload, offset)
    return Landing(seq, *values, received_at=received_at, content=payload[offset + _TIME.size :])


def read_segment(path: Path) -> Iterator[Landing]:
    """The segment's records from its start, up to the first that is torn, corrupt or out of
    sequence; nothing for a segment that does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    offset, expected = 0, None
    while offset + _HEADER.size <= len(data):
        magic, seq, length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        if magic != _MAGIC or start + length > len(data) or (expected is not None and seq != expected):
            return
        payload = data[start : start + length]
        if zlib.crc32(payload, zlib.crc32(struct.pack("<QI", seq, length))) != crc:
            return
        yield _decode(seq, payload)
        offset, expected = start + length, seq + 1


def segment_paths(folder: Path, name: str) -> tuple[Path, Path]:
    """The two segments of the log `name` in `folder`."""
    return folder / f"{name}-0.log", folder / f"{name}-1.log"


def log_names(folder: Path) -> list[str]:
    """The names of the logs that have segments in `folder`."""
    return sorted({path.name.rsplit("-", 1)[0] for path in folder.glob("*-[01].log")})


def holder_path(folder: Path, name: str) -> Path:
    """The lock file of the log `name`: the process that writes the log, or replays it, holds it
    exclusively (`InstanceStore._hold_log`), so that no two ever use one log at once."""
    return folder / f"{name}.lock"


def read_log(folder: Path, name: str) -> list[Landing]:
    """Every readable record of both segments of the log `name`, by sequence number."""
    return sorted(
        (r for path in segment_paths(folder, name) for r in read_segment(path)), key=lambda r: r.seq
    )


def _extend(fd: int, size: int) -> None:
    """Give a segment `size` bytes of written zeros past what it holds, durably, if it is smaller."""
    end = os.fstat(fd).st_size
    if end >= size:
        return
    while end < size:
        end += os.pwrite(fd, _ZEROS[: size - end], end)
    os.fsync(fd)


def forget_segment(path: Path) -> None:
    """Make a segment whose records are all durable elsewhere read as empty (its first record's
    magic zeroed, flushed), keeping its size so that its next use overwrites in place."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if os.fstat(fd).st_size >= len(_MAGIC):
            os.pwrite(fd, bytes(len(_MAGIC)), 0)
            os.fdatasync(fd)
    finally:
        os.close(fd)


#: Size a segment is given when it is created (written with zeros, then synced), so that
#: appending to it overwrites blocks it has: an overwrite's flush commits no file-system metadata
#: (a CT slice's record: 0.22-0.34 ms against 0.56-0.81 ms growing the file). A settling
#: interval's records that go beyond it grow the segment, which keeps that size for its next use.
SEGMENT_BYTES = 16 << 20
_ZEROS = bytes(1 << 20)


class LandingLog:
    """A receiving process's two segments, `<folder>/<name>-0.log` and `-1.log` (0600, in a 0700
    folder), written in turn from their start."""

    def __init__(self, folder: Path, name: str) -> None:
        make_folder_durably(folder)
        self._folder, self._name = folder, name
        self.paths = segment_paths(folder, name)
        self._fds = tuple(os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600) for p in self.paths)
        for fd in self._fds:
            _extend(fd, SEGMENT_BYTES)
        self._current = 0
        self._offset = 0

    def records(self) -> list[Landing]:
        """Every readable record of both segments, by sequence number."""
        return read_log(self._folder, self._name)

    def append(self, landings: list[Landing]) -> None:
        """Write the records at the current segment's end in one write, then flush them to disk
        (`fdatasync`); raises OSError, and then none of them may be acknowledged."""
        data = b"".join(encode(landing) for landing in landings)
        fd = self._fds[self._current]
        view, offset = memoryview(data), self._offset
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
        os.fdatasync(fd)
        self._offset = offset

    @property
    def pending(self) -> bool:
        """Whether records were written to the current segment since it was switched to."""
        return self._offset > 0

    def switch(self) -> Path:
        """Write the other segment from its start from now on; the segment left, whose records
        are free once the file system has been synced.

        The other segment's first record is zeroed (not flushed), so that until a record is
        written there it reads as empty, not as what it held before (records a replay would
        find at or below the journal's mark anyway).
        """
        left = self.paths[self._current]
        self._current, self._offset = 1 - self._current, 0
        os.pwrite(self._fds[self._current], bytes(len(_MAGIC)), 0)
        return left

    @property
    def current(self) -> Path:
        """The segment written to now."""
        return self.paths[self._current]

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
