"""The on-disk instance store and its SQLite journal: the node's memory across crashes.

An instance is durable when its file and folder are fsync'd and its row is committed; only
then may the SCP acknowledge it. Every later stage reads its input from the journal and
writes its output before it marks its step done, so a restart resumes where it stopped.

States of a study: receiving -> processing -> done | ignored | failed. A late instance puts
any study back to receiving (and bumps its generation, so a worker that is still processing
the older content does not mark it done).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dicomnode.durable import fsync_dir, write_durably
from dicomnode.flow import Delivery, StoredInstance
from dicomnode.privacy import uid_tag

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances(study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('receiving', 'processing', 'done', 'ignored', 'failed')),
    generation INTEGER NOT NULL DEFAULT 0,
    last_received_at REAL NOT NULL,
    prompt_set TEXT,
    reason TEXT,
    updated_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    updated_at REAL NOT NULL,
    UNIQUE (destination, path)
);
"""

#: Version 1: retry bookkeeping (attempts, not_before) on studies.
SCHEMA_VERSION = 1
_ADDED_STUDY_COLUMNS = {
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "not_before": "REAL NOT NULL DEFAULT 0",
}

_UID_CHARS = frozenset("0123456789.")

#: Condition on a study row `s` (parameter: finished before): done or ignored, every result sent.
_FINISHED = (
    "state IN ('done', 'ignored') AND updated_at < ? AND NOT EXISTS (SELECT 1 FROM outbox o "
    "WHERE o.study_instance_uid = s.study_instance_uid AND o.state != 'sent')"
)
_STUDY_LOCKS = 64


class SpoolError(RuntimeError):
    """The spool could not make an instance durable; nothing was acknowledged."""


class SpoolFull(SpoolError):
    """Free space is below the configured floor; the sender should retry later."""


def is_valid_uid(uid: str) -> bool:
    """True for a syntactically valid DICOM UID (PS3.5 9.1), which is also a safe file name."""
    return (
        0 < len(uid) <= 64
        and set(uid) <= _UID_CHARS
        and all(part and (part == "0" or not part.startswith("0")) for part in uid.split("."))
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


class Spool:
    """Instance files under `state_dir/spool` and the journal `state_dir/journal.sqlite`.

    Safe to use from several threads: each thread gets its own SQLite connection.
    """

    def __init__(self, state_dir: Path, min_free_bytes: int = 0) -> None:
        self.state_dir = Path(state_dir)
        self.instances_dir = self.state_dir / "spool"
        self.outbox_dir = self.state_dir / "outbox"
        self.min_free_bytes = min_free_bytes
        self.journal_path = self.state_dir / "journal.sqlite"
        for folder in (self.state_dir, self.instances_dir, self.outbox_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        # SQLite would create the journal under the umask of whoever opens it first, and gives
        # its -wal and -shm files the journal's own mode: created 0600 here, all three stay
        # private whatever the umask. An existing journal is opened as it is, its mode kept.
        os.close(os.open(self.journal_path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._local = threading.local()
        self._study_locks = [threading.Lock() for _ in range(_STUDY_LOCKS)]
        self._db().executescript(_SCHEMA)
        self._migrate()

    # -- connections -------------------------------------------------------------------------

    def _study_lock(self, study_instance_uid: str) -> threading.Lock:
        """One of a fixed set of locks, picked by study: stores of other studies run in parallel."""
        return self._study_locks[hash(study_instance_uid) % _STUDY_LOCKS]

    def _migrate(self) -> None:
        """Bring a journal written by an earlier version up to this schema, in place."""
        db = self._db()
        columns = {row["name"] for row in db.execute("PRAGMA table_info(studies)")}
        for column, definition in _ADDED_STUDY_COLUMNS.items():
            if column not in columns:
                db.execute(f"ALTER TABLE studies ADD COLUMN {column} {definition}")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.journal_path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives power loss, which the C-STORE ack promises.
            db.execute("PRAGMA synchronous=FULL")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- receive -----------------------------------------------------------------------------

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

    # -- studies -----------------------------------------------------------------------------

    def recover(self) -> int:
        """At start-up, put studies whose processing was interrupted back in the queue."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE studies SET state='receiving', updated_at=? WHERE state='processing'",
                (time.time(),),
            )
            return cursor.rowcount

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

    def finish_study(
        self,
        study: StudyRecord,
        *,
        state: str,
        reason: str | None = None,
        prompt_set: str | None = None,
        deliveries: Sequence[tuple[str, Path]] = (),
    ) -> bool:
        """Record the outcome of processing and queue its deliveries, in one transaction.

        If a late instance arrived while the study was processed (its generation moved on),
        the deliveries are still queued (they are correct for what was processed) but the
        study stays in `receiving` so the new content is processed too. Returns whether the
        study reached `state`.
        """
        now = time.time()
        with self._transaction() as db:
            for destination, path in deliveries:
                db.execute(
                    "INSERT INTO outbox (study_instance_uid, destination, path, state, attempts, "
                    "next_attempt_at, updated_at) VALUES (?, ?, ?, 'pending', 0, ?, ?) "
                    "ON CONFLICT(destination, path) DO UPDATE SET state='pending', attempts=0, "
                    "next_attempt_at=excluded.next_attempt_at, last_error=NULL, "
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
        removed leaves only unreferenced files. Returns the number of studies purged.
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
            with self._study_lock(uid):
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

    # -- outbox ------------------------------------------------------------------------------

    def next_delivery(self, destination: str, now: float | None = None) -> Delivery | None:
        """The oldest pending delivery to `destination` that is due."""
        now = time.time() if now is None else now
        row = (
            self._db()
            .execute(
                "SELECT * FROM outbox WHERE destination=? AND state='pending' AND next_attempt_at<=? "
                "ORDER BY next_attempt_at, id LIMIT 1",
                (destination, now),
            )
            .fetchone()
        )
        if row is None:
            return None
        return Delivery(
            id=row["id"],
            destination=row["destination"],
            path=Path(row["path"]),
            attempts=row["attempts"],
        )

    def delivery_sent(self, delivery: Delivery) -> None:
        """Record a delivery the destination acknowledged."""
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET state='sent', attempts=attempts+1, last_error=NULL, updated_at=? "
                "WHERE id=?",
                (time.time(), delivery.id),
            )

    def delivery_failed(self, delivery: Delivery, error: str, *, retry_at: float | None) -> None:
        """Record a failed attempt; `retry_at` None sends the delivery to the dead letter."""
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET state=?, attempts=attempts+1, last_error=?, next_attempt_at=?, "
                "updated_at=? WHERE id=?",
                (
                    "dead" if retry_at is None else "pending",
                    error,
                    retry_at if retry_at is not None else time.time(),
                    time.time(),
                    delivery.id,
                ),
            )

    def requeue_dead(self, destination: str | None = None) -> int:
        """Give dead deliveries (to one destination, or all) a fresh set of attempts, now.

        The operator's answer to a dead letter once the destination is fixed; returns how many
        deliveries went back to the queue.
        """
        now = time.time()
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE outbox SET state='pending', attempts=0, next_attempt_at=?, updated_at=? "
                "WHERE state='dead' AND (? IS NULL OR destination=?)",
                (now, now, destination, destination),
            )
            return cursor.rowcount

    # -- status ------------------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Counts of studies by state and of deliveries by destination and state."""
        db = self._db()
        studies = {r[0]: r[1] for r in db.execute("SELECT state, count(*) FROM studies GROUP BY state")}
        outbox: dict[str, int] = {}
        for destination, state, count in db.execute(
            "SELECT destination, state, count(*) FROM outbox GROUP BY destination, state"
        ):
            outbox[f"{destination}:{state}"] = count
        instances = db.execute("SELECT count(*) FROM instances").fetchone()[0]
        return {"studies": studies, "outbox": outbox, "instances": {"stored": instances}}

    def problems(self, limit: int = 20) -> list[tuple[str, str, str]]:
        """Recent failed, ignored and retrying studies and dead deliveries.

        Each as (kind, hashed UID, reason).
        """
        db = self._db()
        rows = [
            (
                "study retrying" if r["state"] == "receiving" else "study " + r["state"],
                uid_tag(r["study_instance_uid"]),
                r["reason"] or "",
            )
            for r in db.execute(
                "SELECT * FROM studies WHERE state IN ('failed', 'ignored') "
                "OR (state='receiving' AND attempts > 0) ORDER BY updated_at DESC LIMIT ?",
                (limit,),
            )
        ]
        rows += [
            (
                f"dead letter to {r['destination']}",
                uid_tag(r["study_instance_uid"]),
                r["last_error"] or "",
            )
            for r in db.execute(
                "SELECT * FROM outbox WHERE state='dead' ORDER BY updated_at DESC LIMIT ?", (limit,)
            )
        ]
        return rows

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def _holds(path: Path, content: bytes) -> bool:
    """True when the file at `path` has exactly `content`."""
    try:
        return path.stat().st_size == len(content) and path.read_bytes() == content
    except OSError:
        return False


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
