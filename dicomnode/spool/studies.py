"""Study state and retention: which studies are waiting, in work, finished, and when they go.

States of a study: receiving -> processing -> done | ignored | failed. A late instance puts
any study back to receiving (and bumps its generation, so a worker that is still processing
the older content does not mark it done); so does an operator's `reprocess` or `requeue
--studies`. Each report version written for a study is remembered (table `reports`), also
after the study is purged, so that a later version can name the one it supersedes.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dicomnode.flow import ObjectReference, ReportVersion
from dicomnode.spool.journal import Journal

#: The SET clause that puts a study back in the queue at once (parameter: now): a new
#: generation, so a worker still processing it does not mark it finished, and fresh attempts.
_REQUEUED = "state='receiving', generation=generation+1, attempts=0, not_before=0, reason=NULL, updated_at=?"

#: Condition on a study row `s` (parameter: finished before): done or ignored, every result sent.
_FINISHED = (
    "state IN ('done', 'ignored') AND updated_at < ? AND NOT EXISTS (SELECT 1 FROM outbox o "
    "WHERE o.study_instance_uid = s.study_instance_uid AND o.state != 'sent')"
)


@dataclass(frozen=True)
class StudyRecord:
    """A study's row in the journal."""

    study_instance_uid: str
    state: str
    generation: int
    last_received_at: float
    prompt_set: str | None
    reason: str | None
    attempts: int = 0


class StudyState(Journal):
    """Studies: claim quiet ones, record outcomes and retries, purge finished ones."""

    def recover(self, quiet_period_s: float = 0.0) -> int:
        """At start-up, put studies whose processing was interrupted back in the queue.

        Every study not yet processed waits `quiet_period_s` from now: while the node was down
        its senders could not send, so the time it was down says nothing of whether a study is
        complete. A sender cut off by the stop resends what was not acknowledged; processed
        before that, the study would be reported on part of its instances, then again (a
        superseding version) once the rest came in. Returns how many were in processing.
        """
        now = time.time()
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE studies SET state='receiving', updated_at=? WHERE state='processing'", (now,)
            )
            recovered = cursor.rowcount
            db.execute(
                "UPDATE studies SET not_before=max(not_before, ?) WHERE state='receiving'",
                (now + quiet_period_s,),
            )
            return recovered

    def claim_quiet_study(self, quiet_period_s: float, now: float | None = None) -> StudyRecord | None:
        """Take the oldest study that has been quiet long enough, marking it processing."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM studies WHERE state='receiving' AND last_received_at <= ? "
                "AND not_before <= ? ORDER BY last_received_at LIMIT 1",
                (now - quiet_period_s, now),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE studies SET state='processing', updated_at=? WHERE study_instance_uid=?",
                (now, row["study_instance_uid"]),
            )
        return _study(row, state="processing")

    def finish_study(
        self,
        study: StudyRecord,
        *,
        state: str,
        reason: str | None = None,
        prompt_set: str | None = None,
        deliveries: Sequence[tuple[str, Path]] = (),
        reports: Sequence[ReportVersion] = (),
    ) -> bool:
        """Record the outcome of processing, the report versions and their deliveries, in one transaction.

        `reports` holds one version per prompt set the study went to; each set has its own chain.

        If a late instance arrived while the study was processed (its generation moved on),
        the deliveries are still queued (they are correct for what was processed) and the
        version is remembered, but the study stays in `receiving` so the new content is
        processed too, as the next version. Returns whether the study reached `state`.

        The report versions are only recorded, and the deliveries only queued, if each builds
        on its set's latest version: two workers can hold one study at once (a late instance
        re-opens it while the first still works), and both would write a "v2" replacing v1.
        The second to finish drops its objects instead; if its content is the newest, the
        study goes back to the queue to be written as the next version.
        """
        now = time.time()
        with self._transaction() as db:
            if not all(_builds_on_latest(db, report) for report in reports):
                db.execute(
                    "UPDATE studies SET state='receiving', updated_at=? "
                    "WHERE study_instance_uid=? AND generation=? AND state='processing'",
                    (now, study.study_instance_uid, study.generation),
                )
                return False
            for report in reports:
                _remember(db, report, now)
            for destination, path in deliveries:
                db.execute(
                    "INSERT INTO outbox (study_instance_uid, destination, path, state, attempts, "
                    "next_attempt_at, updated_at) VALUES (?, ?, ?, 'pending', 0, ?, ?) "
                    "ON CONFLICT(destination, path) DO UPDATE SET state='pending', attempts=0, "
                    "next_attempt_at=excluded.next_attempt_at, last_error=NULL, first_failed_at=NULL, "
                    "updated_at=excluded.updated_at",
                    (study.study_instance_uid, destination, str(path), now, now),
                )
            cursor = db.execute(
                "UPDATE studies SET state=?, reason=?, prompt_set=?, updated_at=? "
                "WHERE study_instance_uid=? AND generation=? AND state='processing'",
                (state, reason, prompt_set, now, study.study_instance_uid, study.generation),
            )
            return cursor.rowcount == 1

    def retry_study(self, study: StudyRecord, reason: str, *, delay_s: float, max_attempts: int) -> bool:
        """Record a failure that may pass (disk, memory, device): retry after `delay_s`.

        After `max_attempts` the study is failed for good. Returns whether a retry is planned.
        A late instance in the meantime wins: the study is then already back in receiving.
        """
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                "SELECT attempts FROM studies WHERE study_instance_uid=? AND generation=? "
                "AND state='processing'",
                (study.study_instance_uid, study.generation),
            ).fetchone()
            if row is None:
                return False
            attempts = row["attempts"] + 1
            retry = attempts < max_attempts
            db.execute(
                "UPDATE studies SET state=?, attempts=?, not_before=?, reason=?, updated_at=? "
                "WHERE study_instance_uid=?",
                (
                    "receiving" if retry else "failed",
                    attempts,
                    now + delay_s if retry else 0,
                    f"attempt {attempts} of {max_attempts} failed: {reason}",
                    now,
                    study.study_instance_uid,
                ),
            )
            return retry

    def latest_report(self, study_instance_uid: str, prompt_set: str | None = None) -> ReportVersion | None:
        """The most recent report version of the study by `prompt_set`, None if none was written."""
        row = (
            self._db()
            .execute(
                "SELECT * FROM reports WHERE study_instance_uid=? AND prompt_set IS ? "
                "ORDER BY number DESC, written_at DESC LIMIT 1",
                (study_instance_uid, prompt_set),
            )
            .fetchone()
        )
        return None if row is None else _report(row)

    def reprocess(self, study_instance_uid: str) -> str | None:
        """Put a study back in the queue, quiet already, to be processed with today's prompt sets.

        For a done, ignored or failed study (after a prompt-set upgrade, or once the cause of a
        failure is fixed), and for one in work (its worker's outcome then counts as that of
        older content, like a late instance's). Returns the state the study was in (a study
        already `receiving` is left as it is), or None for a study the journal does not hold.
        """
        with self._transaction() as db:
            row = db.execute(
                "SELECT state FROM studies WHERE study_instance_uid=?", (study_instance_uid,)
            ).fetchone()
            if row is None:
                return None
            if row["state"] != "receiving":
                db.execute(
                    f"UPDATE studies SET {_REQUEUED} WHERE study_instance_uid=?",
                    (time.time(), study_instance_uid),
                )
            return row["state"]

    def requeue_failed(self) -> list[str]:
        """Put every failed study back in the queue, like `requeue_dead` for deliveries.

        Returns the Study Instance UIDs requeued (for the caller to report, hashed).
        """
        with self._transaction() as db:
            uids = [
                row["study_instance_uid"]
                for row in db.execute("SELECT study_instance_uid FROM studies WHERE state='failed'")
            ]
            db.execute(f"UPDATE studies SET {_REQUEUED} WHERE state='failed'", (time.time(),))
        return uids

    def study(self, study_instance_uid: str) -> StudyRecord | None:
        """The journal row of one study, or None."""
        row = (
            self._db()
            .execute("SELECT * FROM studies WHERE study_instance_uid=?", (study_instance_uid,))
            .fetchone()
        )
        return None if row is None else _study(row)

    def purge_finished(self, finished_before: float) -> int:
        """Delete the files and rows of studies finished before `finished_before`.

        Finished means done or ignored with every delivery sent: a study with a pending or
        dead delivery, a failed study (an operator may want to look) and one still in work
        are kept whatever their age. The PACS holds the originals and now the results, so
        this loses nothing. Rows go first, in one transaction; a crash before the files are
        removed leaves only unreferenced files. The study's report versions stay (a few UIDs):
        should the study come back, its next report still supersedes the one the PACS holds.
        Returns the number of studies purged.
        """
        candidates = [
            row["study_instance_uid"]
            for row in self._db().execute(
                f"SELECT study_instance_uid FROM studies s WHERE {_FINISHED}", (finished_before,)
            )
        ]
        purged = 0
        for uid in candidates:
            # Rows and files go under the study's lock: a store into it waits, then re-creates it.
            with self._study_locked(uid, exclusive=True):
                with self._transaction() as db:
                    # Checked again under the lock: a late instance may have re-opened the study.
                    finished = db.execute(
                        f"SELECT 1 FROM studies s WHERE study_instance_uid=? AND {_FINISHED}",
                        (uid, finished_before),
                    ).fetchone()
                    if finished is not None:
                        for table in ("outbox", "instances", "studies"):
                            db.execute(f"DELETE FROM {table} WHERE study_instance_uid=?", (uid,))
                if finished is not None:
                    for folder in (self.instances_dir / uid, self.outbox_dir / uid):
                        shutil.rmtree(folder, ignore_errors=True)
                    purged += 1
        return purged


def _study(row: sqlite3.Row, state: str | None = None) -> StudyRecord:
    return StudyRecord(
        study_instance_uid=row["study_instance_uid"],
        state=state or row["state"],
        generation=row["generation"],
        last_received_at=row["last_received_at"],
        prompt_set=row["prompt_set"],
        reason=row["reason"],
        attempts=row["attempts"],
    )


def _builds_on_latest(db: sqlite3.Connection, report: ReportVersion) -> bool:
    """True when `report` is its set's latest version again, or the one that follows it."""
    row = db.execute(
        "SELECT sr_sop_instance_uid FROM reports WHERE study_instance_uid=? AND prompt_set IS ? "
        "ORDER BY number DESC, written_at DESC LIMIT 1",
        (report.study_instance_uid, report.prompt_set),
    ).fetchone()
    latest = None if row is None else row["sr_sop_instance_uid"]
    builds_on = None if report.replaces is None else report.replaces.sop_instance_uid
    return latest in (report.sr.sop_instance_uid, builds_on)


def _remember(db: sqlite3.Connection, report: ReportVersion, now: float) -> None:
    """Record a report version; a version written again (same SR UID) keeps its first row."""
    replaces = report.replaces
    db.execute(
        "INSERT INTO reports (sr_sop_instance_uid, study_instance_uid, number, content_key, "
        "sr_series_instance_uid, sr_sop_class_uid, sc_series_instance_uid, sc_sop_instance_uid, "
        "sc_sop_class_uid, replaces_series_instance_uid, replaces_sop_instance_uid, "
        "replaces_sop_class_uid, written_at, prompt_set) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(sr_sop_instance_uid) DO NOTHING",
        (
            report.sr.sop_instance_uid,
            report.study_instance_uid,
            report.number,
            report.content_key,
            report.sr.series_instance_uid,
            report.sr.sop_class_uid,
            report.sc.series_instance_uid,
            report.sc.sop_instance_uid,
            report.sc.sop_class_uid,
            None if replaces is None else replaces.series_instance_uid,
            None if replaces is None else replaces.sop_instance_uid,
            None if replaces is None else replaces.sop_class_uid,
            now,
            report.prompt_set,
        ),
    )


def _report(row: sqlite3.Row) -> ReportVersion:
    def reference(prefix: str) -> ObjectReference | None:
        if row[f"{prefix}_sop_instance_uid"] is None:
            return None
        return ObjectReference(
            series_instance_uid=row[f"{prefix}_series_instance_uid"],
            sop_instance_uid=row[f"{prefix}_sop_instance_uid"],
            sop_class_uid=row[f"{prefix}_sop_class_uid"],
        )

    sr, sc = reference("sr"), reference("sc")
    assert sr is not None and sc is not None  # NOT NULL columns
    return ReportVersion(
        study_instance_uid=row["study_instance_uid"],
        number=row["number"],
        content_key=row["content_key"],
        sr=sr,
        sc=sc,
        replaces=reference("replaces"),
        prompt_set=row["prompt_set"],
    )
