"""The instance store: received instances made durable on disk and committed in the journal.

An instance is durable when its file and folder are fsync'd and its row is committed; only
then may the SCP acknowledge it. The SCP receives into `incoming/` on the same file system,
so an instance of any size is stored by a rename, never held in memory or copied.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dicomnode.durable import fsync_dir, fsync_file, make_folder_durably, write_durably
from dicomnode.flow import StoredInstance
from dicomnode.spool.batch import Batch
from dicomnode.spool.journal import Journal, SpoolError, SpoolFull, is_valid_uid


class InstanceStore(Journal):
    """Receive: store instances durably, list a study's instances."""

    def store(
        self,
        content: bytes | Path,
        *,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        calling_ae: str,
    ) -> StoredInstance:
        """Make one received instance durable and journal it; idempotent per SOP Instance UID.

        `content` is the instance as a DICOM file: its bytes, or a file under `incoming_dir`
        that is the spool's once stored (moved into the spool and synced there, or deleted when
        nothing needs storing). A byte-identical resend of an instance we hold changes nothing:
        PACS retry whole studies, and that must not re-process a finished one (a failed one is
        retried). An instance that moved to another study leaves no stale file behind. Raises
        SpoolFull below the free-space floor and SpoolError when the disk write fails, in both cases
        before anything is acknowledged.
        """
        for name, uid in (
            ("SOPInstanceUID", sop_instance_uid),
            ("StudyInstanceUID", study_instance_uid),
            ("SeriesInstanceUID", series_instance_uid),
        ):
            if not is_valid_uid(uid):
                raise ValueError(f"{name} is not a valid UID")
        size = content.stat().st_size if isinstance(content, Path) else len(content)
        free = shutil.disk_usage(self.instances_dir).free
        # A received file already takes its space: the floor applies to what is left after it.
        if free - (0 if isinstance(content, Path) else size) < self.min_free_bytes:
            raise SpoolFull(f"free space {free // 2**20} MiB is below the floor")
        path = self.instances_dir / study_instance_uid / f"{sop_instance_uid}.dcm"
        stored = StoredInstance(
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            path=path,
            calling_ae=calling_ae,
        )
        arrival = _Arrival(stored, content, size)
        # A purge of the study waits until the row is committed, or it could delete the file
        # from under it; stores into one study go side by side and meet at the flushes.
        with self._study_locked(study_instance_uid, exclusive=False):
            if self._place(arrival):
                self._commits.run(arrival)
        if arrival.committed:
            return stored
        raise arrival.error or SpoolError("instance not committed")

    def _locate(self, state_dir: Path, min_free_bytes: int, mode: str) -> None:
        super()._locate(state_dir, min_free_bytes, mode)
        self._commits: Batch[_Arrival] = Batch(self._commit_group)

    def _commit_group(self, arrivals: list[_Arrival]) -> None:
        """Group commit: sync each folder once, then commit all rows in one transaction.

        Associations that store at once (each file placed and synced in its own thread, side
        by side) share the folder fsync and the journal's WAL fsync instead of queueing for
        one each; an association alone commits alone. Each instance is still durable (file,
        name, row) before its store returns.
        """
        for folder in {arrival.stored.path.parent for arrival in arrivals}:
            try:
                fsync_dir(folder)
            except OSError as exc:
                for arrival in arrivals:
                    if arrival.stored.path.parent == folder:
                        arrival.error = SpoolError(f"cannot sync instance folder: {exc.strerror}")
        synced = [arrival for arrival in arrivals if arrival.error is None]
        if not synced:
            return
        try:
            self._journal(synced)
        except BaseException as exc:
            for arrival in synced:
                arrival.error = exc
            raise
        for arrival in synced:
            arrival.committed = True
            if arrival.previous is not None and arrival.previous != arrival.stored.path:
                arrival.previous.unlink(missing_ok=True)

    def _place(self, arrival: _Arrival) -> bool:
        """Put an arrival's file in place with its data on disk, its name not yet synced; False
        when no row is to be written (a byte-identical resend, or a failure: the arrival's error).

        A received file that no row refers to by its new name takes the name first and is synced
        under it: on journaling file systems (ext4, XFS) the file's own sync then carries the
        name, and the folder's sync that follows finds nothing left to write (7 us instead of
        0.3 ms per instance on ext4). Until the row is committed nothing reads the name, and a
        crash leaves at most an unreferenced file that a resend replaces. A file that replaces
        one a row refers to is synced before it takes the name, so the old one stays whole until
        the new one is.
        """
        stored, content = arrival.stored, arrival.content
        previous = (
            self._db()
            .execute(
                "SELECT i.path, s.state FROM instances i JOIN studies s USING (study_instance_uid) "
                "WHERE i.sop_instance_uid=?",
                (stored.sop_instance_uid,),
            )
            .fetchone()
        )
        referred = previous is not None and Path(previous["path"]) == stored.path
        if referred and previous["state"] != "failed" and _holds(stored.path, content, arrival.size):
            if isinstance(content, Path):
                content.unlink(missing_ok=True)
            arrival.committed = True
            return False
        arrival.previous = Path(previous["path"]) if previous is not None else None
        if isinstance(content, bytes):
            try:
                write_durably(stored.path, lambda handle: handle.write(content))
            except OSError as exc:
                arrival.error = SpoolError(f"cannot write instance file: {exc.strerror}")
                return False
            return True
        try:
            if referred:
                fsync_file(content)
        except OSError as exc:
            arrival.error = SpoolError(f"cannot sync received file: {exc.strerror}")
            return False
        try:
            _move(content, stored.path)
        except OSError as exc:
            arrival.error = SpoolError(f"cannot write instance file: {exc.strerror}")
            return False
        if not referred:
            try:
                fsync_file(stored.path)
            except OSError as exc:
                stored.path.unlink(missing_ok=True)  # no row refers to it, and its data may be torn
                arrival.error = SpoolError(f"cannot sync received file: {exc.strerror}")
                return False
        return True

    def _journal(self, arrivals: list[_Arrival]) -> None:
        """Record the arrivals' instances, and their studies as receiving, in one transaction."""
        now = time.time()
        with self._transaction() as db:
            for stored in (arrival.stored for arrival in arrivals):
                db.execute(
                    "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(sop_instance_uid) DO UPDATE SET sop_class_uid=excluded.sop_class_uid, "
                    "study_instance_uid=excluded.study_instance_uid, "
                    "series_instance_uid=excluded.series_instance_uid, path=excluded.path, "
                    "calling_ae=excluded.calling_ae, received_at=excluded.received_at",
                    (
                        stored.sop_instance_uid,
                        stored.sop_class_uid,
                        stored.study_instance_uid,
                        stored.series_instance_uid,
                        str(stored.path),
                        stored.calling_ae,
                        now,
                    ),
                )
                db.execute(
                    "INSERT INTO studies (study_instance_uid, state, generation, last_received_at, "
                    "updated_at) VALUES (?, 'receiving', 0, ?, ?) "
                    "ON CONFLICT(study_instance_uid) DO UPDATE SET state='receiving', "
                    "generation=generation+1, last_received_at=excluded.last_received_at, "
                    "reason=NULL, attempts=0, not_before=0, updated_at=excluded.updated_at",
                    (stored.study_instance_uid, now, now),
                )

    def wrote_result(self, study_instance_uid: str, sop_instance_uid: str) -> bool:
        """True when this node wrote a result with this SOP Instance UID into the study's outbox.

        Results are named `<kind>-<SOP Instance UID>.dcm`. One stat for a study without
        results; a PACS that forwards results back got them from this outbox, so until the
        study is purged the folder still holds them.
        """
        if not (is_valid_uid(study_instance_uid) and is_valid_uid(sop_instance_uid)):
            return False
        folder = self.outbox_dir / study_instance_uid
        return folder.is_dir() and any(folder.rglob(f"*-{sop_instance_uid}.dcm"))

    def clear_incoming(self, untouched_for_s: float = 0.0) -> int:
        """Delete half-received files (never acknowledged) not written to for `untouched_for_s`.

        All of them (0) only when the SCP starts: while it runs, files there are being
        received, and only one whose association is long gone may go. Returns the count.
        """
        cleared = 0
        before = time.time() - untouched_for_s
        for leftover in self.incoming_dir.iterdir():
            try:
                if untouched_for_s and leftover.stat().st_mtime > before:
                    continue
                leftover.unlink()
            except FileNotFoundError:  # its association finished with it meanwhile
                continue
            cleared += 1
        return cleared

    def instances(self, study_instance_uid: str) -> tuple[StoredInstance, ...]:
        """The study's instances in the order they were received."""
        rows = (
            self._db()
            .execute(
                "SELECT * FROM instances WHERE study_instance_uid=? ORDER BY received_at, sop_instance_uid",
                (study_instance_uid,),
            )
            .fetchall()
        )
        return tuple(
            StoredInstance(
                sop_instance_uid=r["sop_instance_uid"],
                sop_class_uid=r["sop_class_uid"],
                study_instance_uid=r["study_instance_uid"],
                series_instance_uid=r["series_instance_uid"],
                path=Path(r["path"]),
                calling_ae=r["calling_ae"],
            )
            for r in rows
        )


@dataclass
class _Arrival:
    """An instance on its way through the steps of storing, and what became of it."""

    stored: StoredInstance
    content: bytes | Path
    size: int
    previous: Path | None = None
    committed: bool = False
    error: BaseException | None = None


#: Bytes compared at a time when a resend is checked against the stored file.
_COMPARE_CHUNK = 1 << 20


def _holds(path: Path, content: bytes | Path, size: int) -> bool:
    """True when the file at `path` has exactly `content` (of `size` bytes).

    Sizes first: a changed resend usually differs in length and costs one stat. Files are
    compared a chunk at a time, so a resent whole-slide level is never held in memory.
    """
    try:
        if path.stat().st_size != size:
            return False
        if isinstance(content, bytes):
            return path.read_bytes() == content
        with path.open("rb") as held, content.open("rb") as received:
            while chunk := held.read(_COMPARE_CHUNK):
                if received.read(len(chunk)) != chunk:
                    return False
            return True
    except OSError:
        return False


def _move(received: Path, path: Path) -> None:
    """Move a received file into place; its data and its new name are synced by the caller."""
    make_folder_durably(path.parent)
    try:
        os.replace(received, path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Received on another file system (not under incoming/): copied, a chunk at a time.
        with received.open("rb") as source:
            write_durably(path, lambda handle: shutil.copyfileobj(source, handle, _COMPARE_CHUNK))
