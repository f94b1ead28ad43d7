"""The spool keeps what it acknowledged: exact bytes on disk, a journal that survives restarts.

Every test works on a real state folder and a real SQLite journal; a restart is a new Spool
on the same folder, as after a crash of the node.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest

import dicomnode.spool.instances as instances
import dicomnode.spool.journal as journal_module
from dicomnode.flow import ObjectReference, ReportVersion
from dicomnode.privacy import uid_tag
from dicomnode.spool import Spool, SpoolError, SpoolFull, StudyRecord, is_valid_uid
from dicomnode.spool.landing import Landing, read_segment
from tests.conftest import umask, wait_until

STUDY = "1.2.826.0.1.3680043.8.498.1"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.2"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _store(spool: Spool, sop: str, study: str = STUDY, content: bytes | None = None):
    return spool.store(
        content if content is not None else f"instance {sop}".encode(),
        sop_instance_uid=sop,
        sop_class_uid=CT_IMAGE_STORAGE,
        study_instance_uid=study,
        series_instance_uid=SERIES,
        calling_ae="MODALITY",
    )


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _claim(spool: Spool, quiet_period_s: float = 30.0) -> StudyRecord:
    """Claim as a worker would once the quiet period has passed."""
    study = spool.claim_quiet_study(quiet_period_s, now=time.time() + quiet_period_s + 1)
    assert study is not None
    return study


@pytest.fixture
def spool(tmp_path) -> Iterator[Spool]:
    journal = Spool(tmp_path / "var")
    yield journal
    journal.close()


def test_store_writes_the_exact_bytes_and_journals_the_instance(spool):
    content = bytes(range(256)) * 64
    stored = _store(spool, "1.2.3.4.5", content=content)

    assert stored.path == spool.instances_dir / STUDY / "1.2.3.4.5.dcm"
    assert stored.path.read_bytes() == content
    assert spool.instances(STUDY) == (stored,)
    study = spool.study(STUDY)
    assert study is not None
    assert (study.state, study.generation) == ("receiving", 0)
    assert spool.counts()["instances"] == {"stored": 1}
    assert _files(spool.instances_dir) == [stored.path], "no temporary file is left behind"


def test_instance_files_are_0600_and_folders_0700_even_under_a_permissive_umask(tmp_path):
    with umask(0o022):
        journal = Spool(tmp_path / "var")
        stored = _store(journal, "1.2.3.4.5")
        journal.close()

    for folder in (journal.state_dir, journal.instances_dir, journal.outbox_dir, stored.path.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE(stored.path.stat().st_mode) == 0o600


def test_journal_files_are_0600_and_folders_0700_even_under_a_permissive_umask(tmp_path):
    with umask(0o022):
        journal = Spool(tmp_path / "var")
        _store(journal, "1.2.3.4.5")
        # While a connection is open, SQLite's WAL mode keeps -wal and -shm beside the journal.
        journal_files = sorted(p for p in journal.state_dir.iterdir() if p.is_file())
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in journal_files}
        journal.close()

    assert sorted(modes) == [
        "journal.sqlite",
        "journal.sqlite-shm",
        "journal.sqlite-wal",
        "journal.sqlite-writer",
        "studies.lock",
    ]
    assert set(modes.values()) == {0o600}, modes
    for folder in (journal.state_dir, journal.instances_dir, journal.outbox_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_a_write_waits_its_turn_while_another_process_holds_the_journal_writer_lock(spool):
    # flock belongs to the open file: a second open of the lock file locks as another process would.
    other = os.open(spool.writer_lock_path, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)
    stored = threading.Event()
    writer = threading.Thread(target=lambda: (_store(spool, "1.2.3.4.5"), stored.set()))
    try:
        writer.start()
        assert not stored.wait(0.5)
        assert spool.instances(STUDY) == ()
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
    assert stored.wait(10)
    writer.join()
    assert [i.sop_instance_uid for i in spool.instances(STUDY)] == ["1.2.3.4.5"]


def test_a_write_fails_with_spoolerror_when_the_writer_lock_stays_held(spool, monkeypatch):
    monkeypatch.setattr(journal_module, "WRITER_WAIT_S", 0.3)
    other = os.open(spool.writer_lock_path, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        with pytest.raises(SpoolError, match="journal stayed locked by another process"):
            _store(spool, "1.2.3.4.5")
        assert spool.instances(STUDY) == ()
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
    _store(spool, "1.2.3.4.5")  # the lock released, writes go in again
    assert len(spool.instances(STUDY)) == 1


def test_a_command_on_a_journal_without_writer_lock_writes_and_creates_no_file(tmp_path):
    # A journal an older node wrote has no lock file; a command run as root must not create one
    # the service user could not open.
    Spool(tmp_path / "var").close()
    (tmp_path / "var" / "journal.sqlite-writer").unlink()
    journal = Spool.open_existing(tmp_path / "var", read_only=False)

    assert journal.requeue_dead() == 0
    assert journal.requeue_failed() == []
    journal.close()
    assert not (tmp_path / "var" / "journal.sqlite-writer").exists()


def test_duplicate_sop_instance_uid_is_idempotent_one_row_and_one_file(spool):
    first = _store(spool, "1.2.3.4.5", content=b"same bytes")
    second = _store(spool, "1.2.3.4.5", content=b"same bytes")

    assert first.path == second.path
    assert _files(spool.instances_dir) == [first.path]
    assert first.path.read_bytes() == b"same bytes"
    assert len(spool.instances(STUDY)) == 1
    assert spool.counts()["instances"] == {"stored": 1}
    assert spool.counts()["studies"] == {"receiving": 1}


@pytest.mark.parametrize(
    "bad_uid",
    ["../../etc/passwd", "..", "1.2/3", "/tmp/x", "1..2", ".1.2", "1.2.", "1.02.3", "", "1" * 65, "1.2.3a"],
)
@pytest.mark.parametrize("field", ["sop_instance_uid", "study_instance_uid", "series_instance_uid"])
def test_invalid_uids_are_refused_before_anything_is_written(tmp_path, spool, field, bad_uid):
    uids = {"sop_instance_uid": "1.2.3.4.5", "study_instance_uid": STUDY, "series_instance_uid": SERIES}
    uids[field] = bad_uid

    with pytest.raises(ValueError, match="is not a valid UID"):
        spool.store(b"payload", sop_class_uid=CT_IMAGE_STORAGE, calling_ae="MODALITY", **uids)

    assert _files(spool.instances_dir) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["var"], "nothing escaped the state folder"
    assert spool.counts() == {"studies": {}, "outbox": {}, "instances": {"stored": 0}}


def test_valid_uids_are_digits_and_dots_without_leading_zeros():
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.2")
    assert is_valid_uid("1.0.3")
    assert not is_valid_uid("1.2.840.10008.5.1.4.1.1.2 ")
    assert not is_valid_uid("1.2.840\x00")
    assert is_valid_uid("0") and is_valid_uid("1" * 64)
    for bad in ("", "1" * 65, "1.02", "1..2", ".1", "1.", "00", "1.2\n", "1.\u0663", "1.2.a"):
        assert not is_valid_uid(bad), repr(bad)


def test_below_the_free_space_floor_store_raises_spoolfull_before_writing_anything(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    journal = Spool(tmp_path / "var", min_free_bytes=free + 2**30)

    with pytest.raises(SpoolFull, match="below the floor"):
        _store(journal, "1.2.3.4.5")

    assert issubclass(SpoolFull, SpoolError)
    assert list(journal.instances_dir.iterdir()) == []
    assert journal.study(STUDY) is None
    assert journal.counts()["instances"] == {"stored": 0}
    journal.close()


def test_a_failed_disk_write_raises_spoolerror_and_journals_nothing(spool):
    # A plain file where the study's folder should be: the write cannot succeed.
    (spool.instances_dir / STUDY).write_bytes(b"")

    with pytest.raises(SpoolError, match="cannot write instance file"):
        _store(spool, "1.2.3.4.5")

    assert spool.study(STUDY) is None
    assert spool.instances(STUDY) == ()


def test_claim_quiet_study_waits_for_the_quiet_period_and_takes_the_oldest_first(spool):
    _store(spool, "1.2.3.1", study=STUDY)
    time.sleep(0.01)
    _store(spool, "1.2.3.2", study=OTHER_STUDY)
    newest = spool.study(OTHER_STUDY).last_received_at

    assert spool.claim_quiet_study(30.0) is None, "nothing is quiet yet"
    assert spool.claim_quiet_study(30.0, now=newest + 29.0) is None

    first = spool.claim_quiet_study(30.0, now=newest + 31.0)
    second = spool.claim_quiet_study(30.0, now=newest + 31.0)
    assert (first.study_instance_uid, first.state) == (STUDY, "processing")
    assert (second.study_instance_uid, second.state) == (OTHER_STUDY, "processing")
    assert spool.claim_quiet_study(30.0, now=newest + 31.0) is None, "a claimed study is not claimed twice"
    assert spool.study(STUDY).state == "processing"


def test_only_the_study_that_is_quiet_long_enough_is_claimed(spool):
    _store(spool, "1.2.3.1", study=STUDY)
    older = spool.study(STUDY).last_received_at
    time.sleep(0.05)
    _store(spool, "1.2.3.2", study=OTHER_STUDY)

    claimed = spool.claim_quiet_study(1.0, now=older + 1.0 + 0.01)

    assert claimed.study_instance_uid == STUDY
    assert spool.claim_quiet_study(1.0, now=older + 1.0 + 0.01) is None


def test_finish_study_records_the_outcome_and_queues_its_deliveries(spool):
    _store(spool, "1.2.3.1")
    claimed = _claim(spool)
    result = spool.outbox_dir / "sr.dcm"

    assert spool.finish_study(claimed, state="done", prompt_set="cxr", deliveries=[("pacs", result)])

    study = spool.study(STUDY)
    assert (study.state, study.prompt_set, study.reason) == ("done", "cxr", None)
    delivery = spool.next_delivery("pacs")
    assert (delivery.destination, delivery.path, delivery.attempts) == ("pacs", result, 0)
    assert spool.next_delivery("elsewhere") is None


def test_a_late_instance_during_processing_reopens_the_study_and_keeps_its_deliveries(spool):
    _store(spool, "1.2.3.1")
    claimed = _claim(spool)
    _store(spool, "1.2.3.2")  # arrives while the worker processes the first instance
    result = spool.outbox_dir / "sr.dcm"

    reached = spool.finish_study(claimed, state="done", prompt_set="cxr", deliveries=[("pacs", result)])

    assert reached is False
    study = spool.study(STUDY)
    assert (study.state, study.generation) == ("receiving", 1)
    assert spool.next_delivery("pacs").path == result, "results of what was processed still go out"
    again = _claim(spool)
    assert again.generation == 1
    assert len(spool.instances(STUDY)) == 2
    assert spool.finish_study(again, state="done", deliveries=[("pacs", result)])
    assert spool.study(STUDY).state == "done"


def test_a_late_instance_after_done_reopens_the_study(spool):
    _store(spool, "1.2.3.1")
    assert spool.finish_study(_claim(spool), state="done")

    _store(spool, "1.2.3.2")

    assert spool.study(STUDY).state == "receiving"
    assert _claim(spool).study_instance_uid == STUDY


def test_after_a_restart_a_study_waits_a_quiet_period_for_the_resend_of_what_the_stop_cut_off(tmp_path):
    before = Spool(tmp_path / "var")
    _store(before, "1.2.3.1")  # part of a study: the stop cut its sender off
    before.close()
    restarted_at = time.time() + 3600  # the node was down an hour: the study looks long quiet

    after = Spool(tmp_path / "var")
    with mock.patch("dicomnode.spool.studies.time.time", return_value=restarted_at):
        assert after.recover(quiet_period_s=30) == 0

    assert after.claim_quiet_study(30, now=restarted_at + 29) is None, "claimed before a resend"
    assert after.claim_quiet_study(30, now=restarted_at + 31).study_instance_uid == STUDY
    after.close()


def test_recover_after_a_restart_puts_interrupted_studies_back_in_the_queue(tmp_path):
    before = Spool(tmp_path / "var")
    _store(before, "1.2.3.1")
    _store(before, "1.2.3.2", study=OTHER_STUDY)
    _claim(before)
    assert before.finish_study(_claim(before), state="done")
    before.close()

    after = Spool(tmp_path / "var")
    assert after.recover() == 1

    assert after.study(STUDY).state == "receiving"
    assert after.study(OTHER_STUDY).state == "done", "finished studies stay finished"
    assert _claim(after).study_instance_uid == STUDY
    after.close()


def test_requeued_delivery_is_reset_to_pending_with_no_attempts(spool):
    _store(spool, "1.2.3.1")
    result = spool.outbox_dir / "sr.dcm"
    spool.finish_study(_claim(spool), state="done", deliveries=[("pacs", result)])
    delivery = spool.next_delivery("pacs")
    spool.delivery_failed(delivery, "peer down", retry_at=time.time() + 3600)
    assert spool.next_delivery("pacs") is None, "not due before its retry time"

    _store(spool, "1.2.3.2")
    spool.finish_study(_claim(spool), state="done", deliveries=[("pacs", result)])

    requeued = spool.next_delivery("pacs")
    assert (requeued.id, requeued.attempts) == (delivery.id, 0)
    assert spool.counts()["outbox"] == {"pacs:pending": 1}


def test_requeued_dead_delivery_leaves_the_dead_letter(spool):
    _store(spool, "1.2.3.1")
    result = spool.outbox_dir / "sr.dcm"
    spool.finish_study(_claim(spool), state="done", deliveries=[("pacs", result)])
    spool.delivery_failed(spool.next_delivery("pacs"), "refused", retry_at=None)
    assert spool.counts()["outbox"] == {"pacs:dead": 1}

    _store(spool, "1.2.3.2")
    spool.finish_study(_claim(spool), state="done", deliveries=[("pacs", result)])

    assert spool.counts()["outbox"] == {"pacs:pending": 1}
    assert spool.problems() == []


def test_delivery_failed_schedules_the_retry_and_sent_ends_the_delivery(spool):
    _store(spool, "1.2.3.1")
    spool.finish_study(_claim(spool), state="done", deliveries=[("pacs", spool.outbox_dir / "sr.dcm")])
    retry_at = time.time() + 60

    spool.delivery_failed(spool.next_delivery("pacs"), "peer down", retry_at=retry_at)

    assert spool.next_delivery("pacs", now=retry_at - 1) is None
    due = spool.next_delivery("pacs", now=retry_at)
    assert due.attempts == 1
    spool.delivery_sent(due)
    assert spool.next_delivery("pacs", now=retry_at + 1e6) is None
    assert spool.counts()["outbox"] == {"pacs:sent": 1}


def test_counts_report_studies_deliveries_and_instances(spool):
    _store(spool, "1.2.3.1", study=STUDY)
    _store(spool, "1.2.3.2", study=STUDY)
    spool.finish_study(
        _claim(spool),
        state="done",
        deliveries=[("pacs", spool.outbox_dir / "sr.dcm"), ("archive", spool.outbox_dir / "sr.dcm")],
    )
    spool.delivery_sent(spool.next_delivery("archive"))
    _store(spool, "1.2.3.3", study=OTHER_STUDY)

    assert spool.counts() == {
        "studies": {"done": 1, "receiving": 1},
        "outbox": {"pacs:pending": 1, "archive:sent": 1},
        "instances": {"stored": 3},
    }


def test_problems_list_failed_ignored_and_dead_with_hashed_uids_only(spool):
    _store(spool, "1.2.3.1", study=STUDY)
    _store(spool, "1.2.3.2", study=OTHER_STUDY)
    spool.finish_study(_claim(spool), state="ignored", reason="no routing rule matched")
    spool.finish_study(
        _claim(spool),
        state="failed",
        reason="pixel data cannot be decoded",
        deliveries=[("pacs", spool.outbox_dir / "sc.dcm")],
    )
    spool.delivery_failed(
        spool.next_delivery("pacs"), "PACS@host:104 rejected the association", retry_at=None
    )

    problems = spool.problems()

    assert sorted(problems) == sorted(
        [
            ("study ignored", uid_tag(STUDY), "no routing rule matched"),
            ("study failed", uid_tag(OTHER_STUDY), "pixel data cannot be decoded"),
            ("dead letter to pacs", uid_tag(OTHER_STUDY), "PACS@host:104 rejected the association"),
        ]
    )
    text = repr(problems)
    assert STUDY not in text and OTHER_STUDY not in text and "1.2.3.1" not in text


def test_uid_tag_is_short_stable_and_distinct():
    assert uid_tag(STUDY) == uid_tag(STUDY)
    assert uid_tag(STUDY) != uid_tag(OTHER_STUDY)
    assert len(uid_tag(STUDY)) == 12 and int(uid_tag(STUDY), 16) >= 0


def test_the_journal_survives_reopening_the_spool(tmp_path):
    before = Spool(tmp_path / "var")
    stored = _store(before, "1.2.3.1", content=b"kept")
    _store(before, "1.2.3.2", study=OTHER_STUDY)
    before.finish_study(_claim(before), state="done", deliveries=[("pacs", before.outbox_dir / "sr.dcm")])
    before.close()

    after = Spool(tmp_path / "var")

    assert after.instances(STUDY) == (stored,)
    assert after.instances(STUDY)[0].path.read_bytes() == b"kept"
    assert after.study(STUDY).state == "done"
    assert after.study(OTHER_STUDY).state == "receiving"
    assert after.next_delivery("pacs").path == before.outbox_dir / "sr.dcm"
    after.close()
    with sqlite3.connect(tmp_path / "var" / "journal.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_stores_from_several_threads_are_all_journaled(spool):
    errors: list[BaseException] = []

    def receive(thread: int) -> None:
        try:
            for index in range(10):
                _store(spool, f"1.2.3.{thread + 1}.{index + 1}", study=f"1.2.3.{thread + 1}")
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            spool.close()

    threads = [threading.Thread(target=receive, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert spool.counts()["instances"] == {"stored": 40}
    assert spool.counts()["studies"] == {"receiving": 4}
    assert len(_files(spool.instances_dir)) == 40


def _store_waiting(
    spool: Spool, sops: list[str], outcomes: dict, study_of: dict[str, str] | None = None
) -> dict[str, tuple[threading.Thread, Path]]:
    """Stores of received files (into STUDY, or `study_of[sop]`), one thread each, started while
    the test holds the group commit.

    Returns once all wait for it, their files placed, each sop's thread and received file;
    each thread records its StoredInstance or exception in `outcomes`.
    """

    def receive(sop: str, received: Path) -> None:
        try:
            outcomes[sop] = spool.store(
                received,
                sop_instance_uid=sop,
                sop_class_uid=CT_IMAGE_STORAGE,
                study_instance_uid=(study_of or {}).get(sop, STUDY),
                series_instance_uid=SERIES,
                calling_ae="MODALITY",
            )
        except BaseException as exc:  # surfaced by the test's assertions
            outcomes[sop] = exc
        finally:
            spool.close()

    received = {sop: _received(spool, f"instance {sop}".encode()) for sop in sops}
    threads = [threading.Thread(target=receive, args=(sop, received[sop])) for sop in sops]
    for thread in threads:
        thread.start()
    wait_until(lambda: spool._commits.waiting == len(sops), 30, interval=0.01, what="all stores waiting")
    return {sop: (thread, received[sop]) for sop, thread in zip(sops, threads, strict=True)}


def test_stores_that_arrive_while_another_commits_share_one_folder_sync_and_one_transaction(
    spool, monkeypatch
):
    synced: list[Path] = []
    monkeypatch.setattr(instances, "fsync_dir", lambda folder: synced.append(folder))
    transactions: list[int] = []
    journal = spool._journal
    monkeypatch.setattr(spool, "_journal", lambda group: (transactions.append(len(group)), journal(group)))
    outcomes: dict = {}
    sops = [f"1.2.3.4.{n}" for n in range(1, 5)]

    with spool._commits.running:
        waiting = _store_waiting(spool, sops, outcomes)
    for thread, _ in waiting.values():
        thread.join()

    assert all(outcomes[sop].path.read_bytes() == f"instance {sop}".encode() for sop in sops)
    assert {stored.sop_instance_uid for stored in spool.instances(STUDY)} == set(sops)
    assert synced == [spool.instances_dir / STUDY]
    assert transactions == [4]


def test_a_folder_that_cannot_be_synced_fails_its_stores_alone_and_the_rest_of_the_group_commits(
    spool, monkeypatch
):
    def fsync_dir(folder: Path) -> None:
        if folder.name == OTHER_STUDY:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(instances, "fsync_dir", fsync_dir)
    outcomes: dict = {}
    sops = ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"]

    with spool._commits.running:
        waiting = _store_waiting(spool, sops, outcomes, study_of={"1.2.3.4.2": OTHER_STUDY})
    for thread, _ in waiting.values():
        thread.join()

    assert isinstance(outcomes["1.2.3.4.2"], SpoolError)
    assert "cannot sync instance folder" in str(outcomes["1.2.3.4.2"])
    assert {stored.sop_instance_uid for stored in spool.instances(STUDY)} == {"1.2.3.4.1", "1.2.3.4.3"}
    assert spool.study(OTHER_STUDY) is None, "not acknowledged, not journaled"


def test_a_received_file_that_cannot_be_placed_fails_its_store_alone_and_stays_for_the_scp(spool):
    (spool.instances_dir / OTHER_STUDY).write_bytes(b"a file where the study folder belongs")
    received = _received(spool, b"instance")

    with pytest.raises(SpoolError, match="cannot write instance file"):
        spool.store(
            received,
            sop_instance_uid="1.2.3.4.1",
            sop_class_uid=CT_IMAGE_STORAGE,
            study_instance_uid=OTHER_STUDY,
            series_instance_uid=SERIES,
            calling_ae="MODALITY",
        )

    assert received.exists(), "refused: the SCP deletes it"
    assert spool.study(OTHER_STUDY) is None
    assert _store(spool, "1.2.3.4.2").path.exists()


def test_a_journal_that_fails_fails_every_store_of_its_group_and_none_is_acknowledged(spool, monkeypatch):
    def failing_journal(group) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(spool, "_journal", failing_journal)
    outcomes: dict = {}
    sops = ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"]

    with spool._commits.running:
        waiting = _store_waiting(spool, sops, outcomes)
    for thread, _ in waiting.values():
        thread.join()

    assert all(isinstance(outcomes[sop], sqlite3.OperationalError) for sop in sops)
    assert spool.instances(STUDY) == ()


def test_identical_resend_of_a_done_study_neither_rewrites_nor_reopens_it(spool):
    stored = _store(spool, "1.2.3.4.5")
    study = _claim(spool)
    spool.finish_study(study, state="done", prompt_set="cxr")
    written = stored.path.stat().st_mtime_ns

    _store(spool, "1.2.3.4.5")

    record = spool.study(STUDY)
    assert (record.state, record.generation) == ("done", 0)
    assert stored.path.stat().st_mtime_ns == written


def test_changed_resend_of_a_done_study_reopens_it(spool):
    _store(spool, "1.2.3.4.5")
    spool.finish_study(_claim(spool), state="done", prompt_set="cxr")

    stored = _store(spool, "1.2.3.4.5", content=b"corrected instance")

    assert spool.study(STUDY).state == "receiving"
    assert stored.path.read_bytes() == b"corrected instance"


def test_identical_resend_of_a_failed_study_retries_it(spool):
    _store(spool, "1.2.3.4.5")
    spool.finish_study(_claim(spool), state="failed", reason="pixel data cannot be decoded")

    _store(spool, "1.2.3.4.5")

    assert spool.study(STUDY).state == "receiving"


def test_instance_moved_to_another_study_leaves_no_stale_file(spool):
    first = _store(spool, "1.2.3.4.5", study=STUDY)
    moved = _store(spool, "1.2.3.4.5", study=OTHER_STUDY)

    assert not first.path.exists()
    assert _files(spool.instances_dir) == [moved.path]
    assert spool.instances(STUDY) == ()
    assert spool.instances(OTHER_STUDY) == (moved,)


def test_requeue_dead_returns_dead_deliveries_of_one_destination_to_the_queue_now(spool):
    _store(spool, "1.2.3.1")
    deliveries = [("pacs", spool.outbox_dir / "sr.dcm"), ("archive", spool.outbox_dir / "sr.dcm")]
    spool.finish_study(_claim(spool), state="done", deliveries=deliveries)
    for destination in ("pacs", "archive"):
        spool.delivery_failed(spool.next_delivery(destination), "refused", retry_at=None)

    assert spool.requeue_dead("pacs") == 1

    assert spool.counts()["outbox"] == {"archive:dead": 1, "pacs:pending": 1}
    assert spool.next_delivery("pacs").attempts == 0
    assert spool.requeue_dead() == 1
    assert spool.counts()["outbox"] == {"archive:pending": 1, "pacs:pending": 1}


def test_a_retry_waits_its_delay_then_the_study_is_claimed_again(spool):
    _store(spool, "1.2.3.1")
    study = _claim(spool)

    assert spool.retry_study(study, "OSError: No space left on device", delay_s=60, max_attempts=3)

    record = spool.study(STUDY)
    assert (record.state, record.attempts) == ("receiving", 1)
    assert record.reason == "attempt 1 of 3 failed: OSError: No space left on device"
    assert spool.problems() == [("study retrying", uid_tag(STUDY), record.reason)]
    assert spool.claim_quiet_study(0, now=time.time() + 30) is None
    again = spool.claim_quiet_study(0, now=time.time() + 61)
    assert again is not None and again.attempts == 1


def test_the_last_allowed_attempt_fails_the_study_for_good(spool):
    _store(spool, "1.2.3.1")
    for attempt in (1, 2):
        study = spool.claim_quiet_study(0, now=time.time() + 1000 * attempt)
        planned = spool.retry_study(study, "MemoryError: ", delay_s=1, max_attempts=2)
        assert planned is (attempt == 1)

    record = spool.study(STUDY)
    assert (record.state, record.attempts) == ("failed", 2)
    assert record.reason == "attempt 2 of 2 failed: MemoryError: "


def test_new_content_resets_the_attempts_and_the_delay(spool):
    _store(spool, "1.2.3.1")
    spool.retry_study(_claim(spool), "OSError: disk", delay_s=3600, max_attempts=5)

    _store(spool, "1.2.3.2")

    record = spool.study(STUDY)
    assert record.attempts == 0
    assert spool.claim_quiet_study(0, now=time.time() + 1) is not None


def test_a_journal_of_the_first_schema_is_migrated_in_place(tmp_path):
    state = tmp_path / "var"
    state.mkdir()
    old = sqlite3.connect(state / "journal.sqlite")
    old.executescript(
        "CREATE TABLE studies (study_instance_uid TEXT PRIMARY KEY, state TEXT NOT NULL, "
        "generation INTEGER NOT NULL DEFAULT 0, last_received_at REAL NOT NULL, prompt_set TEXT, "
        "reason TEXT, updated_at REAL NOT NULL);"
        f"INSERT INTO studies VALUES ('{STUDY}', 'receiving', 0, 0, NULL, NULL, 0);"
    )
    old.commit()
    old.close()

    spool = Spool(state)

    study = spool.claim_quiet_study(0)
    assert study is not None and study.attempts == 0
    assert spool._db().execute("PRAGMA user_version").fetchone()[0] == journal_module.SCHEMA_VERSION


def test_a_journal_of_schema_1_gains_report_versions_and_keeps_its_deliveries(tmp_path):
    state = tmp_path / "var"
    first = Spool(state)
    first._db().executescript(
        "DROP TABLE reports; DROP TABLE outbox; "
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, study_instance_uid TEXT NOT NULL, "
        "destination TEXT NOT NULL, path TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL "
        "DEFAULT 0, next_attempt_at REAL NOT NULL, last_error TEXT, updated_at REAL NOT NULL, "
        "UNIQUE (destination, path));"
        f"INSERT INTO outbox VALUES (1, '{STUDY}', 'pacs', '/r.dcm', 'pending', 2, 0, 'down', 0);"
        "PRAGMA user_version=1;"
    )
    first.close()

    spool = Spool(state)

    delivery = spool.next_delivery("pacs")
    assert (delivery.id, delivery.attempts) == (1, 2)
    spool.delivery_failed(delivery, "still down", retry_at=time.time() + 60)
    assert spool._db().execute("SELECT first_failed_at FROM outbox").fetchone()[0] is not None
    assert spool.latest_report(STUDY) is None
    assert spool._db().execute("PRAGMA user_version").fetchone()[0] == journal_module.SCHEMA_VERSION


def test_a_journal_of_schema_2_names_the_prompt_set_of_each_report_by_its_study(tmp_path):
    state = tmp_path / "var"
    first = Spool(state)
    _store(first, "1.2.3.1")
    first.finish_study(_claim(first), state="done", prompt_set="cxr", reports=[_version(1)])
    first._db().executescript("ALTER TABLE reports DROP COLUMN prompt_set; PRAGMA user_version=2;")
    first.close()

    spool = Spool(state)

    assert spool.latest_report(STUDY, "cxr") == replace(_version(1), prompt_set="cxr")
    assert spool._db().execute("PRAGMA user_version").fetchone()[0] == journal_module.SCHEMA_VERSION


def test_each_prompt_set_of_a_study_has_its_own_chain_of_report_versions(spool):
    cxr, oct = replace(_version(1), prompt_set="cxr"), replace(_version(1, study=STUDY), prompt_set="oct")
    oct = replace(oct, sr=ObjectReference("2.25.71", "2.25.72", "1.2.840.1"), content_key="2.25.79")
    _store(spool, "1.2.3.1")
    assert spool.finish_study(_claim(spool), state="done", prompt_set="cxr,oct", reports=[cxr, oct])
    assert (spool.latest_report(STUDY, "cxr"), spool.latest_report(STUDY, "oct")) == (cxr, oct)

    cxr_v2 = replace(_version(2, replaces=cxr), prompt_set="cxr")
    _store(spool, "1.2.3.2")
    assert spool.finish_study(_claim(spool), state="done", prompt_set="cxr,oct", reports=[cxr_v2, oct])

    assert (spool.latest_report(STUDY, "cxr"), spool.latest_report(STUDY, "oct")) == (cxr_v2, oct)
    stale_oct = replace(_version(2, replaces=_version(1)), prompt_set="oct", content_key="2.25.89")
    _store(spool, "1.2.3.3")
    assert not spool.finish_study(_claim(spool), state="done", reports=[cxr_v2, stale_oct]), (
        "oct's v2 must replace oct's v1, not cxr's"
    )


def _finish(spool: Spool, sop: str, study: str, state: str, delivery_states: tuple[str, ...] = ()) -> None:
    """A study in `state` whose deliveries ended in `delivery_states` ('sent', 'dead', 'pending')."""
    _store(spool, sop, study=study)
    record = spool.claim_quiet_study(0, now=time.time() + 1)
    results = spool.outbox_dir / study
    results.mkdir(exist_ok=True)
    deliveries = []
    for index, _ in enumerate(delivery_states):
        path = results / f"result{index}.dcm"
        path.write_bytes(b"result")
        deliveries.append((f"dest{index}", path))
    spool.finish_study(record, state=state, deliveries=deliveries)
    for index, delivery_state in enumerate(delivery_states):
        delivery = spool.next_delivery(f"dest{index}")
        if delivery_state == "sent":
            spool.delivery_sent(delivery)
        elif delivery_state == "dead":
            spool.delivery_failed(delivery, "refused", retry_at=None)


def test_purge_deletes_only_finished_studies_whose_results_were_all_sent(spool):
    kept = {
        "1.2.9.2": ("done", ("sent", "pending")),
        "1.2.9.3": ("done", ("dead",)),
        "1.2.9.4": ("failed", ()),
    }
    _finish(spool, "1.2.9.1.1", "1.2.9.1", "done", ("sent", "sent"))
    _finish(spool, "1.2.9.5.1", "1.2.9.5", "ignored")
    for study, (state, deliveries) in kept.items():
        _finish(spool, f"{study}.1", study, state, deliveries)
    _store(spool, "1.2.9.6.1", study="1.2.9.6")  # still receiving

    assert spool.purge_finished(time.time() + 1) == 2

    for gone in ("1.2.9.1", "1.2.9.5"):
        assert spool.study(gone) is None and spool.instances(gone) == ()
        assert not (spool.instances_dir / gone).exists() and not (spool.outbox_dir / gone).exists()
    for study in (*kept, "1.2.9.6"):
        assert spool.study(study) is not None
        assert (spool.instances_dir / study / f"{study}.1.dcm").exists()
    assert spool.counts()["outbox"] == {"dest0:dead": 1, "dest0:sent": 1, "dest1:pending": 1}


def test_purge_keeps_studies_finished_within_the_retention(spool):
    _finish(spool, "1.2.9.1.1", "1.2.9.1", "done", ("sent",))

    assert spool.purge_finished(time.time() - 3600) == 0
    assert spool.study("1.2.9.1") is not None


def test_a_study_purged_and_sent_again_is_received_as_new(spool):
    _finish(spool, "1.2.9.1.1", "1.2.9.1", "done", ("sent",))
    spool.purge_finished(time.time() + 1)

    stored = _store(spool, "1.2.9.1.1", study="1.2.9.1")

    assert stored.path.exists()
    assert spool.study("1.2.9.1").state == "receiving"


def test_a_purge_racing_late_instances_never_loses_an_acknowledged_one(spool):
    _finish(spool, "1.2.9.1.1", "1.2.9.1", "done", ("sent",))
    stored = []

    def late_instances() -> None:
        for index in range(2, 60):
            stored.append(_store(spool, f"1.2.9.1.{index}", study="1.2.9.1"))
        spool.close()

    sender = threading.Thread(target=late_instances)
    sender.start()
    while sender.is_alive():
        spool.purge_finished(time.time() + 1)
    sender.join()

    assert len(stored) == 58
    assert all(instance.path.exists() for instance in stored)
    assert {i.sop_instance_uid for i in spool.instances("1.2.9.1")} >= {i.sop_instance_uid for i in stored}


def test_a_store_that_comes_while_a_purge_waits_goes_after_it(spool):
    _finish(spool, "1.2.9.1.1", "1.2.9.1", "done", ("sent",))
    lock = spool._study_lock("1.2.9.1")
    purged: list[int] = []
    stored: list = []
    purge = threading.Thread(
        target=lambda: (purged.append(spool.purge_finished(time.time() + 1)), spool.close())
    )
    store = threading.Thread(
        target=lambda: (stored.append(_store(spool, "1.2.9.1.2", study="1.2.9.1")), spool.close())
    )

    with lock.shared():  # a store under way
        purge.start()
        wait_until(lambda: lock._purges_waiting == 1, 10, interval=0.01, what="purge waiting")
        store.start()
        store.join(0.3)
        assert store.is_alive(), "a store arriving behind a waiting purge waits for it"
    purge.join()
    store.join()

    assert purged == [1], "the purge was not held off by the store behind it"
    assert [i.sop_instance_uid for i in spool.instances("1.2.9.1")] == ["1.2.9.1.2"]
    assert stored[0].path.exists() and spool.study("1.2.9.1").state == "receiving"


def _version(number: int, replaces: ReportVersion | None = None, study: str = STUDY) -> ReportVersion:
    def reference(kind: str) -> ObjectReference:
        return ObjectReference(f"2.25.{number}1{kind}", f"2.25.{number}2{kind}", f"1.2.840.{kind}")

    return ReportVersion(
        study_instance_uid=study,
        number=number,
        content_key=f"2.25.{number}9",
        sr=reference("1"),
        sc=reference("2"),
        replaces=None if replaces is None else replaces.sr,
    )


def test_finish_study_remembers_each_report_version_and_the_latest_is_the_highest(spool):
    first, second = _version(1), _version(2, replaces=_version(1))
    _store(spool, "1.2.3.1")
    assert spool.finish_study(_claim(spool), state="done", reports=[first])
    assert spool.latest_report(STUDY) == first
    _store(spool, "1.2.3.2")
    assert spool.finish_study(_claim(spool), state="done", reports=[second])
    assert spool.reprocess(STUDY) == "done"
    assert spool.finish_study(_claim(spool), state="done", reports=[second])  # written again

    assert spool.latest_report(STUDY) == second
    assert spool.latest_report(OTHER_STUDY) is None
    assert spool._db().execute("SELECT count(*) FROM reports").fetchone()[0] == 2


def test_a_version_written_while_a_late_instance_arrived_is_still_remembered(spool):
    _store(spool, "1.2.3.1")
    claimed = _claim(spool)
    _store(spool, "1.2.3.2")

    assert spool.finish_study(claimed, state="done", reports=[_version(1)]) is False

    assert spool.latest_report(STUDY) == _version(1), "it went to the PACS: the next one must replace it"


def test_report_versions_outlive_the_purge_of_their_study(spool):
    _finish(spool, "1.2.9.1.1", "1.2.9.1", "done", ("sent",))
    version = _version(1, study="1.2.9.1")
    _store(spool, "1.2.9.1.2", study="1.2.9.1")
    spool.finish_study(spool.claim_quiet_study(0, now=time.time() + 1), state="done", reports=[version])

    assert spool.purge_finished(time.time() + 1) == 1

    assert spool.study("1.2.9.1") is None
    assert spool.latest_report("1.2.9.1") == version


@pytest.mark.parametrize("state", ["done", "failed", "ignored"])
def test_reprocess_puts_a_finished_study_back_in_the_queue_quiet_already(spool, state):
    _store(spool, "1.2.3.1")
    claimed = _claim(spool)
    spool.retry_study(claimed, "OSError: disk", delay_s=3600, max_attempts=5)
    spool.finish_study(_claim_at(spool, time.time() + 3601), state=state, reason="why")

    assert spool.reprocess(STUDY) == state

    record = spool.study(STUDY)
    assert (record.state, record.reason, record.attempts) == ("receiving", None, 0)
    again = spool.claim_quiet_study(30.0, now=time.time() + 31)  # not after the retry delay
    assert again is not None and again.generation == claimed.generation + 1


def _claim_at(spool: Spool, now: float) -> StudyRecord:
    study = spool.claim_quiet_study(0, now=now)
    assert study is not None
    return study


def test_reprocess_during_processing_makes_the_worker_result_count_as_older_content(spool):
    _store(spool, "1.2.3.1")
    claimed = _claim(spool)

    assert spool.reprocess(STUDY) == "processing"

    assert spool.finish_study(claimed, state="done") is False
    assert spool.study(STUDY).state == "receiving"


def test_reprocess_leaves_a_waiting_study_and_knows_no_unknown_one(spool):
    _store(spool, "1.2.3.1")
    generation = spool.study(STUDY).generation

    assert spool.reprocess(STUDY) == "receiving"
    assert spool.reprocess(OTHER_STUDY) is None
    assert spool.study(STUDY).generation == generation


def test_requeue_failed_puts_only_failed_studies_back(spool):
    _finish(spool, "1.2.9.1.1", "1.2.9.1", "failed")
    _finish(spool, "1.2.9.2.1", "1.2.9.2", "done")
    _finish(spool, "1.2.9.3.1", "1.2.9.3", "failed")

    assert sorted(spool.requeue_failed()) == ["1.2.9.1", "1.2.9.3"]

    assert [spool.study(uid).state for uid in ("1.2.9.1", "1.2.9.2", "1.2.9.3")] == [
        "receiving",
        "done",
        "receiving",
    ]
    assert spool.requeue_failed() == []


def _two_workers_on_one_study(spool: Spool) -> tuple[StudyRecord, StudyRecord]:
    """v1 recorded; then worker A holds the study, a late instance re-opens it, B holds it too."""
    _store(spool, "1.2.3.1")
    assert spool.finish_study(_claim(spool), state="done", reports=[_version(1)])
    _store(spool, "1.2.3.2")
    first = _claim(spool)
    _store(spool, "1.2.3.3")
    second = _claim(spool)
    assert second.generation == first.generation + 1
    return first, second


def _versions_from(number: int, kind: str) -> ReportVersion:
    """Version `number` replacing v1, from worker `kind`: other UIDs for each worker."""
    base = _version(number, replaces=_version(1))
    tagged = ObjectReference(
        base.sr.series_instance_uid, f"{base.sr.sop_instance_uid}{kind}", base.sr.sop_class_uid
    )
    return ReportVersion(
        base.study_instance_uid, number, f"{base.content_key}{kind}", tagged, base.sc, base.replaces
    )


def test_of_two_workers_on_one_study_the_stale_one_finishing_last_is_dropped(spool):
    stale, fresh = _two_workers_on_one_study(spool)
    fresh_report, stale_report = _versions_from(2, "7"), _versions_from(2, "8")

    assert spool.finish_study(
        fresh, state="done", reports=[fresh_report], deliveries=[("pacs", Path("/v2b"))]
    )
    assert (
        spool.finish_study(stale, state="done", reports=[stale_report], deliveries=[("pacs", Path("/v2a"))])
        is False
    )

    assert spool.latest_report(STUDY) == fresh_report
    assert spool.study(STUDY).state == "done"
    assert spool.next_delivery("pacs").path == Path("/v2b")
    assert spool.counts()["outbox"] == {"pacs:pending": 1}


def test_of_two_workers_on_one_study_the_fresh_one_finishing_last_is_written_again_as_the_next(spool):
    stale, fresh = _two_workers_on_one_study(spool)
    stale_report, fresh_report = _versions_from(2, "8"), _versions_from(2, "7")

    assert spool.finish_study(stale, state="done", reports=[stale_report]) is False  # late instance
    assert spool.finish_study(fresh, state="done", reports=[fresh_report]) is False

    assert spool.latest_report(STUDY) == stale_report, "it went out: the next version replaces it"
    assert spool.study(STUDY).state == "receiving"
    again = _claim(spool)
    assert again.generation == fresh.generation
    next_version = _version(3, replaces=stale_report)
    assert spool.finish_study(again, state="done", reports=[next_version])
    assert spool.latest_report(STUDY) == next_version


def _received(spool: Spool, content: bytes, folder: Path | None = None) -> Path:
    """A file as the SCP hands it over: received into incoming/ (or `folder`)."""
    path = (folder or spool.incoming_dir) / f".received-{time.monotonic_ns()}.dcm"
    path.write_bytes(content)
    return path


def test_a_received_file_is_moved_into_the_spool_by_a_rename(spool):
    received = _received(spool, b"instance bytes" * 1000)
    inode = received.stat().st_ino

    stored = _store(spool, "1.2.3.4.5", content=received)

    assert stored.path.stat().st_ino == inode
    assert stored.path.read_bytes() == b"instance bytes" * 1000
    assert not received.exists()


def _record_syncs(spool: Spool, monkeypatch) -> list[tuple]:
    """fsync_file and fsync_dir as the spool calls them: what, where the bytes were, and rows then."""
    events: list[tuple] = []

    def fsync_file(path: Path) -> None:
        events.append(("fsync", path, path.read_bytes(), len(spool.instances(STUDY))))

    monkeypatch.setattr(instances, "fsync_file", fsync_file)
    monkeypatch.setattr(instances, "fsync_dir", lambda path: events.append(("fsync_dir", path)))
    return events


def test_a_new_instance_takes_its_name_then_is_synced_and_its_folder_before_its_row(spool, monkeypatch):
    events = _record_syncs(spool, monkeypatch)
    received = _received(spool, b"instance bytes")

    stored = _store(spool, "1.2.3.4.5", content=received)

    assert events == [("fsync", stored.path, b"instance bytes", 0), ("fsync_dir", stored.path.parent)]
    assert not received.exists()


def test_a_changed_resend_is_synced_before_it_takes_the_name_of_the_file_its_row_refers_to(
    spool, monkeypatch
):
    first = _store(spool, "1.2.3.4.5", content=_received(spool, b"first bytes"))
    events = _record_syncs(spool, monkeypatch)
    received = _received(spool, b"changed bytes")

    stored = _store(spool, "1.2.3.4.5", content=received)

    assert stored.path == first.path
    assert events == [("fsync", received, b"changed bytes", 1), ("fsync_dir", stored.path.parent)]
    assert stored.path.read_bytes() == b"changed bytes"


def test_a_purge_waits_for_a_store_placed_in_its_study_and_then_leaves_the_study_reopened(spool):
    _finish(spool, "1.2.9.1.1", "1.2.9.1", "done", ("sent",))
    outcomes: dict = {}

    with spool._commits.running:
        waiting = _store_waiting(spool, ["1.2.9.1.2"], outcomes, study_of={"1.2.9.1.2": "1.2.9.1"})
        purged: list[int] = []
        purge = threading.Thread(
            target=lambda: (purged.append(spool.purge_finished(time.time() + 1)), spool.close())
        )
        purge.start()
        purge.join(0.5)
        assert purge.is_alive(), "the purge must wait: the placed file has no row yet"
    purge.join()
    for thread, _ in waiting.values():
        thread.join()

    assert purged == [0]
    assert outcomes["1.2.9.1.2"].path.exists()
    assert spool.study("1.2.9.1").state == "receiving"


def test_a_received_resend_is_compared_chunk_by_chunk_same_size_different_bytes_replaces(spool, monkeypatch):
    monkeypatch.setattr(instances, "_COMPARE_CHUNK", 7)  # many chunks, the difference in the last
    first = bytes(100)
    _store(spool, "1.2.3.4.5", content=_received(spool, first))
    spool.finish_study(_claim(spool), state="done")

    same = _received(spool, first)
    _store(spool, "1.2.3.4.5", content=same)
    assert spool.study(STUDY).state == "done", "byte-identical: nothing changes"
    assert not same.exists(), "the resend is the spool's once stored: deleted, not left behind"

    changed = first[:-1] + b"\x01"
    _store(spool, "1.2.3.4.5", content=_received(spool, changed))
    assert spool.study(STUDY).state == "receiving"
    assert spool.instances(STUDY)[0].path.read_bytes() == changed


def test_a_file_received_on_another_file_system_is_copied_durably(spool):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == spool.instances_dir.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system other than the spool's")
    received = _received(spool, b"from elsewhere", folder=shm)
    try:
        stored = _store(spool, "1.2.3.4.5", content=received)
        assert stored.path.read_bytes() == b"from elsewhere"
    finally:
        received.unlink(missing_ok=True)


# Landing: small instances durable by the landing log's flush, their files synced by the settler.


@pytest.fixture
def landing(spool, monkeypatch) -> Iterator[Spool]:
    """The spool settling as serve's does, but its settler asleep for the test's length: what
    lands stays landed until the test settles it, or the state folder is opened again."""
    monkeypatch.setattr(instances, "SETTLE_S", 3600.0)
    spool.start_settling()
    yield spool
    spool.stop_settling()


def _dies(spool: Spool) -> None:
    """The process of `spool` dies, as far as other processes can tell: the kernel lets go of
    its landing log. (The rest of it lingers in this test's process, its settler asleep.)"""
    spool._let_go()


def _land(spool: Spool, sop: str, data: bytes, study: str = STUDY):
    """Store as the SCP does an instance whose bytes it kept: the received file and its bytes."""
    return spool.store(
        _received(spool, data),
        sop_instance_uid=sop,
        sop_class_uid=CT_IMAGE_STORAGE,
        study_instance_uid=study,
        series_instance_uid=SERIES,
        calling_ae="MODALITY",
        held=data,
    )


def _landed(spool: Spool) -> dict[str, tuple[str, bytes]]:
    """What landed since the last settling: the records of the log's current segment."""
    landing_log = spool._landing_log
    if landing_log is None:
        return {}
    return {r.sop_instance_uid: (r.path, r.content) for r in read_segment(landing_log.current)}


def _landing_seq(spool: Spool, sop: str) -> int | None:
    return (
        spool._db()
        .execute("SELECT landing_seq FROM instances WHERE sop_instance_uid=?", (sop,))
        .fetchone()[0]
    )


def test_a_small_instance_lands_in_the_log_with_its_row_and_its_file_is_not_synced(landing, monkeypatch):
    events = _record_syncs(landing, monkeypatch)

    stored = _land(landing, "1.2.3.4.5", b"slice bytes")

    assert events == [], "neither the file nor its folder: the log's flush makes it durable"
    assert stored.path.read_bytes() == b"slice bytes"
    assert _landed(landing) == {"1.2.3.4.5": (str(stored.path), b"slice bytes")}
    assert landing.instances(STUDY) == (stored,)
    assert _landing_seq(landing, "1.2.3.4.5") == 1
    assert landing._landing_mark("0") == 1


def test_settling_syncs_the_file_system_once_then_leaves_the_segment(landing, monkeypatch):
    synced = []
    monkeypatch.setattr(instances, "sync_file_system", lambda folder: synced.append(folder))
    for number in range(3):
        _land(landing, f"1.2.3.4.{number}", b"slice %d" % number)

    assert landing.settle_landed() == 3

    assert len(synced) == 1
    assert os.fstat(synced[0]).st_ino == landing.instances_dir.stat().st_ino
    assert _landed(landing) == {}
    assert landing.settle_landed() == 0
    assert len(synced) == 1, "nothing landed: nothing to sync"
    _land(landing, "1.2.3.4.9", b"slice 9")
    assert landing.settle_landed() == 1
    assert synced[1] == synced[0], "one descriptor kept open: a write-back failure in between is seen"


@pytest.mark.parametrize(
    "how",
    ["over LANDING_BYTES", "bytes not kept", "not settling", "changed resend of a file a row refers to"],
)
def test_an_instance_that_does_not_land_is_synced_before_its_row_as_always(spool, monkeypatch, how):
    size = instances.LANDING_BYTES + 1 if how == "over LANDING_BYTES" else 100
    if how != "not settling":
        monkeypatch.setattr(instances, "SETTLE_S", 3600.0)
        spool.start_settling()
    if how == "changed resend of a file a row refers to":
        _land(spool, "1.2.3.4.5", bytes(size))
    events = _record_syncs(spool, monkeypatch)
    data = b"\x01" * size
    received = _received(spool, data)

    spool.store(
        received,
        sop_instance_uid="1.2.3.4.5",
        sop_class_uid=CT_IMAGE_STORAGE,
        study_instance_uid=STUDY,
        series_instance_uid=SERIES,
        calling_ae="MODALITY",
        held=None if how == "bytes not kept" else data,
    )

    (stored,) = spool.instances(STUDY)
    assert [event[0] for event in events] == ["fsync", "fsync_dir"]
    assert _landing_seq(spool, "1.2.3.4.5") is None, "no landing that a restore could write over it"
    assert stored.path.read_bytes() == data
    spool.stop_settling()


def test_after_an_unclean_stop_landed_files_are_written_again_from_the_log(tmp_path, landing):
    kept = _land(landing, "1.2.3.4.1", b"kept by the disk")
    lost = _land(landing, "1.2.3.4.2", b"lost with the page cache")
    torn = _land(landing, "1.2.3.4.3", b"torn by the power loss")
    # The power goes: what the kernel had not written back is gone or half written.
    lost.path.unlink()
    torn.path.write_bytes(b"torn")

    _dies(landing)
    restarted = Spool(tmp_path / "var")
    assert restarted.restore_landed() == 3

    assert kept.path.read_bytes() == b"kept by the disk"
    assert lost.path.read_bytes() == b"lost with the page cache"
    assert torn.path.read_bytes() == b"torn by the power loss"
    assert restarted.restore_landed() == 0, "once durable, the log's records are forgotten"
    restarted.close()


def test_stores_whose_commit_a_power_loss_undid_are_done_again_from_the_log(tmp_path, landing):
    """The rows of a landed group are committed without a flush: after a power loss the journal
    may end before them, while the log, flushed before the acknowledgement, holds them."""
    kept = _land(landing, "1.2.3.4.1", b"committed and on disk")
    # Two more stores acknowledged, whose commit the power loss undid: in the log, above the mark.
    landing_log = landing._landing_log
    undone = [
        Landing(
            seq,
            sop,
            CT_IMAGE_STORAGE,
            study,
            SERIES,
            str(landing.instances_dir / study / f"{sop}.dcm"),
            "MODALITY",
            time.time(),
            data,
        )
        for seq, sop, study, data in (
            (2, "1.2.3.4.2", STUDY, b"second"),
            (3, "1.2.3.4.3", OTHER_STUDY, b"third"),
        )
    ]
    landing_log.append(undone)

    _dies(landing)
    restarted = Spool(tmp_path / "var")
    assert restarted.restore_landed() == 3, "one file written again, two stores done again"

    assert [i.sop_instance_uid for i in restarted.instances(STUDY)] == ["1.2.3.4.1", "1.2.3.4.2"]
    (third,) = restarted.instances(OTHER_STUDY)
    assert third.path.read_bytes() == b"third"
    assert restarted.study(OTHER_STUDY).state == "receiving"
    assert kept.path.read_bytes() == b"committed and on disk"
    assert restarted._landing_mark("0") == 3
    restarted.close()


def test_a_restore_never_writes_an_older_landing_over_what_was_stored_since(tmp_path, landing):
    first = _land(landing, "1.2.3.4.5", b"first version")
    # A changed resend of a file its row refers to is synced in full, as always.
    _store(landing, "1.2.3.4.5", content=_received(landing, b"second version"))
    moved = _land(landing, "1.2.3.4.6", b"moved instance")
    _land(landing, "1.2.3.4.6", b"moved instance", study=OTHER_STUDY)

    _dies(landing)
    restarted = Spool(tmp_path / "var")
    assert restarted.restore_landed() == 1, "the moved instance, where it now is"

    assert first.path.read_bytes() == b"second version"
    assert not moved.path.exists(), "not brought back into the study it left"
    (now,) = restarted.instances(OTHER_STUDY)
    assert now.path.read_bytes() == b"moved instance"
    restarted.close()


def _undone(spool: Spool, seq: int, sop: str, data: bytes, at: float | None = None) -> Landing:
    """A record as a store writes it to the log before its commit."""
    return Landing(
        seq,
        sop,
        CT_IMAGE_STORAGE,
        STUDY,
        SERIES,
        str(spool.instances_dir / STUDY / f"{sop}.dcm"),
        "MODALITY",
        time.time() if at is None else at,
        data,
    )


def test_a_record_of_another_log_with_the_same_number_is_not_written_over_the_file(tmp_path, landing):
    """Sequence numbers are per log: a row names the log as well as the record."""
    sop = "1.2.3.4.7"
    _land(landing, sop, b"first landing, log 0 record 1")
    _land(landing, sop, b"moved away, log 0 record 2", study=OTHER_STUDY)
    receiver = Spool.open_existing(tmp_path / "var", read_only=False)
    receiver.start_settling("1")
    back = _land(receiver, sop, b"moved back, log 1 record 1")  # the same path as record 1 of log 0
    receiver._landing_log.close()  # the receiver dies: its settler never runs
    receiver._landing_log = None
    _dies(receiver)
    back.path.write_bytes(b"torn")  # and the power goes

    _dies(landing)
    restarted = Spool(tmp_path / "var")
    assert restarted.restore_landed() == 1

    assert back.path.read_bytes() == b"moved back, log 1 record 1"
    restarted.close()


def test_a_receiver_started_again_drops_what_it_logged_but_never_committed(tmp_path, landing):
    """A receiving process that died between its log's flush and its commit never acknowledged
    those stores; the node ran on (the study may have finished since), so they are not done."""
    kept = _land(landing, "1.2.3.4.1", b"committed")  # the node's log, not the receiver's
    receiver = Spool.open_existing(tmp_path / "var", read_only=False)
    receiver.start_settling("1")
    committed = _land(receiver, "1.2.3.4.2", b"committed by the receiver")
    receiver._landing_log.append([_undone(receiver, 2, "1.2.3.4.3", b"never committed")])
    receiver._landing_log.close()  # it dies there
    receiver._landing_log = None
    _dies(receiver)
    landing.finish_study(_claim(landing), state="done")

    again = Spool.open_existing(tmp_path / "var", read_only=False)
    again.start_settling("1")
    try:
        assert [i.sop_instance_uid for i in again.instances(STUDY)] == ["1.2.3.4.1", "1.2.3.4.2"]
        assert again.study(STUDY).state == "done", "not re-opened"
        assert committed.path.read_bytes() == b"committed by the receiver"
        assert kept.path.read_bytes() == b"committed"
        assert not read_segment_records(again, "1"), "what the log held is forgotten"
        assert _land(again, "1.2.3.4.4", b"next").path.exists()
        assert _landing_seq(again, "1.2.3.4.4") == 3, "a number dropped is not written again"
    finally:
        again.stop_settling()
        again.close()


def test_a_restore_waits_for_a_log_another_process_still_writes_and_then_keeps_what_it_wrote(
    tmp_path, landing
):
    """A receiving process of a node that was killed lives on for a moment, still landing. The
    node started again must not replay and forget its log meanwhile: what it acknowledged after
    the replay read the log would be forgotten before its file was synced."""
    _dies(landing)
    receiver = Spool.open_existing(tmp_path / "var", read_only=False)
    receiver.start_settling("1")
    early = _land(receiver, "1.2.3.4.1", b"landed before the restart")
    restarted = Spool(tmp_path / "var")
    restore = threading.Thread(target=restarted.restore_landed)
    restore.start()
    time.sleep(0.5)
    assert restore.is_alive(), "the restore waits while the receiver holds its log"
    late = _land(receiver, "1.2.3.4.2", b"landed while the node started")
    receiver._landing_log.close()  # then it dies, its settler never ran
    receiver._landing_log = None
    _dies(receiver)
    late.path.write_bytes(b"torn")  # and the power goes

    restore.join(10)
    assert not restore.is_alive()
    assert early.path.read_bytes() == b"landed before the restart"
    assert late.path.read_bytes() == b"landed while the node started"
    restarted.close()


def test_a_log_held_by_another_process_for_too_long_fails_the_start_naming_it(tmp_path, landing, monkeypatch):
    monkeypatch.setattr(instances, "HOLD_WAIT_S", 0.2)
    again = Spool.open_existing(tmp_path / "var", read_only=False)

    with pytest.raises(SpoolError, match="landing log 0 stayed in use by another process for 0.2 s"):
        again.start_settling("0")
    assert again._held is None and again._landing_log is None
    _dies(landing)
    again.start_settling("0")  # once the other lets go
    again.stop_settling()
    again.close()


def test_a_restore_does_not_do_again_a_store_older_than_the_instance_in_the_journal(tmp_path, landing):
    """A lost commit's record is older than a store of the same instance that came after it
    (the sender sent it again, to another process): that one stays."""
    before = time.time() - 60
    later = _land(landing, "1.2.3.4.5", b"sent again and committed")
    landing._landing_log.append([_undone(landing, 2, "1.2.3.4.5", b"first try, commit lost", at=before)])

    _dies(landing)
    restarted = Spool(tmp_path / "var")
    restarted.restore_landed()

    assert later.path.read_bytes() == b"sent again and committed"
    assert restarted._landing_mark("0") == 2
    restarted.close()


def test_the_logs_are_forgotten_only_after_the_file_system_is_synced(tmp_path, landing, monkeypatch):
    """Rows at or below the mark were committed without a flush: until the file system is synced,
    the log is what holds them."""
    _land(landing, "1.2.3.4.1", b"slice")
    events = []
    monkeypatch.setattr(instances, "sync_file_system", lambda folder: events.append("sync"))
    monkeypatch.setattr(instances, "forget_segment", lambda path: events.append("forget"))

    _dies(landing)
    restarted = Spool(tmp_path / "var")
    restarted.restore_landed()

    assert events == ["sync", "forget", "forget"]
    restarted.close()


def read_segment_records(spool: Spool, name: str) -> list:
    folder = spool.state_dir / "landing"
    return [r for part in (0, 1) for r in read_segment(folder / f"{name}-{part}.log")]


def test_an_instance_landed_while_the_file_system_syncs_waits_for_the_next_settling(landing, monkeypatch):
    _land(landing, "1.2.3.4.5", b"in the first study")

    def sync_while_it_moves(folder: int) -> None:
        _land(landing, "1.2.3.4.5", b"in the first study", study=OTHER_STUDY)

    monkeypatch.setattr(instances, "sync_file_system", sync_while_it_moves)

    assert landing.settle_landed() == 1
    (now,) = landing.instances(OTHER_STUDY)
    assert _landed(landing) == {"1.2.3.4.5": (str(now.path), b"in the first study")}


def test_the_settler_says_why_it_cannot_sync_lands_nothing_meanwhile_and_settles_once_it_can(
    spool, monkeypatch, caplog
):
    monkeypatch.setattr(instances, "SETTLE_S", 0.05)
    failing = threading.Event()
    failing.set()

    def sync(folder: int) -> None:
        if failing.is_set():
            raise OSError(5, "Input/output error")

    write_durably = instances.write_durably

    def write(path: Path, write) -> Path:  # the disk fails whatever is written
        sync(-1)
        return write_durably(path, write)

    monkeypatch.setattr(instances, "sync_file_system", sync)
    monkeypatch.setattr(instances, "write_durably", write)
    spool.start_settling()
    try:
        _land(spool, "1.2.3.4.5", b"slice")
        wait_until(lambda: "cannot settle" in caplog.text, timeout=10)
        assert "Input/output error" in caplog.text
        assert spool._suspect_log
        events = _record_syncs(spool, monkeypatch)
        _land(spool, "1.2.3.4.6", b"slice")
        assert [event[0] for event in events] == ["fsync", "fsync_dir"], "synced, not landed"

        failing.clear()
        wait_until(lambda: not spool._suspect_log, timeout=10)
    finally:
        spool.stop_settling()


def test_a_burst_wakes_the_settler_before_its_interval(spool, monkeypatch):
    monkeypatch.setattr(instances, "SETTLE_S", 3600.0)
    monkeypatch.setattr(instances, "SETTLE_COUNT", 5)
    spool.start_settling()
    try:
        for number in range(5):
            _land(spool, f"1.2.3.4.{number}", b"slice")
        wait_until(lambda: not _landed(spool), timeout=10)
    finally:
        spool.stop_settling()


def test_a_settler_syncs_only_after_its_own_process_landed(landing, tmp_path, monkeypatch):
    """With several receiving processes, each settler syncing the file system every SETTLE_S
    whatever landed would sync it that many times as often; each settles its own log."""
    synced = []
    monkeypatch.setattr(instances, "sync_file_system", lambda folder: synced.append(folder))
    monkeypatch.setattr(instances, "SETTLE_S", 0.02)
    receiver = Spool.open_existing(tmp_path / "var", read_only=False)
    receiver.start_settling("1")
    try:
        _land(landing, "1.2.3.4.1", b"landed by the node")  # whose settler sleeps for the test
        time.sleep(0.3)  # fifteen of the receiver's intervals
        assert synced == []
        _land(receiver, "1.2.3.4.2", b"landed by the receiver")
        wait_until(lambda: synced, timeout=10, what="the receiver's landing settled")
    finally:
        receiver.stop_settling()
        receiver.close()


def test_stopping_when_the_sync_fails_says_so_and_leaves_the_log_to_the_next_start(
    tmp_path, landing, monkeypatch, caplog
):
    stored = _land(landing, "1.2.3.4.1", b"slice")

    def failing(*args) -> None:
        raise OSError(errno.EIO, "Input/output error")

    # Neither the file system's sync nor, after it, writing each file again with its own.
    monkeypatch.setattr(instances, "sync_file_system", failing)
    monkeypatch.setattr(instances, "write_durably", failing)
    landing.stop_settling()

    assert "instances landed in the log stay there until the node starts again" in caplog.text
    monkeypatch.undo()
    stored.path.unlink()  # as after a power loss
    restarted = Spool(tmp_path / "var")
    assert restarted.restore_landed() == 1
    assert stored.path.read_bytes() == b"slice"
    restarted.close()


def test_stopping_settles_what_landed_and_stops_landing(landing, monkeypatch):
    synced = []
    monkeypatch.setattr(instances, "sync_file_system", lambda folder: synced.append(folder))
    _land(landing, "1.2.3.4.1", b"slice")

    landing.stop_settling()

    assert len(synced) == 1
    events = _record_syncs(landing, monkeypatch)
    _land(landing, "1.2.3.4.2", b"slice")
    assert [event[0] for event in events] == ["fsync", "fsync_dir"]


def test_a_version_4_journals_landed_instances_are_restored_after_the_upgrade(tmp_path):
    """A node of version 4 landed small instances in the journal itself (table `landed`); one
    that stopped uncleanly with some there leaves them to this version's start."""
    old = Spool(tmp_path / "var")
    stored = _store(old, "1.2.3.4.1", content=b"landed by version 4")
    old.close()
    db = sqlite3.connect(tmp_path / "var" / "journal.sqlite")
    with db:  # the journal as version 4 left it
        db.execute("ALTER TABLE instances DROP COLUMN landing_log")
        db.execute("ALTER TABLE instances DROP COLUMN landing_seq")
        db.execute("DROP TABLE landing_marks")
        db.execute(
            "INSERT INTO landed (sop_instance_uid, path, content) VALUES (?, ?, ?)",
            ("1.2.3.4.1", str(stored.path), b"landed by version 4"),
        )
        db.execute("PRAGMA user_version=4")
    db.close()
    stored.path.unlink()  # its file not yet synced when the power went

    upgraded = Spool(tmp_path / "var")
    assert upgraded.restore_landed() == 1
    assert stored.path.read_bytes() == b"landed by version 4"
    assert upgraded.restore_landed() == 0
    assert _landing_seq(upgraded, "1.2.3.4.1") is None
    upgraded.close()


def test_a_journal_of_a_newer_node_is_refused_not_opened_and_downgraded(tmp_path):
    Spool(tmp_path / "var").close()
    newer = sqlite3.connect(tmp_path / "var" / "journal.sqlite")
    newer.execute(f"PRAGMA user_version={journal_module.SCHEMA_VERSION + 1}")
    newer.close()

    with pytest.raises(SpoolError, match="newer dicomnode"):
        Spool(tmp_path / "var")

    check = sqlite3.connect(tmp_path / "var" / "journal.sqlite")
    assert check.execute("PRAGMA user_version").fetchone()[0] == journal_module.SCHEMA_VERSION + 1


def test_a_restore_never_brings_back_a_study_purged_since(tmp_path, landing):
    _finish(landing, "1.2.9.1.1", "1.2.9.1", "done", ("sent",))
    receiving = _store(landing, "1.2.9.6.1", study="1.2.9.6")
    assert sorted(_landed(landing)) == ["1.2.9.1.1", "1.2.9.6.1"], "stored as bytes, they landed too"
    assert landing.purge_finished(time.time() + 1) == 1

    _dies(landing)
    restarted = Spool(tmp_path / "var")
    assert restarted.restore_landed() == 1

    assert receiving.path.read_bytes() == b"instance 1.2.9.6.1"
    assert not (restarted.instances_dir / "1.2.9.1").exists()
    restarted.close()


def _settle_failing_once(spool: Spool, monkeypatch) -> None:
    """A settling whose file-system sync fails (EIO), the next ones succeeding."""
    failing = [OSError(5, "Input/output error")]

    def sync(folder: int) -> None:
        if failing:
            raise failing.pop()

    monkeypatch.setattr(instances, "sync_file_system", sync)
    with pytest.raises(OSError):
        spool.settle_landed()
    assert spool._suspect_log


def test_after_a_failed_sync_the_files_it_was_to_settle_are_written_again_not_trusted_to_a_later_one(
    landing, monkeypatch
):
    stored = _land(landing, "1.2.3.4.5", b"slice bytes")
    _settle_failing_once(landing, monkeypatch)
    # The kernel dropped the page it could not write; it reports that once, to the sync above.
    stored.path.write_bytes(b"lost")

    landing.settle_landed()

    assert stored.path.read_bytes() == b"slice bytes"
    assert not landing._suspect_log


def test_a_file_written_again_after_a_failed_sync_never_overwrites_a_resend_stored_meanwhile(
    landing, monkeypatch
):
    stored = _land(landing, "1.2.3.4.5", b"first version")
    _settle_failing_once(landing, monkeypatch)
    # A changed resend, synced in full (nothing lands while the log is suspect), before the rewrite.
    _store(landing, "1.2.3.4.5", content=_received(landing, b"second version"))

    landing.settle_landed()

    assert stored.path.read_bytes() == b"second version"


def test_landing_writes_no_instance_bytes_into_the_journal(landing):
    """The bytes go into the landing log only: the journal's WAL gets the rows' pages, as many
    for a 40 KiB slice as for a byte."""
    db = landing._db()

    def frames_for(data: bytes, first: int) -> int:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for number in range(first, first + 20):
            _land(landing, f"1.2.3.4.{number}", data)
        return db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]

    small = frames_for(b"x", 0)
    large = frames_for(bytes(range(256)) * 160, 100)  # 40 KiB: ten pages each, were they journaled

    assert large <= small + 10, f"20 landed slices of 40 KiB wrote {large} WAL pages, of 1 byte {small}"
