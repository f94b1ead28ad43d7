"""The instance store: received instances made durable on disk and committed in the journal.

An instance is durable when its file and folder are fsync'd and its row is committed; only
then may the SCP acknowledge it. The SCP receives into `incoming/` on the same file system,
so an instance of any size is stored by a rename, never held in memory or copied.

A small instance (LANDING_BYTES at most) whose bytes the receiver kept lands in its process's
landing log instead (spool/landing.py), while the spool settles (`start_settling`): its bytes
and its row go into the log with one flush, its file takes its place unsynced, and its row is
committed without a flush of its own; one device flush makes it durable where a file's own
sync costs a file-system journal commit more, and processes storing at once flush side by
side. The settler syncs the file system every SETTLE_S, after which the log's records are
free; after an unclean stop `restore_landed` makes the logs' records durable before anything
reads the spool.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dicomnode.durable import (
    fsync_dir,
    fsync_file,
    make_folder_durably,
    open_folder,
    sync_file_system,
    write_durably,
    write_unsynced,
)
from dicomnode.flow import StoredInstance
from dicomnode.locks import lock_byte
from dicomnode.spool.batch import Batch
from dicomnode.spool.journal import Journal, SpoolError, SpoolFull, is_valid_uid
from dicomnode.spool.landing import (
    Landing,
    LandingLog,
    forget_segment,
    holder_path,
    landing_of,
    log_names,
    read_log,
    read_segment,
    segment_paths,
    stored_of,
)

log = logging.getLogger(__name__)

#: Largest instance that lands. Chosen when landing was into the journal (ext4 with a journal,
#: one association, a store per transaction: 0.45 against 0.76 ms at 40 KB, 0.71 against 0.84
#: ms at 128 KB, slower than its own file's sync from 256 KB). With the log, 1 MiB measured
#: against it for 531 KB CT slices (README): no gain, so it stays.
LANDING_BYTES = 128 << 10

#: Longest a process waits for a landing log another process holds. A receiving process of a
#: node that was killed sees within half a second that its node is gone, settles and exits.
HOLD_WAIT_S = 30.0

#: Longest an instance's file stays unsynced, held by the landing log, before the settler syncs it.
SETTLE_S = 1.0

#: Instances landed since the last settling that make the settler run before SETTLE_S is up,
#: which bounds a segment's share of a burst (64 MiB at most, 20 MiB of 40 KB slices).
SETTLE_COUNT = 512

#: A log's mark raised to a number (never lowered: numbers only grow).
_RAISE_MARK = (
    "INSERT INTO landing_marks (log, seq) VALUES (?, ?) "
    "ON CONFLICT(log) DO UPDATE SET seq=max(seq, excluded.seq)"
)


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
        held: bytes | None = None,
    ) -> StoredInstance:
        """Make one received instance durable and journal it; idempotent per SOP Instance UID.

        `content` is the instance as a DICOM file: its bytes, or a file under `incoming_dir`
        that is the spool's once stored (moved into the spool and synced there, or deleted when
        nothing needs storing); `held`, the received file's bytes when the receiver kept them
        (it may then land in the journal, see the module). A byte-identical resend of an
        instance we hold changes nothing: PACS retry whole studies, and that must not re-process
        a finished one (a failed one is retried). An instance that moved to another study leaves
        no stale file behind. Raises SpoolFull below the free-space floor and SpoolError when
        the disk write fails, in both cases before anything is acknowledged.
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
        if isinstance(content, bytes):
            held = content
        landing = held if held is not None and len(held) == size <= LANDING_BYTES else None
        settler = self._settler
        lands = settler is not None and not self._suspect_log
        arrival = _Arrival(stored, content, size, landing if lands else None)
        # A purge of the study waits until the row is committed, or it could delete the file
        # from under it; stores into one study go side by side and meet at the flushes.
        with self._study_locked(study_instance_uid, exclusive=False):
            if self._place(arrival):
                self._commits.run(arrival)
        if arrival.committed:
            if settler is not None and arrival.landing is not None:
                settler.landed()
            return stored
        raise arrival.error or SpoolError("instance not committed")

    def _locate(self, state_dir: Path, min_free_bytes: int, mode: str) -> None:
        super()._locate(state_dir, min_free_bytes, mode)
        self._commits: Batch[_Arrival] = Batch(self._commit_group)
        self._settler: _Settler | None = None
        #: The spool's file system, open while it settles; landings whose sync failed.
        self._file_system: int | None = None
        self._landing_dir = self.state_dir / "landing"
        self._landing_log: LandingLog | None = None
        self._log_name = "0"
        #: The name of this process's landing log and the descriptor holding it while it
        #: settles (_hold_log).
        self._held: tuple[str, int] | None = None
        self._next_seq = 1
        #: A sync failed: the landing log's files are written again before anything lands.
        self._suspect_log = False

    def start_settling(self, log_name: str = "0") -> None:
        """Land small instances in this process's landing log (`landing/<log_name>-*.log`) from
        now on, and settle them in a thread of this process (see the module). Without it every
        instance is synced before it is acknowledged. What the log holds from an earlier run of
        this process is made durable first (replay_landing_logs; the node has replayed every log
        at its start, so this finds only what a receiving process left when it died)."""
        if self._settler is None:
            self._held = (log_name, self._hold_log(log_name))
            try:
                self.replay_landing_logs([log_name], acknowledged=False)
                landing_log = LandingLog(self._landing_dir, log_name)
            except BaseException:
                self._let_go()
                raise
            self._next_seq = self._landing_mark(log_name) + 1
            self._file_system = open_folder(self.instances_dir)
            with self._commits.running:
                self._landing_log, self._log_name = landing_log, log_name
            self._settler = _Settler(self)
            self._settler.start()

    def stop_settling(self) -> None:
        """Stop landing and settle what landed; what cannot be settled now stays in the log."""
        settler, self._settler = self._settler, None
        if settler is not None:
            settler.stop()
            try:
                self.settle_landed()
            except (OSError, SpoolError, sqlite3.Error) as exc:
                log.error("cannot settle the instances landed in the log: %s", exc)
            finally:
                with self._commits.running:
                    landing_log, self._landing_log = self._landing_log, None
                if landing_log.pending or self._suspect_log:  # made durable at the next start
                    log.warning("instances landed in the log stay there until the node starts again")
                landing_log.close()
                os.close(self._file_system)
                self._file_system = None
                self._let_go()

    def _hold_log(self, name: str) -> int:
        """A descriptor holding the landing log `name` for this process alone: an exclusive
        lock on its lock file, which the kernel releases when the descriptor is closed or the
        process dies. Waits while another process holds it (a receiving process of a node
        that was killed, not yet gone: replaying or forgetting a log it still writes could
        forget what it acknowledged since); SpoolError after HOLD_WAIT_S."""
        make_folder_durably(self._landing_dir)
        fd = os.open(holder_path(self._landing_dir, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + HOLD_WAIT_S
        said = False
        while not lock_byte(fd, 0, exclusive=True, wait=False):
            if time.monotonic() >= deadline:
                os.close(fd)
                raise SpoolError(
                    f"landing log {name} stayed in use by another process for {HOLD_WAIT_S:g} s"
                    " (a receiving process of an earlier run that does not stop?)"
                )
            if not said:
                log.warning("landing log %s is in use by another process; waiting for it to stop", name)
                said = True
            time.sleep(0.05)
        return fd

    def _let_go(self) -> None:
        """Close the descriptor holding this process's landing log: another may use it now."""
        held, self._held = self._held, None
        if held is not None:
            os.close(held[1])

    def settle_landed(self) -> int:
        """Sync the spool's file system; the landing log's segment written until now is then free.

        The segment is left under the group commit's lock, so every record in it has had its
        commit, and its file was written before: the sync puts both on disk. The file system
        stays open while the spool settles, so that a failed write-back is reported to the next
        sync whenever it happened. A sync that fails leaves the records of both segments
        suspect (the kernel reports a failed write-back once): nothing lands until each file
        that a row still names has been written again with its own fsync (raising OSError until
        then). Returns how many records the sync settled.
        """
        if self._suspect_log:
            self._rewrite_logged()
        with self._commits.running:
            landing_log = self._landing_log
            left = landing_log.switch() if landing_log is not None and landing_log.pending else None
        if left is None:
            return 0
        try:
            self._sync_file_system()
        except OSError:
            self._suspect_log = True
            raise
        return sum(1 for _ in read_segment(left))

    def _sync_file_system(self) -> None:
        """One sync of the spool's file system (through the folder held open while it settles)."""
        file_system = self._file_system if self._file_system is not None else open_folder(self.instances_dir)
        try:
            sync_file_system(file_system)
        finally:
            if file_system is not self._file_system:
                os.close(file_system)

    def _rewrite_logged(self) -> None:
        """Write again, durably, every file a row still names in this process's landing log."""
        for record in read_log(self._landing_dir, self._log_name):
            self._rewrite_if_named(self._log_name, record)
        self._suspect_log = False

    def restore_landed(self) -> int:
        """At start-up, before anything reads the spool: make durable, from the journal and from
        every landing log, the files of instances acknowledged before they were synced, and the
        stores whose commit a power loss undid. Returns how many files were written again.

        A version 4 journal's landed instance whose row now points elsewhere (moved to another
        study and stored there) or is gone (its study was purged) is dropped, not restored.
        """
        restored = self._write_again([row[0] for row in self._db().execute("SELECT id FROM landed")])
        with self._transaction() as db:
            db.execute("DELETE FROM landed")
        stored_again, rewritten = self.replay_landing_logs()
        return restored + stored_again + rewritten

    def replay_landing_logs(
        self, names: list[str] | None = None, *, acknowledged: bool = True
    ) -> tuple[int, int]:
        """Make durable what the landing logs hold (every log's, or those `names`), then forget
        it. Returns how many stores were done again and how many files were written again.

        A log's mark is the sequence number of its last record whose rows are committed: the
        journal's commits reach the disk in order, and any later synced commit carries the
        earlier ones with it. A record at or below the mark only has its file written again,
        and only while its instance's row still names it (this log, this record): a later
        resend, a synced store, a purge or a move took its place otherwise.

        A record above the mark is a store whose commit did not happen or did not reach the
        disk. At the node's start (`acknowledged`), after a power loss, it may have been
        acknowledged: it is done again, oldest first, unless a later store of the instance is
        in the journal. When one receiving process starts again after it died, the node and
        the disk ran on: such a record was never committed, so never acknowledged, and storing
        it now could re-open a study that finished since; it is dropped.

        The file system is synced before the records are forgotten: rows at or below a mark
        may have been committed without a flush of their own, and until then the log is what
        holds them.
        """
        folder = self._landing_dir
        if names is None:
            names = log_names(folder)
        mine = self._held[0] if self._held is not None else None
        held: list[int] = []
        try:
            for name in names:
                if name != mine:
                    held.append(self._hold_log(name))
            return self._replay(folder, names, acknowledged)
        finally:
            for fd in held:
                os.close(fd)

    def _replay(self, folder: Path, names: list[str], acknowledged: bool) -> tuple[int, int]:
        lost: list[tuple[str, Landing]] = []
        highest: dict[str, int] = {}
        rewritten = 0
        for name in names:
            mark = self._landing_mark(name)
            for record in read_log(folder, name):
                highest[name] = record.seq
                if record.seq > mark:
                    if acknowledged:
                        lost.append((name, record))
                elif self._rewrite_if_named(name, record):
                    rewritten += 1
        lost.sort(key=lambda lost_one: lost_one[1].received_at)
        stored_again = sum(self._store_again(name, record) for name, record in lost)
        if highest:
            self._raise_marks(highest)
            self._sync_file_system()
        for name in names:
            for path in segment_paths(folder, name):
                forget_segment(path)
        return stored_again, rewritten

    def _raise_marks(self, highest: dict[str, int]) -> None:
        """Raise each log's mark to the highest number it held, also over records dropped: a
        number is never written twice, so a stale record left in a reused segment can never
        read as the next one."""
        with self._transaction() as db:
            db.executemany(_RAISE_MARK, list(highest.items()))

    def _landing_mark(self, name: str) -> int:
        row = self._db().execute("SELECT seq FROM landing_marks WHERE log=?", (name,)).fetchone()
        return 0 if row is None else row[0]

    def _rewrite_if_named(self, name: str, record: Landing) -> bool:
        """Write a committed landing's file durably if its instance's row still names it."""
        with self._study_locked(record.study_instance_uid, exclusive=True):
            row = (
                self._db()
                .execute(
                    "SELECT path, landing_log, landing_seq FROM instances WHERE sop_instance_uid=?",
                    (record.sop_instance_uid,),
                )
                .fetchone()
            )
            named = row is not None and (row["landing_log"], row["landing_seq"]) == (name, record.seq)
            if not named or row["path"] != record.path:
                return False
            # Under the study's lock held alone, which a purge in any process also takes: the row
            # read above stays until the file is written.
            write_durably(Path(record.path), lambda handle: handle.write(record.content))
            return True

    def _store_again(self, name: str, record: Landing) -> bool:
        """Do again a landed store whose commit was lost, its file durably, then its rows; not
        when the journal holds a later store of the instance. Whether it was done again."""
        stored = stored_of(record)
        with self._study_locked(record.study_instance_uid, exclusive=True):
            since = (
                self._db()
                .execute(
                    "SELECT 1 FROM instances WHERE sop_instance_uid=? AND received_at>=?",
                    (record.sop_instance_uid, record.received_at),
                )
                .fetchone()
            )
            if since is None:
                make_folder_durably(stored.path.parent)
                write_durably(stored.path, lambda handle: handle.write(record.content))
                with self._transaction() as db:
                    _record_instance(db, stored, record.received_at, (name, record.seq))
        return since is None

    def _write_again(self, ids: list[int]) -> int:
        """Write the files of these landings durably from the journal, where their instance still
        is; how many. Raises OSError at the first that fails.

        Each under its study's lock held alone, as a purge holds it: a store into the study (a
        resend replacing the file) either committed before, and then replaced or deleted the
        landing (read again under the lock, it is gone), or waits until the file is written.
        """
        written = 0
        for landing in ids:
            study = self._landed_instance(landing, "i.study_instance_uid")
            if study is None:
                continue
            with self._study_locked(study[0], exclusive=True):
                row = self._landed_instance(landing, "l.path, l.content")
                if row is not None:
                    write_durably(Path(row[0]), lambda handle, content=row[1]: handle.write(content))
                    written += 1
        return written

    def _landed_instance(self, landing: int, columns: str) -> sqlite3.Row | None:
        """Columns of a landing and the instance it is the file of, if that still refers to it."""
        return (
            self._db()
            .execute(
                f"SELECT {columns} FROM landed l JOIN instances i "
                "ON i.sop_instance_uid = l.sop_instance_uid AND i.path = l.path WHERE l.id=?",
                (landing,),
            )
            .fetchone()
        )

    def _drop_landed(self, ids: list[int]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM landed WHERE id=?", [(landing,) for landing in ids])

    def _commit_group(self, arrivals: list[_Arrival]) -> None:
        """Group commit: sync each folder once, then commit all rows in one transaction.

        Associations that store at once (each file placed and synced in its own thread, side
        by side) share the folder fsync and the journal's WAL fsync instead of queueing for
        one each; an association alone commits alone. Each instance is still durable (file,
        name, row) before its store returns.
        """
        # A landed instance's name is synced with its file system by the settler.
        for folder in {a.stored.path.parent for a in arrivals if a.landing is None}:
            try:
                fsync_dir(folder)
            except OSError as exc:
                for arrival in arrivals:
                    if arrival.stored.path.parent == folder and arrival.landing is None:
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
        if referred:
            # The file its row refers to stays whole until the new one is synced (below).
            arrival.landing = None
        if arrival.landing is not None:
            try:
                if isinstance(content, bytes):
                    write_unsynced(stored.path, content)
                else:
                    _move(content, stored.path)
            except OSError as exc:
                arrival.error = SpoolError(f"cannot write instance file: {exc.strerror}")
                return False
            return True
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
        """Record the arrivals' instances, and their studies as receiving, in one transaction.

        Run under the group commit's lock. Landed arrivals go into the landing log first, in one
        write and one flush; when every arrival of the group landed, the rows are committed
        without a flush of their own (the log holds them, see replay_landing_logs). Landed
        arrivals that find the log closed (settling stopped meanwhile) have their files synced.
        """
        now = time.time()
        landed = [arrival for arrival in arrivals if arrival.landing is not None]
        if landed and self._landing_log is None:
            for arrival in landed:
                fsync_file(arrival.stored.path)
                fsync_dir(arrival.stored.path.parent)
                arrival.landing = None
            landed = []
        seqs: dict[int, int] = {}
        if landed:
            records = []
            for arrival in landed:
                seqs[id(arrival)] = self._next_seq + len(records)
                records.append(landing_of(arrival.stored, seqs[id(arrival)], now, arrival.landing))
            try:
                self._landing_log.append(records)
            except OSError as exc:
                raise SpoolError(f"cannot write the landing log: {exc.strerror}") from None
            self._next_seq += len(records)
        with self._transaction(flush=len(landed) < len(arrivals)) as db:
            for arrival in arrivals:
                seq = seqs.get(id(arrival))
                _record_instance(db, arrival.stored, now, None if seq is None else (self._log_name, seq))
            if landed:
                db.execute(_RAISE_MARK, (self._log_name, self._next_seq - 1))

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


def _record_instance(
    db: sqlite3.Connection, stored: StoredInstance, now: float, landing: tuple[str, int] | None = None
) -> None:
    """The instance's row (replacing an earlier one of its SOP Instance UID), its study receiving;
    `landing`, the log and the record that hold its file until it is synced."""
    db.execute(
        "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
        "series_instance_uid, path, calling_ae, received_at, landing_log, landing_seq) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(sop_instance_uid) DO UPDATE SET sop_class_uid=excluded.sop_class_uid, "
        "study_instance_uid=excluded.study_instance_uid, "
        "series_instance_uid=excluded.series_instance_uid, path=excluded.path, "
        "calling_ae=excluded.calling_ae, received_at=excluded.received_at, "
        "landing_log=excluded.landing_log, landing_seq=excluded.landing_seq",
        (
            stored.sop_instance_uid,
            stored.sop_class_uid,
            stored.study_instance_uid,
            stored.series_instance_uid,
            str(stored.path),
            stored.calling_ae,
            now,
            *(landing or (None, None)),
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


@dataclass
class _Arrival:
    """An instance on its way through the steps of storing, and what became of it."""

    stored: StoredInstance
    content: bytes | Path
    size: int
    #: The bytes that land in the journal with the row; None: the file is synced instead.
    landing: bytes | None = None
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


class _Settler(threading.Thread):
    """Settles the instances landed in its landing log every SETTLE_S, or sooner after SETTLE_COUNT."""

    def __init__(self, store: InstanceStore) -> None:
        super().__init__(name="spool-settler", daemon=True)
        self._store = store
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._count_lock = threading.Lock()
        self._since = 0

    def landed(self) -> None:
        with self._count_lock:
            self._since += 1
            if self._since >= SETTLE_COUNT:
                self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self.join()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wake.wait(SETTLE_S)
                self._wake.clear()
                with self._count_lock:
                    self._since = 0
                try:
                    self._store.settle_landed()
                except (OSError, SpoolError, sqlite3.Error) as exc:  # kept in the log: tried again
                    log.error("cannot settle the instances landed in the log: %s", exc)
        finally:
            self._store.close()
