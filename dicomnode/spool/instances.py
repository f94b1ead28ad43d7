"""The instance store: received instances made durable on disk and committed in the journal.

An instance is durable when its file and folder are fsync'd and its row is committed; only
then may the SCP acknowledge it. The SCP receives into `incoming/` on the same file system,
so an instance of any size is stored by a rename, never held in memory or copied.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from dicomnode.durable import fsync_dir, fsync_file, make_folder_durably, write_durably
from dicomnode.flow import StoredInstance
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
        data_synced: bool = False,
    ) -> StoredInstance:
        """Make one received instance durable and journal it; idempotent per SOP Instance UID.

        `content` is the instance as a DICOM file: its bytes, or a file under `incoming_dir`
        that is the spool's once stored (moved into the spool, or deleted when nothing needs
        storing), its data already on disk if `data_synced` (synced by whoever wrote it). A byte-identical
        resend of an instance we hold changes nothing: PACS retry whole studies, and that
        must not re-process a finished one (a failed one is retried). An
        instance that moved to another study leaves no stale file behind. Raises SpoolFull
        below the free-space floor and SpoolError when the disk write fails, in both cases
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
        if isinstance(content, Path) and not data_synced:
            # Its data on disk before the group commit, so that the associations sending at
            # once sync their files side by side, not one after another.
            try:
                fsync_file(content)
            except OSError as exc:
                raise SpoolError(f"cannot sync received file: {exc.strerror}") from exc
        return self._commit(_Arrival(stored, content, size))

    def _locate(self, state_dir: Path, min_free_bytes: int, mode: str) -> None:
        super()._locate(state_dir, min_free_bytes, mode)
        self._arrivals: list[_Arrival] = []
        self._arrivals_lock = threading.Lock()
        self._committing = threading.Lock()

    def _commit(self, arrival: _Arrival) -> StoredInstance:
        """Group commit: whoever commits takes every arrival waiting, and waiters find theirs done.

        Associations that store at once share the folder fsync (one per study folder) and the
        journal commit (one WAL fsync) instead of queueing for one each; an association alone
        commits alone, at the same cost as before. Each instance is still durable (file, name,
        row) before its store returns.
        """
        with self._arrivals_lock:
            self._arrivals.append(arrival)
        with self._committing:
            if not arrival.done:
                with self._arrivals_lock:
                    group, self._arrivals = self._arrivals, []
                self._commit_group(group)
        if arrival.committed:
            return arrival.stored
        raise arrival.error or SpoolError("instance not committed")

    def _commit_group(self, group: list[_Arrival]) -> None:
        """Place each file, sync each folder once, commit all rows in one transaction.

        The per-study locks (a purge must not interleave with a store into its study) are
        taken in one order, so that two committers can never wait on each other.
        """
        try:
            locks = {self._study_lock(arrival.stored.study_instance_uid) for arrival in group}
            with ExitStack() as held:
                for lock in sorted(locks, key=self._study_locks.index):
                    held.enter_context(lock)
                placed = [arrival for arrival in group if self._place(arrival)]
                for folder in {arrival.stored.path.parent for arrival in placed}:
                    try:
                        fsync_dir(folder)
                    except OSError as exc:
                        for arrival in placed:
                            if arrival.stored.path.parent == folder:
                                arrival.error = SpoolError(f"cannot sync instance folder: {exc.strerror}")
                placed = [arrival for arrival in placed if arrival.error is None]
                if placed:
                    self._journal(placed)
                for arrival in placed:
                    arrival.committed = True
                    if arrival.previous is not None and arrival.previous != arrival.stored.path:
                        arrival.previous.unlink(missing_ok=True)
        except BaseException as exc:
            for arrival in group:
                if not arrival.committed and arrival.error is None:
                    arrival.error = exc
            raise
        finally:
            for arrival in group:
                arrival.done = True

    def _place(self, arrival: _Arrival) -> bool:
        """Put an arrival's file in place, its name not yet synced; False when no row is to be written.

        A byte-identical resend of an instance held (and not failed) is committed as it is.
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
        if (
            previous is not None
            and previous["state"] != "failed"
            and Path(previous["path"]) == stored.path
            and _holds(stored.path, content, arrival.size)
        ):
            if isinstance(content, Path):
                content.unlink(missing_ok=True)
            arrival.committed = True
            return False
        arrival.previous = Path(previous["path"]) if previous is not None else None
        try:
            if isinstance(content, Path):
                _move(content, stored.path)
            else:
                write_durably(stored.path, lambda handle: handle.write(content))
        except OSError as exc:
            arrival.error = SpoolError(f"cannot write instance file: {exc.strerror}")
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
    """An instance waiting for its group's commit, and what became of it."""

    stored: StoredInstance
    content: bytes | Path
    size: int
    previous: Path | None = None
    committed: bool = False
    error: BaseException | None = None
    done: bool = False


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
    """Move a received file, its data already synced, into place; its new name is synced by the caller."""
    make_folder_durably(path.parent)
    try:
        os.replace(received, path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Received on another file system (not under incoming/): copied, a chunk at a time.
        with received.open("rb") as source:
            write_durably(path, lambda handle: shutil.copyfileobj(source, handle, _COMPARE_CHUNK))
