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
    ) -> StoredInstance:
        """Make one received instance durable and journal it; idempotent per SOP Instance UID.

        `content` is the instance as a DICOM file: its bytes, or a file under `incoming_dir`
        that is moved into the spool (left where it is when nothing needs storing). A
        byte-identical resend of an instance we hold changes nothing: PACS retry whole
        studies, and that must not re-process a finished one (a failed one is retried). An
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
        if isinstance(content, Path):
            # Its data on disk before the study's lock is taken, so that the associations
            # sending one study sync their files side by side, not one after another.
            try:
                fsync_file(content)
            except OSError as exc:
                raise SpoolError(f"cannot sync received file: {exc.strerror}") from exc
        # Per-study lock: a purge of this study must not interleave with a store into it.
        with self._study_lock(study_instance_uid):
            previous = (
                self._db()
                .execute(
                    "SELECT i.path, s.state FROM instances i JOIN studies s USING (study_instance_uid) "
                    "WHERE i.sop_instance_uid=?",
                    (sop_instance_uid,),
                )
                .fetchone()
            )
            if (
                previous is not None
                and previous["state"] != "failed"
                and Path(previous["path"]) == path
                and _holds(path, content, size)
            ):
                return stored
            try:
                if isinstance(content, Path):
                    _move_durably(content, path)
                else:
                    write_durably(path, lambda handle: handle.write(content))
            except OSError as exc:
                raise SpoolError(f"cannot write instance file: {exc.strerror}") from exc
            now = time.time()
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(sop_instance_uid) DO UPDATE SET sop_class_uid=excluded.sop_class_uid, "
                    "study_instance_uid=excluded.study_instance_uid, "
                    "series_instance_uid=excluded.series_instance_uid, path=excluded.path, "
                    "calling_ae=excluded.calling_ae, received_at=excluded.received_at",
                    (
                        sop_instance_uid,
                        sop_class_uid,
                        study_instance_uid,
                        series_instance_uid,
                        str(path),
                        calling_ae,
                        now,
                    ),
                )
                db.execute(
                    "INSERT INTO studies (study_instance_uid, state, generation, last_received_at, "
                    "updated_at) VALUES (?, 'receiving', 0, ?, ?) "
                    "ON CONFLICT(study_instance_uid) DO UPDATE SET state='receiving', "
                    "generation=generation+1, last_received_at=excluded.last_received_at, "
                    "reason=NULL, attempts=0, not_before=0, updated_at=excluded.updated_at",
                    (study_instance_uid, now, now),
                )
            if previous is not None and Path(previous["path"]) != path:
                Path(previous["path"]).unlink(missing_ok=True)
            return stored

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


def _move_durably(received: Path, path: Path) -> None:
    """Move a received file, its data already synced, into place and make its new name durable."""
    make_folder_durably(path.parent)
    try:
        os.replace(received, path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Received on another file system (not under incoming/): copied, a chunk at a time.
        with received.open("rb") as source:
            write_durably(path, lambda handle: shutil.copyfileobj(source, handle, _COMPARE_CHUNK))
        return
    fsync_dir(path.parent)
