"""Delivery: real C-STOREs to a real Orthanc, retries with backoff, the dead letter.

Results are stood in for by pydicom's CT_small.dcm, copied into the spool's outbox folder and
queued the way the node queues them (finish_study). "Down" is a loopback port that nothing
listens on.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.config import DestinationConfig
from dicomnode.flow import Delivery
from dicomnode.net.scu import StoreOutcome
from dicomnode.outbox import DestinationWorker, retry_delay
from dicomnode.privacy import uid_tag
from dicomnode.spool import Spool
from tests.conftest import Orthanc, free_port, start_orthanc, stop_process, wait_for_port, wait_until

STUDY = "1.2.826.0.1.3680043.8.498.7"
CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
FAR_FUTURE = 1e12


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Iterator[Orthanc]:
    """One Orthanc for the module: each test sends instances of its own SOP Instance UID."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    stop_process(server.process)


@pytest.fixture
def spool(tmp_path) -> Iterator[Spool]:
    journal = Spool(tmp_path / "var")
    yield journal
    journal.close()


def _result(spool: Spool, name: str = "result.dcm") -> tuple[Path, str]:
    """A real CT file (pydicom's CT_small) with a fresh SOP Instance UID, in the outbox folder."""
    ds = pydicom.dcmread(CT_SMALL)
    uid = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = spool.outbox_dir / name
    ds.save_as(path, enforce_file_format=True)
    return path, uid


def _queue(spool: Spool, deliveries: list[tuple[str, Path]]) -> None:
    """Queue result files as a finished study does: one transaction with the study's outcome."""
    spool.store(
        b"source instance",
        sop_instance_uid=generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=STUDY,
        series_instance_uid="1.2.3.5",
        calling_ae="MODALITY",
    )
    study = spool.claim_quiet_study(0.0, now=time.time() + 1)
    assert spool.finish_study(study, state="done", deliveries=deliveries)


def _down(name: str = "down", **fields) -> DestinationConfig:
    """A destination on a loopback port that refuses connections."""
    settings = {"backoff_s": 5.0, "max_backoff_s": 600.0, "max_attempts": 3, "timeout_s": 5.0} | fields
    return DestinationConfig(name=name, host="127.0.0.1", port=free_port(), ae_title="DOWN", **settings)


def _orthanc(pacs: Orthanc, name: str = "orthanc", **fields) -> DestinationConfig:
    return DestinationConfig(**pacs.destination(name=name, timeout_s=10.0, **fields))


def _worker(spool: Spool, destination: DestinationConfig, stop: threading.Event | None = None):
    return DestinationWorker(spool, destination, calling_ae="DICOMNODE", stop=stop or threading.Event())


def _due(spool: Spool, destination: str) -> Delivery:
    delivery = spool.next_delivery(destination, now=FAR_FUTURE)
    assert delivery is not None
    return delivery


def _row(spool: Spool, delivery: Delivery) -> sqlite3.Row:
    """The delivery's row as the journal holds it, read through a connection of its own."""
    with closing(sqlite3.connect(spool.state_dir / "journal.sqlite")) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM outbox WHERE id=?", (delivery.id,)).fetchone()


def _orthanc_ids(pacs: Orthanc, sop_instance_uid: str) -> list[str]:
    """Orthanc's ids of the instances with this SOP Instance UID, asked through its REST API."""
    response = requests.post(
        pacs.url + "/tools/find",
        json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()


def test_retry_delay_doubles_from_backoff_and_is_capped():
    destination = DestinationConfig(
        name="pacs", host="127.0.0.1", port=104, ae_title="PACS", backoff_s=5.0, max_backoff_s=60.0
    )

    delays = [retry_delay(destination, attempts) for attempts in range(1, 8)]

    assert delays == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    assert retry_delay(destination, 0) == 5.0
    assert retry_delay(destination, 5000) == 60.0, "no float overflow however many attempts"


def test_deliver_sends_the_file_to_orthanc_and_marks_it_sent(pacs, spool):
    path, uid = _result(spool)
    _queue(spool, [("orthanc", path)])

    assert _worker(spool, _orthanc(pacs)).deliver(spool.next_delivery("orthanc")) is True

    ids = _orthanc_ids(pacs, uid)
    assert len(ids) == 1
    received = pydicom.dcmread(BytesIO(pacs.get(f"/instances/{ids[0]}/file").content))
    sent = pydicom.dcmread(path)
    assert received.SOPClassUID == sent.SOPClassUID
    assert received.PixelData == sent.PixelData
    assert spool.counts()["outbox"] == {"orthanc:sent": 1}
    assert spool.next_delivery("orthanc", now=FAR_FUTURE) is None


def test_deliver_to_a_closed_port_records_the_failure_and_a_retry_time(spool):
    path, _ = _result(spool)
    _queue(spool, [("down", path)])
    destination = _down(backoff_s=5.0)
    delivery = spool.next_delivery("down")

    before = time.time()
    assert _worker(spool, destination).deliver(delivery) is False

    row = _row(spool, delivery)
    assert (row["state"], row["attempts"]) == ("pending", 1)
    assert f"DOWN@127.0.0.1:{destination.port}" in row["last_error"]
    assert before + 5.0 <= row["next_attempt_at"] <= time.time() + 5.0
    assert spool.next_delivery("down") is None, "not retried before its time"
    assert spool.next_delivery("down", now=row["next_attempt_at"]).attempts == 1


def test_after_max_attempts_a_delivery_goes_to_the_dead_letter(spool):
    path, _ = _result(spool)
    _queue(spool, [("down", path)])
    worker = _worker(spool, _down(max_attempts=3, backoff_s=5.0))
    waits = []

    for _ in range(3):
        delivery = _due(spool, "down")
        started = time.time()
        assert worker.deliver(delivery) is False
        waits.append(_row(spool, delivery)["next_attempt_at"] - started)

    row = _row(spool, delivery)
    assert (row["state"], row["attempts"]) == ("dead", 3)
    assert waits[0] == pytest.approx(5.0, abs=1.0) and waits[1] == pytest.approx(10.0, abs=1.0)
    assert spool.next_delivery("down", now=FAR_FUTURE) is None, "the dead letter is not retried"
    assert spool.counts()["outbox"] == {"down:dead": 1}
    [(kind, tag, reason)] = spool.problems()
    assert (kind, tag) == ("dead letter to down", uid_tag(STUDY))
    assert "did not accept an association" in reason
    assert STUDY not in repr(spool.problems())


def test_a_missing_result_file_goes_to_the_dead_letter_at_once(spool):
    _queue(spool, [("pacs", spool.outbox_dir / "vanished.dcm")])
    delivery = spool.next_delivery("pacs")

    assert _worker(spool, _down("pacs", max_attempts=None)).deliver(delivery) is False

    assert (_row(spool, delivery)["state"], _row(spool, delivery)["attempts"]) == ("dead", 1)
    assert spool.problems() == [
        ("dead letter to pacs", uid_tag(STUDY), "refused by pacs: result file is missing")
    ]


def _write_meta_without_sop_class(path: Path) -> None:
    ds = Dataset()
    ds.PatientID = "ANON"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.preamble = b"\0" * 128
    ds.save_as(path, enforce_file_format=False)


@pytest.mark.parametrize(
    ("write", "error"),
    [
        (lambda path: path.write_bytes(b"not a DICOM file" * 16), "DICM"),
        (_write_meta_without_sop_class, "file meta lacks the SOP class"),
    ],
    ids=["no-dicm-prefix", "no-sop-class-in-meta"],
)
def test_a_result_file_that_is_not_sendable_dicom_is_a_dead_letter_not_a_crash(
    pacs, spool, write, error, caplog
):
    # Where the node writes a study's results: outbox/<StudyInstanceUID>/sr-<SOPInstanceUID>.dcm.
    path = spool.outbox_dir / STUDY / "sr-2.25.1234567.dcm"
    path.parent.mkdir()
    write(path)
    _queue(spool, [("orthanc", path)])
    delivery = spool.next_delivery("orthanc")

    assert _worker(spool, _orthanc(pacs)).deliver(delivery) is False

    row = _row(spool, delivery)
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert error in row["last_error"]
    assert "2.25.1234567" not in row["last_error"], "result paths are made of UIDs: never quoted"
    assert "dead letter: delivery 1 to orthanc" in caplog.text
    for uid in (STUDY, "2.25.1234567"):
        assert uid not in row["last_error"] and uid not in caplog.text, uid


def test_a_peer_that_rejects_the_called_ae_title_is_a_failed_delivery(pacs, spool):
    path, uid = _result(spool)
    _queue(spool, [("orthanc", path)])
    delivery = spool.next_delivery("orthanc")

    assert _worker(spool, _orthanc(pacs, ae_title="NOT_ORTHANC")).deliver(delivery) is False

    row = _row(spool, delivery)
    assert "rejected the association" in row["last_error"]
    assert row["state"] == "pending", "a misconfigured peer may be fixed: retried, not dropped"
    assert _orthanc_ids(pacs, uid) == []


def test_a_destination_that_is_down_does_not_hold_back_another(pacs, spool):
    path, uid = _result(spool)
    _queue(spool, [("down", path), ("orthanc", path)])
    stop = threading.Event()
    workers = [
        _worker(spool, _down(backoff_s=0.2, max_backoff_s=0.2, max_attempts=1000), stop),
        _worker(spool, _orthanc(pacs), stop),
    ]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: spool.counts()["outbox"].get("orthanc:sent"), timeout=30, what="delivery")
        wait_until(lambda: _due(spool, "down").attempts >= 2, timeout=30, what="retries to down")
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)

    assert not any(worker.is_alive() for worker in workers), "workers stop when asked"
    assert len(_orthanc_ids(pacs, uid)) == 1
    assert spool.counts()["outbox"]["down:pending"] == 1


def test_a_failing_delivery_does_not_hold_back_the_next_one_to_the_same_destination(pacs, spool):
    path, uid = _result(spool)
    _queue(spool, [("orthanc", spool.outbox_dir / "vanished.dcm"), ("orthanc", path)])
    stop = threading.Event()
    worker = _worker(spool, _orthanc(pacs, backoff_s=60.0), stop)
    worker.start()
    try:
        wait_until(lambda: _orthanc_ids(pacs, uid), timeout=30, what="the second delivery")
    finally:
        stop.set()
        worker.join(timeout=30)

    assert spool.counts()["outbox"] == {"orthanc:dead": 1, "orthanc:sent": 1}


def test_an_unreachable_destination_is_retried_for_its_whole_window_then_dead(spool):
    path, _ = _result(spool)
    _queue(spool, [("down", path)])
    worker = _worker(spool, _down(retry_for_hours=1.0, max_attempts=None, backoff_s=5.0, max_backoff_s=600))

    assert worker.deliver(_due(spool, "down")) is False
    first = _row(spool, _due(spool, "down"))
    assert (first["state"], first["first_failed_at"]) == ("pending", pytest.approx(time.time(), abs=5))

    # Late in the window: the retry waits for the window's end, not a whole backoff beyond it.
    with closing(sqlite3.connect(spool.journal_path)) as db, db:
        db.execute("UPDATE outbox SET first_failed_at=?, attempts=20", (time.time() - 3590,))
    worker.deliver(_due(spool, "down"))
    late = _row(spool, _due(spool, "down"))
    assert late["state"] == "pending"
    assert late["next_attempt_at"] == pytest.approx(late["first_failed_at"] + 3600, abs=1)

    with closing(sqlite3.connect(spool.journal_path)) as db, db:
        db.execute("UPDATE outbox SET first_failed_at=?", (time.time() - 3601,))
    delivery = _due(spool, "down")
    worker.deliver(delivery)
    row = _row(spool, delivery)
    assert (row["state"], row["attempts"]) == ("dead", 22)
    assert row["last_error"].startswith("unreachable for 1 h (22 attempts): ")

    assert spool.requeue_dead() == 1
    assert _row(spool, delivery)["first_failed_at"] is None, "a requeued delivery gets a fresh window"


def test_the_default_policy_retries_an_unreachable_destination_for_days():
    destination = DestinationConfig(name="pacs", host="pacs.example", port=104, ae_title="PACS")
    assert destination.retry_for_hours >= 48 and destination.max_attempts is None


def test_a_destination_down_for_a_while_gets_the_result_when_it_is_back(spool, tmp_path):
    path, uid = _result(spool)
    _queue(spool, [("late", path)])
    port = free_port()
    destination = DestinationConfig(
        name="late", host="127.0.0.1", port=port, ae_title="ORTHANC", backoff_s=0.2, max_backoff_s=0.5
    )
    stop = threading.Event()
    worker = _worker(spool, destination, stop)
    worker.start()
    server = None
    try:
        wait_until(lambda: _due(spool, "late").attempts >= 3, timeout=30, what="failed attempts")
        server = start_orthanc(tmp_path / "orthanc", dicom_port=port)
        wait_until(lambda: spool.counts()["outbox"].get("late:sent"), timeout=60, what="delivery")
        assert len(_orthanc_ids(server, uid)) == 1
    finally:
        stop.set()
        worker.join(timeout=30)
        if server is not None:
            stop_process(server.process)
    assert spool.counts()["outbox"] == {"late:sent": 1}


#: A storescp association profile that accepts MR images only: a CT result is refused.
MR_ONLY = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[MROnly]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = MRImageStorage\\Uncompressed
[[Profiles]]
[MROnly]
PresentationContexts = MROnly
"""


def test_a_destination_that_refuses_the_sop_class_is_a_dead_letter_at_once(spool, tmp_path):
    path, _ = _result(spool)
    _queue(spool, [("mr-only", path)])
    profile = tmp_path / "storescp.cfg"
    profile.write_text(MR_ONLY)
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    storescp = shutil.which("storescp")
    if storescp is None:
        pytest.fail("storescp is not installed (Debian package dcmtk); .ci/run installs it")
    process = subprocess.Popen([storescp, "-xf", str(profile), "MROnly", "-od", str(received), str(port)])
    try:
        wait_for_port(port, process=process)
        delivery = spool.next_delivery("mr-only")
        worker = _worker(
            spool, DestinationConfig(name="mr-only", host="127.0.0.1", port=port, ae_title="ANY")
        )

        assert worker.deliver(delivery) is False
    finally:
        stop_process(process)

    row = _row(spool, delivery)
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert row["last_error"].startswith("refused by mr-only: ")
    assert not list(received.iterdir())


@pytest.mark.parametrize(
    ("status", "refused"),
    [
        (0xA700, False),
        (0xA7FF, False),
        (0x0110, False),
        (0xA900, True),
        (0xC000, True),
        (0xC123, True),
        (0x0122, True),
        (0x0124, True),
        (0x0000, False),
        (0xB000, False),
    ],
)
def test_a_status_that_judges_the_object_is_a_refusal_and_out_of_resources_is_not(status, refused):
    assert StoreOutcome(Path("r.dcm"), status).refused is refused


def test_no_answer_is_not_a_refusal_but_a_rejected_presentation_context_is():
    assert not StoreOutcome(Path("r.dcm"), None, "no response (timeout or abort)").refused
    assert StoreOutcome(Path("r.dcm"), None, "no accepted context", context_rejected=True).refused


class _LateReactorCheckpoint(threading.Event):
    """pynetdicom's reactor pause, held open: each time the reactor passes it, the reactor
    dawdles before looking at the message queue, while it still reads as paused."""

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        time.sleep(0.1)
        return passed


def test_an_answer_that_arrives_while_pynetdicoms_reactor_looks_still_reaches_the_store(
    tmp_path, monkeypatch
):
    """pynetdicom's requestor reactor can pass its pause just before a send takes it for paused;
    an answer arriving then was dropped ("Received unexpected C-STORE service message") and the
    store waited out its timeout, losing its association (seen once in 1,500 stores under load).

    The race is made certain: the reactor dawdles 0.1 s past its pause, the store looks for its
    answer 0.3 s after sending it, and storescp answers at once. Every store must succeed.
    """
    from dicomnode.net import scu

    associate = scu._associate

    def racing(ae, peer, contexts=None):
        assoc = associate(ae, peer, contexts)
        assoc._reactor_checkpoint = _LateReactorCheckpoint()
        assoc._reactor_checkpoint.set()
        send = assoc.dimse.send_msg

        def send_then_dawdle(*args, **kwargs):
            send(*args, **kwargs)
            time.sleep(0.3)

        assoc.dimse.send_msg = send_then_dawdle
        return assoc

    monkeypatch.setattr(scu, "_associate", racing)
    storescp = shutil.which("storescp")
    if storescp is None:
        pytest.fail("storescp is not installed (Debian package dcmtk); .ci/run installs it")
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    process = subprocess.Popen([storescp, "-od", str(received), str(port)])
    try:
        wait_for_port(port, process=process)
        peer = scu.Peer("127.0.0.1", port, "STORESCP", timeout_s=3.0)
        outcomes = scu.store(peer, [CT_SMALL] * 4)
    finally:
        stop_process(process)

    assert [(o.status, o.comment) for o in outcomes] == [(0, "")] * 4
