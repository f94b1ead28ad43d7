"""The instance store: received instances made durable on disk and committed in the journal.

An instance is durable when its file and folder are fsync'd and its row is committed; only
then may the SCP acknowledge it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from dicomnode.durable import fsync_dir, write_durably
from dicomnode.flow import StoredInstance
from dicomnode.spool.journal import Journal, SpoolError, SpoolFull, is_valid_uid


class InstanceStore(Journal):
    """Receive: store instances durably, list a study's instances."""

    def store(
        self,
        encoded: bytes,
        *,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        calling_ae: str,
    ) -> StoredInstance:
        """Make one received instance durable and journal it; idempotent per SOP Instance UID.

        A byte-identical resend of an instance we hold changes nothing: PACS retry whole
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
        free = shutil.disk_usage(self.instances_dir).free
        if free - len(encoded) < self.min_free_bytes:
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
                and _holds(path, encoded)
            ):
                return stored
            try:
                new_folder = not path.parent.exists()
                write_durably(path, lambda handle: handle.write(encoded))
                if new_folder:
                    fsync_dir(self.instances_dir)
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


def _holds(path: Path, content: bytes) -> bool:
    """True when the file at `path` has exactly `content`."""
    try:
        return path.stat().st_size == len(content) and path.read_bytes() == content
    except OSError:
        return False
