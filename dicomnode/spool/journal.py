"""The journal: one SQLite database, its schema, and a connection per thread.

The three rooms of the spool (instances, studies, outbox) are mixins over this base, so they
share one journal and commit their steps in its transactions.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import threading
import time
import weakref
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Self
from urllib.parse import quote

from dicomnode.locks import byte_locked
from dicomnode.spool.batch import StudyLock

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
    first_failed_at REAL,
    UNIQUE (destination, path)
);
CREATE TABLE IF NOT EXISTS reports (
    sr_sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    number INTEGER NOT NULL,
    content_key TEXT NOT NULL,
    sr_series_instance_uid TEXT NOT NULL,
    sr_sop_class_uid TEXT NOT NULL,
    sc_series_instance_uid TEXT NOT NULL,
    sc_sop_instance_uid TEXT NOT NULL,
    sc_sop_class_uid TEXT NOT NULL,
    replaces_series_instance_uid TEXT,
    replaces_sop_instance_uid TEXT,
    replaces_sop_class_uid TEXT,
    written_at REAL NOT NULL,
    prompt_set TEXT
);
CREATE INDEX IF NOT EXISTS reports_by_study ON reports(study_instance_uid, number);
CREATE TABLE IF NOT EXISTS landed (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    content BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS landing_marks (
    log TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
"""

#: Longest a write transaction waits for the journal's writer lock before it fails, as long as
#: SQLite itself waits on a locked journal (the connections' timeout).
WRITER_WAIT_S = 30.0

#: Version 1: retry bookkeeping (attempts, not_before) on studies.
#: Version 2: the report versions written per study (table `reports`, created above when
#: missing) and when a delivery first failed (`outbox.first_failed_at`, for `retry_for_hours`).
#: Version 3: the prompt set of each report version (`reports.prompt_set`): a study routed to
#: several sets has a chain of versions per set.
#: Version 4: small instances land in the journal (table `landed`, created above when missing)
#: until their files are synced; a node that does not know it would lose them after a power loss.
#: Version 5: small instances land in their receiving process's log (spool/landing.py); each
#: instance row names the log and record its file is in (`landing_log`, `landing_seq`, NULL for
#: a synced file) and `landing_marks` holds each log's last committed record.
SCHEMA_VERSION = 5
_ADDED_COLUMNS = {
    "instances": {"landing_log": "TEXT", "landing_seq": "INTEGER"},
    "studies": {
        "attempts": "INTEGER NOT NULL DEFAULT 0",
        "not_before": "REAL NOT NULL DEFAULT 0",
    },
    # NULL for deliveries queued before version 2: their retry window starts at their next failure.
    "outbox": {"first_failed_at": "REAL"},
    # Filled in from the study's one prompt set when added: before version 3 a study had one.
    "reports": {"prompt_set": "TEXT"},
}

#: PS3.5 9.1: components of digits without a leading zero (but "0" itself), joined by dots.
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")

_STUDY_LOCKS = 64


class SpoolError(RuntimeError):
    """The spool could not make an instance durable; nothing was acknowledged."""


class SpoolFull(SpoolError):
    """Free space is below the configured floor; the sender should retry later."""


def is_valid_uid(uid: str) -> bool:
    """True for a syntactically valid DICOM UID (PS3.5 9.1), which is also a safe file name."""
    return len(uid) <= 64 and _UID.fullmatch(uid) is not None


class Journal:
    """Instance files under `state_dir/spool` and the journal `state_dir/journal.sqlite`.

    `state_dir/incoming` holds instances while they are being received: on the spool's file
    system, so that storing one is a rename, not a copy.

    Safe to use from several threads: each thread gets its own SQLite connection.
    """

    def __init__(self, state_dir: Path, min_free_bytes: int = 0) -> None:
        self._locate(state_dir, min_free_bytes, "rwc")
        for folder in (self.state_dir, self.instances_dir, self.outbox_dir, self.incoming_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        # SQLite would create the journal under the umask of whoever opens it first, and gives
        # its -wal and -shm files the journal's own mode: created 0600 here, all three stay
        # private whatever the umask. An existing journal is opened as it is, its mode kept.
        os.close(os.open(self.journal_path, os.O_WRONLY | os.O_CREAT, 0o600))
        for lock in (self.writer_lock_path, self.study_lock_path):
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600))
        version = self._db().execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self.close()
            raise SpoolError(
                f"the journal {self.journal_path} has schema version {version}, written by a newer"
                f" dicomnode; this one knows versions up to {SCHEMA_VERSION} and would lose what the"
                " newer one keeps there"
            )
        self._db().executescript(_SCHEMA)
        self._migrate()

    @classmethod
    def open_existing(cls, state_dir: Path, *, read_only: bool, min_free_bytes: int = 0) -> Self:
        """A node's journal opened as it is, for `status` and `requeue` beside the running node.

        Unlike the constructor, it creates no folder or file, adds no table or column, and changes
        no mode: an administrator running it as root must not leave a file the service user cannot
        open, nor upgrade a journal that an older node still runs on. SQLite gives the -wal and
        -shm files it may create the journal's own mode and owner. Raises SpoolError when the
        journal is missing or of another schema version. The node's receivers (net.receivers)
        open the journal the node has just brought up to date this way too.
        """
        journal = cls.__new__(cls)
        journal._locate(state_dir, min_free_bytes, "ro" if read_only else "rw")
        if not journal.journal_path.is_file():
            raise SpoolError(f"no journal at {journal.journal_path}: the node has not run yet")
        try:
            version = journal._db().execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            journal.close()
            raise SpoolError(f"cannot open the journal {journal.journal_path}: {exc}") from None
        if version != SCHEMA_VERSION:
            journal.close()
            raise SpoolError(
                f"the journal {journal.journal_path} has schema version {version}, this dicomnode reads"
                f" version {SCHEMA_VERSION}: run `dicomnode serve` of this version once to upgrade it"
            )
        return journal

    def _locate(self, state_dir: Path, min_free_bytes: int, mode: str) -> None:
        """Where everything lives, and how the journal is opened (SQLite URI mode rwc, rw or ro)."""
        self.state_dir = Path(state_dir)
        self.instances_dir = self.state_dir / "spool"
        self.outbox_dir = self.state_dir / "outbox"
        self.incoming_dir = self.state_dir / "incoming"
        self.min_free_bytes = min_free_bytes
        self.journal_path = self.state_dir / "journal.sqlite"
        self.writer_lock_path = self.state_dir / "journal.sqlite-writer"
        self.study_lock_path = self.state_dir / "studies.lock"
        self._uri = f"file:{quote(str(self.journal_path))}?mode={mode}"
        self._local = threading.local()
        self._writing = threading.Lock()
        self._writer_fd: int | None = None
        self._study_locks = [StudyLock() for _ in range(_STUDY_LOCKS)]

    def _study_lock(self, study_instance_uid: str) -> StudyLock:
        """One of a fixed set of locks, picked by study: shared by stores, held alone by a purge."""
        return self._study_locks[hash(study_instance_uid) % _STUDY_LOCKS]

    @contextmanager
    def _study_locked(self, study_instance_uid: str, *, exclusive: bool) -> Iterator[None]:
        """Hold a study shared (storing into it) or alone (purging it), against this process's
        threads and every other process on the state folder (the node's receivers, net.receivers).

        The threads of this process meet at the study's StudyLock, which makes stores arriving
        while a purge waits queue behind it; processes meet at the study's byte of
        `studies.lock` (an open file description lock, at the CRC-32 of the UID: Python's hash
        differs per process). A state folder without the file (no node of this version has run)
        has no other process to meet.
        """
        local = self._study_lock(study_instance_uid)
        with local.exclusive() if exclusive else local.shared(), ExitStack() as held:
            crc = zlib.crc32(study_instance_uid.encode())
            with suppress(FileNotFoundError):
                held.enter_context(byte_locked(self.study_lock_path, crc, exclusive=exclusive))
            yield

    def _migrate(self) -> None:
        """Bring a journal written by an earlier version up to this schema, in place."""
        db = self._db()
        for table, added in _ADDED_COLUMNS.items():
            columns = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
            for column, definition in added.items():
                if column not in columns:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                    if (table, column) == ("reports", "prompt_set"):
                        db.execute(
                            "UPDATE reports SET prompt_set=(SELECT s.prompt_set FROM studies s "
                            "WHERE s.study_instance_uid=reports.study_instance_uid)"
                        )
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._uri, uri=True, timeout=30, isolation_level=None)
            if not self._uri.endswith("mode=ro"):
                db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives power loss, which the C-STORE ack promises.
            db.execute("PRAGMA synchronous=FULL")
            # Debian's SQLite zeroes every page it frees (SQLITE_SECURE_DELETE): settling 170
            # landed slices wrote their 1,700 pages of bytes into the WAL a second time, and held
            # the writers' turn 50 ms. FAST zeroes only what costs no write (see README, Privacy).
            db.execute("PRAGMA secure_delete=FAST")
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self, *, flush: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction, taken in turn with every other writer of this journal.

        SQLite lets one writer in at a time and has the others poll, sleeping 1, 2, 5, 10 ms
        and longer between tries: a store's commit that meets a study worker's or another
        process's sleeps past the moment the journal is free. Writers queue on a lock instead,
        and the next one goes in as soon as the last is done: threads of this process on a
        lock of their own, processes on this state folder (a CLI command beside the node) on
        `journal.sqlite-writer`. Each waits up to WRITER_WAIT_S, then fails with SpoolError.

        `flush=False` commits without a device flush: for rows that a log of the node's own
        already holds durably (the landing log), and that a later flushed commit carries with it.
        """
        db = self._db()
        with self._writer_locked():
            if not flush:
                db.execute("PRAGMA synchronous=NORMAL")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            finally:
                if not flush:
                    db.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def _writer_locked(self) -> Iterator[None]:
        if not self._writing.acquire(timeout=WRITER_WAIT_S):
            raise SpoolError(f"the journal stayed locked by another thread for {WRITER_WAIT_S:.0f} s")
        try:
            fd = self._writer_lock_fd()
            if fd is not None:
                _lock_exclusively(fd, WRITER_WAIT_S)
            try:
                yield
            finally:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._writing.release()

    def _writer_lock_fd(self) -> int | None:
        """The open writer lock file; None where a node of this version never ran (it creates it,
        private to the service user: opened, never created, by `open_existing`).

        Opened once, under the thread lock, and closed when the journal object goes.
        """
        if self._writer_fd is None:
            try:
                self._writer_fd = os.open(self.writer_lock_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            weakref.finalize(self, os.close, self._writer_fd)
        return self._writer_fd

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def _lock_exclusively(fd: int, wait_s: float) -> None:
    """flock `fd` exclusively, polling at most every 2 ms; SpoolError after `wait_s`.

    Another process holds it only for one transaction's statements (a dead process's lock is
    released by the kernel), so the first try nearly always succeeds.
    """
    deadline = time.monotonic() + wait_s
    pause = 50e-6
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise SpoolError(f"the journal stayed locked by another process for {wait_s:.0f} s") from None
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)
