"""SIGKILL of the node while it receives, processes and delivers, then a restart: nothing lost.

One node, one Orthanc as the PACS. Round after round a study is sent by the node's own SCU
(as a modality's sender would: each instance until it is acknowledged) and the node is killed
at a seeded random moment: during the transfer, once the study is quiet and being processed,
or while results are delivered. After each kill every acknowledged instance must be in the
spool; the node restarts and the sender resends what was not acknowledged. At the end every
study's report is in Orthanc once: the latest version references exactly the instances sent.
A study whose instances were all acknowledged before the kill has one version: processed again
from the same inputs, it gets the same UIDs. Only a study processed before a resend completed
it (its inputs changed) may have an earlier version, of part of its instances, named as the
predecessor of the next, never a duplicate standing beside it.
"""

from __future__ import annotations

import io
import random
import sqlite3
import threading
import time
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest

from dicomnode.net.scu import Peer, store
from tests.conftest import free_port, start_node, start_orthanc, stop_process, wait_until, write_node_config
from tests.reliability.conftest import SentStudy, assert_no_leak, node_texts, write_study

KILLS = 21
SEED = 16
QUIET_PERIOD_S = 0.5
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

#: When, after a study's transfer starts, each kind of round kills the node (seconds).
MOMENTS = {
    "receive": (0.0, 0.15),
    "processing": (QUIET_PERIOD_S, QUIET_PERIOD_S + 1.0),
    "delivery": (QUIET_PERIOD_S + 0.8, QUIET_PERIOD_S + 3.0),
}


def _spooled(state: Path) -> dict[str, Path]:
    """SOP Instance UID -> file, as the journal has it (read as the restarted node would)."""
    with sqlite3.connect(state / "journal.sqlite", timeout=30) as db:
        return {sop: Path(path) for sop, path in db.execute("SELECT sop_instance_uid, path FROM instances")}


def _work_in_hand(state: Path) -> tuple[int, int]:
    """Studies in processing and deliveries pending, as a kill left them."""
    with sqlite3.connect(state / "journal.sqlite", timeout=30) as db:
        processing = db.execute("SELECT count(*) FROM studies WHERE state='processing'").fetchone()[0]
        pending = db.execute("SELECT count(*) FROM outbox WHERE state='pending'").fetchone()[0]
    return processing, pending


def _settled(state: Path, studies: int) -> bool:
    """True when the journal has every study done and every delivery sent."""
    with sqlite3.connect(state / "journal.sqlite", timeout=30) as db:
        done = db.execute("SELECT count(*) FROM studies WHERE state='done'").fetchone()[0]
        unsent = db.execute("SELECT count(*) FROM outbox WHERE state!='sent'").fetchone()[0]
    return done == studies and unsent == 0


def _send_until_acknowledged(peer: Peer, paths: list[Path], acked: set[str], sops: dict[Path, str]) -> None:
    """One association's worth of C-STOREs; the instances acknowledged join `acked`."""
    try:
        outcomes = store(peer, paths, calling_ae="MODALITY")
    except Exception:  # the node was killed before or while associating: nothing acknowledged
        return
    acked.update(sops[o.path] for o in outcomes if o.ok)


def _reports(orthanc) -> dict[str, list[pydicom.Dataset]]:
    """Orthanc's SRs by Study Instance UID."""
    found: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for instance in orthanc.instances():
        ds = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{instance}/file").content))
        if str(ds.SOPClassUID).startswith(SR_CLASS_PREFIX):
            found[str(ds.StudyInstanceUID)].append(ds)
    return found


def _referenced(sr: pydicom.Dataset) -> set[str]:
    return {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def _predecessors(sr: pydicom.Dataset) -> set[str]:
    return {
        ref.ReferencedSOPInstanceUID
        for study in sr.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def _check_reported_once(study: SentStudy, srs: list[pydicom.Dataset], *, complete_before_kill: bool) -> None:
    """The latest report covers the study; earlier versions are superseded, none duplicated.

    A study whose every instance was acknowledged before the kill has one report, version 1:
    processed again after the kill from the same inputs, it gets the same UIDs. Only a study
    that was processed before a resend completed it may have an earlier version, and that one
    references a part of the study only.
    """
    assert srs, "no report in Orthanc"
    if complete_before_kill:
        assert len(srs) == 1, f"{len(srs)} report versions of a study whose inputs did not change"
        assert not _predecessors(srs[0])
    superseded = set().union(*(_predecessors(sr) for sr in srs))
    latest = [sr for sr in srs if sr.SOPInstanceUID not in superseded]
    assert len(latest) == 1, f"{len(latest)} reports stand side by side"
    assert _referenced(latest[0]) == set(study.sop_instance_uids)
    contents = [frozenset(_referenced(sr)) for sr in srs]
    assert len(contents) == len(set(contents)), "two reports of the same content"
    sent = set(study.sop_instance_uids)
    assert all(content < sent for content in contents if content != sent), "an earlier version, not a part"


@pytest.mark.timeout(900)  # minutes on two busy cores: beyond the suite's 300 s
def test_sigkill_at_random_moments_loses_no_acknowledged_instance_and_reports_each_study_once(
    tmp_path, orthanc, tiny_architecture, tally
):
    rng = random.Random(SEED)
    port = free_port()
    config = write_node_config(
        tmp_path,
        tiny_architecture,
        scp_port=port,
        scp={"receivers": "auto"},  # as serve's default: receivers of a killed node outlive it a moment
        destinations=[orthanc.destination(backoff_s=0.2, max_backoff_s=1.0)],
        studies={"quiet_period_s": QUIET_PERIOD_S, "poll_interval_s": 0.1, "imaging_processes": 0},
    )
    state = tmp_path / "var"
    peer = Peer("127.0.0.1", port, "DICOMNODE", timeout_s=10)
    studies = [write_study(tmp_path / "sent", number, instances=4) for number in range(KILLS)]
    sops = {path: sop for s in studies for path, sop in zip(s.paths, s.sop_instance_uids, strict=True)}
    acked: set[str] = set()
    hit = {"receive": 0, "processing": 0, "delivery": 0}
    #: The studies some of whose instances the sender had to resend after the kill.
    resent: set[str] = set()
    node = start_node(config, port)
    try:
        for number, study in enumerate(studies):
            moment = list(MOMENTS)[number % len(MOMENTS)]
            with tally.case(f"kill during {moment}, round {number}"):
                sender = threading.Thread(
                    target=_send_until_acknowledged, args=(peer, list(study.paths), acked, sops)
                )
                sender.start()
                time.sleep(rng.uniform(*MOMENTS[moment]))
                node.process.kill()
                node.process.wait()
                sender.join()
                spooled = _spooled(state)
                processing, pending = _work_in_hand(state)
                if any(sop not in acked for sop in study.sop_instance_uids):
                    hit["receive"] += 1
                    resent.add(study.study_instance_uid)
                hit["processing"] += processing > 0
                hit["delivery"] += pending > 0
                missing = [sop for sop in acked if sop not in spooled or not spooled[sop].is_file()]
                tally.lost += len(missing)
                assert not missing, f"{len(missing)} acknowledged instances not in the spool after the kill"
                node = start_node(config, port)
                # The sender retries until every instance sent so far is acknowledged.
                for _ in range(5):
                    unacked = [p for s in studies[: number + 1] for p in s.paths if sops[p] not in acked]
                    if not unacked:
                        break
                    _send_until_acknowledged(peer, unacked, acked, sops)
                assert all(sops[p] in acked for s in studies[: number + 1] for p in s.paths)
        tally.acknowledged += len(acked)
        # The seeded moments must really have interrupted each stage, or the test proves little.
        assert all(hit.values()), hit

        with tally.case("every study reported in Orthanc after the kills"):
            wait_until(lambda: _settled(state, len(studies)), 240, 1.0, what="every study done and sent")
            reports = _reports(orthanc)
            versions = {moment: [] for moment in MOMENTS}
            for number, study in enumerate(studies):
                srs = reports[study.study_instance_uid]
                versions[list(MOMENTS)[number % len(MOMENTS)]].append(
                    (len(srs), study.study_instance_uid in resent)
                )
            print("report versions by kill moment (versions, resent):", versions)
            for study in studies:
                complete = study.study_instance_uid not in resent
                _check_reported_once(study, reports[study.study_instance_uid], complete_before_kill=complete)
            spooled = _spooled(state)
            assert set(sops.values()) <= set(spooled)
        with tally.case("no patient data in the node's texts after the kills"):
            assert_no_leak(node_texts(node), set().union(*(s.identifiers for s in studies)))
    finally:
        node.process.kill()
        node.process.wait()


def test_disk_below_its_floor_and_back_then_destination_down_and_back_lose_nothing(
    tmp_path, tiny_architecture, tally
):
    """Below the free-space floor the node refuses (0xA700) and keeps nothing; the sender
    retries once space is back; results wait in the outbox while the PACS is down, and reach
    it, once per study, when it is back."""
    port, pacs_port = free_port(), free_port()
    destination = {"name": "orthanc", "host": "127.0.0.1", "port": pacs_port, "ae_title": "ORTHANC"}
    settings = {
        "destinations": [{**destination, "backoff_s": 0.2, "max_backoff_s": 1.0}],
        "studies": {"quiet_period_s": QUIET_PERIOD_S, "poll_interval_s": 0.1, "imaging_processes": 0},
    }
    state = tmp_path / "var"
    peer = Peer("127.0.0.1", port, "DICOMNODE", timeout_s=10)
    studies = [write_study(tmp_path / "sent", number, instances=3) for number in (100, 101)]
    paths = [p for s in studies for p in s.paths]
    full = write_node_config(
        tmp_path, tiny_architecture, scp_port=port, scp={"min_free_mb": 1 << 40}, **settings
    )  # a floor no disk reaches
    node = start_node(full, port)
    pacs = None
    try:
        with tally.case("disk below its floor: every instance refused with 0xA700, none kept"):
            outcomes = store(peer, paths, calling_ae="MODALITY")
            assert [o.status for o in outcomes] == [0xA700] * len(paths)
            assert not _spooled(state)
        node.process.kill()
        node.process.wait()
        node = start_node(write_node_config(tmp_path, tiny_architecture, scp_port=port, **settings), port)
        with tally.case("disk back above its floor: the sender's retry is acknowledged"):
            outcomes = store(peer, paths, calling_ae="MODALITY")
            assert all(o.ok for o in outcomes)
            tally.acknowledged += len(outcomes)
        with tally.case("destination down: results wait in the outbox, retried"):

            def retried() -> bool:
                with sqlite3.connect(state / "journal.sqlite", timeout=30) as db:
                    return db.execute(
                        "SELECT count(*) FROM outbox WHERE state='pending' AND attempts >= 2"
                    ).fetchone()[0] == 2 * len(studies)

            wait_until(retried, 120, 0.5, what="deliveries retried while the PACS is down")
        pacs = start_orthanc(tmp_path / "orthanc", dicom_port=pacs_port)
        with tally.case("destination back: each study reported once, none lost"):
            wait_until(lambda: _settled(state, len(studies)), 120, 0.5, what="results delivered")
            reports = _reports(pacs)
            for study in studies:
                _check_reported_once(study, reports[study.study_instance_uid], complete_before_kill=True)
            missing = [p for p in paths if str(pydicom.dcmread(p).SOPInstanceUID) not in _spooled(state)]
            tally.lost += len(missing)
            assert not missing
            assert_no_leak(node_texts(node), set().union(*(s.identifiers for s in studies)))
    finally:
        node.process.kill()
        node.process.wait()
        if pacs is not None:
            stop_process(pacs.process)
