"""Receiving in several processes (`scp.receivers`): one port, one state folder, nothing lost.

Real peers: DCMTK's storescu over many associations, and pynetdicom's SCU where the test must
know exactly which instances were acknowledged. The receivers are real processes, started as
`serve` starts them; one is killed with SIGKILL while it receives.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomnode.bench.receive import make_instances
from dicomnode.config import ScpConfig, ScpTlsConfig
from dicomnode.net.receivers import Receivers, ReceiverSetup
from dicomnode.net.scp import start_scp
from dicomnode.net.tls import server_context
from dicomnode.spool import Spool
from tests.conftest import free_port, stop_process, wait_until
from tests.pki import make_pki

CT = Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture
def records(caplog) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="dicomnode")
    return caplog


@contextmanager
def receiving(state: Path, receivers: int, **settings) -> Iterator[tuple[int, Receivers, Spool, Counter]]:
    """The node's SCP in this process and `receivers - 1` receiving processes, as `serve` runs
    them; yields the port, the receivers, the spool and the counts the receivers reported."""
    port = free_port()
    scp = ScpConfig(host="127.0.0.1", port=port, min_free_mb=0, receivers=receivers, **settings)
    spool = Spool(state, min_free_bytes=0)
    counts: Counter = Counter()
    others = Receivers(
        ReceiverSetup(scp, state),
        receivers - 1,
        lambda family, outcome, times: counts.update({outcome: times}),
    )
    server = start_scp(spool, scp, scp.tls and server_context(scp.tls, "scp.tls"), share=others.share)
    try:
        others.start()
        yield port, others, spool, counts
    finally:
        server.shutdown()
        others.stop()
        server.server_close()
        spool.close()


def storescu(port: int, paths: list[Path], associations: int, *options: str) -> None:
    """DCMTK's storescu, `associations` of them at once, each sending its share of `paths`."""
    senders = [
        subprocess.Popen(
            [
                "storescu",
                *options,
                "-aec",
                "DICOMNODE",
                "127.0.0.1",
                str(port),
                *map(str, paths[i::associations]),
            ],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(associations)
    ]
    for sender in senders:
        _, errors = sender.communicate(timeout=120)
        assert sender.returncode == 0, errors


def journal_rows(spool: Spool) -> dict[str, Path]:
    return {
        row["sop_instance_uid"]: Path(row["path"])
        for row in spool._db().execute("SELECT sop_instance_uid, path FROM instances")
    }


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def digest(path: Path) -> str:
    """The pixel data's: the node writes its own file meta, and the sender may have sent the
    data set in another transfer syntax than the file's."""
    return hashlib.sha256(pydicom.dcmread(path).PixelData).hexdigest()


def test_every_instance_sent_over_many_associations_is_stored_whichever_process_took_it(tmp_path, records):
    (tmp_path / "in").mkdir()
    paths = make_instances(CT, 60, tmp_path / "in")
    with receiving(tmp_path / "state", receivers=3, max_associations=16) as (port, _, spool, counts):
        storescu(port, paths, associations=12)
        rows = journal_rows(spool)

        def released(by_receivers: bool) -> int:
            return sum(
                r.getMessage().startswith("association released")
                for r in records.records
                if not by_receivers or r.processName != "MainProcess"
            )

        # The receivers' records come over a queue, their counts twice a second.
        wait_until(
            lambda: released(False) == 12 and counts["released"] == released(True),
            timeout=10,
            what="every association's audit line and the receivers' counts",
        )
    assert set(rows) == {uid_of(p) for p in paths}
    assert stat.S_IMODE((tmp_path / "state" / "associations.lock").stat().st_mode) == 0o600
    sent = {uid_of(p): digest(p) for p in paths}
    assert {uid: digest(path) for uid, path in rows.items()} == sent  # each row's file holds it
    accepted = [r for r in records.records if r.getMessage().startswith("association accepted")]
    assert len(accepted) == 12
    # The twelve went to more than one process (net.balance), and each receiver's audit lines
    # reached this process's handlers, marked with its name.
    assert len({r.processName for r in accepted}) >= 2
    assert {r.processName for r in accepted} <= {"MainProcess", "receiver-1", "receiver-2"}
    stored_by_receivers = sum(
        int(re.search(r"stored=(\d+)", r.getMessage())[1])
        for r in records.records
        if r.getMessage().startswith("association released") and r.processName != "MainProcess"
    )
    assert counts["stored"] == stored_by_receivers  # C-STORE responses the receivers counted


def test_connections_go_to_the_process_with_the_fewest_associations_open(tmp_path):
    """Twelve associations opened one after another and held, over four processes: three each
    (the kernel's SO_REUSEPORT hash spread them that evenly in about 2% of tries). The node's
    own process, which also runs the pipeline, takes one only when every receiver has more.
    Each count falls back to nought as they end."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    with receiving(tmp_path / "state", receivers=4, max_associations=16) as (port, others, _, _):
        held = []
        for number in range(12):
            assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
            assert assoc.is_established
            held.append(assoc)
            if number == 2:
                assert others.share.open[:] == [0, 1, 1, 1], "the first three to the receivers"
        opened = others.share.open[:]
        assert sum(opened) == 12 and max(opened) - min(opened) <= 1, opened
        for assoc in held:
            assoc.release()
        wait_until(lambda: others.share.open[:] == [0, 0, 0, 0], timeout=10, what="every count back to 0")


def test_receivers_speak_dicom_tls_with_the_configured_certificates(tmp_path, records, tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    tls = ScpTlsConfig(
        certificate=pki.server.certificate,
        private_key=pki.server.private_key,
        ca_certificates=pki.ca.certificate,
    )
    (tmp_path / "in").mkdir()
    paths = make_instances(CT, 24, tmp_path / "in")
    client = pki.client
    client_tls = ("+tls", str(client.private_key), str(client.certificate), "+cf", str(pki.ca.certificate))
    with receiving(tmp_path / "state", receivers=3, max_associations=16, tls=tls) as (port, others, spool, _):
        storescu(port, paths, 12, *client_tls)
        # A connection whose handshake fails has no association: its count is given back too.
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as plain:
                plain.sendall(b"A-ASSOCIATE-RQ in plain TCP\r\n" * 8)
                plain.settimeout(10)
                assert plain.recv(4096) == b""  # closed by the node: nothing but TLS here
        wait_until(lambda: others.share.open[:] == [0, 0, 0], timeout=10, what="every count back to 0")
        rows = journal_rows(spool)
        accepted = wait_until(
            lambda: (
                (found := [r for r in records.records if r.getMessage().startswith("association accepted")])
                and len(found) == 12
                and found
            ),
            timeout=10,
            what="twelve audit lines",
        )
    assert set(rows) == {uid_of(p) for p in paths}
    for record in accepted:
        assert re.search(r"tls=TLSv1\.[23] client_certificate=pacs-client$", record.getMessage())
    assert {r.processName for r in accepted} - {"MainProcess"}, "no receiver took an association"


def send_until_done(
    port: int, paths: list[Path], acknowledged: dict[str, str], stop: threading.Event, each: int = 10
) -> None:
    """Send `paths` with pynetdicom, `each` per association, one association after another, until
    each was acknowledged (status 0x0000, recorded in `acknowledged`) or `stop` is set; a broken
    association is followed by a new one. Many associations: each goes to one of the receiving
    processes with the fewest open (net.balance), so the processes take turns."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    pending = list(paths)
    while pending and not stop.is_set():
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        if not assoc.is_established:
            time.sleep(0.1)
            continue
        for _ in range(each):
            if not (pending and assoc.is_established):
                break
            ds = pydicom.dcmread(pending[0])
            try:
                status = assoc.send_c_store(ds)
            except (RuntimeError, OSError):  # the association broke down meanwhile
                break
            if status and status.Status == 0x0000:
                acknowledged[str(ds.SOPInstanceUID)] = digest(pending.pop(0))
        if assoc.is_established:
            assoc.release()


def test_a_receiver_killed_while_receiving_loses_no_acknowledged_instance_and_is_started_again(
    tmp_path, records
):
    (tmp_path / "in").mkdir()
    paths = make_instances(CT, 240, tmp_path / "in")
    acknowledged: dict[str, str] = {}
    stop = threading.Event()
    with receiving(tmp_path / "state", receivers=2) as (port, others, spool, counts):
        victim = others.pids[0]
        senders = [
            threading.Thread(target=send_until_done, args=(port, paths[i::4], acknowledged, stop))
            for i in range(4)
        ]
        for sender in senders:
            sender.start()
        # Kill it while it receives: once it has stored something (its counts come every 0.5 s).
        wait_until(lambda: counts["stored"] > 0, timeout=60, what="the receiver storing")
        os.kill(victim, 9)
        wait_until(lambda: others.pids[0] != victim, timeout=30, what="the receiver started again")
        for sender in senders:
            sender.join(timeout=180)
        stop.set()
        rows = journal_rows(spool)
        # The killed process's associations are not counted against its successor.
        wait_until(lambda: others.share.open[:] == [0, 0], timeout=10, what="every count back to 0")
    assert len(acknowledged) == len(paths)  # every instance went in, some on a second try
    for uid, sent in acknowledged.items():
        assert uid in rows, "an acknowledged instance has no journal row"
        assert digest(rows[uid]) == sent, "an acknowledged instance's file differs from what was sent"
    restarted = [r.getMessage() for r in records.records if "starting it again" in r.getMessage()]
    assert restarted == [f"receiver 1 (pid {victim}) ended with exit code -9; starting it again"]


def hold_study(state: Path, study: str, held, release) -> None:
    """In another process: hold `study` as a purge does, until told to let go."""
    spool = Spool.open_existing(state, read_only=False)
    with spool._study_locked(study, exclusive=True):
        held.set()
        release.wait(30)


def test_a_store_waits_while_another_process_holds_its_study_for_a_purge(tmp_path):
    spool = Spool(tmp_path / "state", min_free_bytes=0)
    (tmp_path / "in").mkdir()
    path = make_instances(CT, 1, tmp_path / "in")[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    context = multiprocessing.get_context("spawn")
    held, release = context.Event(), context.Event()
    purger = context.Process(target=hold_study, args=(tmp_path / "state", ds.StudyInstanceUID, held, release))
    purger.start()
    try:
        assert held.wait(30)
        store = threading.Thread(
            target=spool.store,
            args=(path,),
            kwargs={
                "sop_instance_uid": ds.SOPInstanceUID,
                "sop_class_uid": ds.SOPClassUID,
                "study_instance_uid": ds.StudyInstanceUID,
                "series_instance_uid": ds.SeriesInstanceUID,
                "calling_ae": "PACS",
            },
        )
        store.start()
        store.join(0.5)
        assert store.is_alive(), "the store went into a study another process holds for a purge"
        assert journal_rows(spool) == {}
        release.set()
        store.join(10)
        assert not store.is_alive()
        assert set(journal_rows(spool)) == {ds.SOPInstanceUID}
    finally:
        release.set()
        purger.join(10)
        spool.close()


def associate(port: int):
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="DICOMNODE")


def test_the_association_limit_holds_for_all_receiving_processes_together(tmp_path, records):
    with receiving(tmp_path / "state", receivers=3, max_associations=2) as (port, *_):
        held = [associate(port) for _ in range(2)]
        assert all(a.is_established for a in held)
        # Each process alone has room; the kernel spreads these over all three.
        refused = [associate(port) for _ in range(8)]
        assert not any(a.is_established for a in refused)
        assert all(a.is_rejected for a in refused)
        held[0].release()
        # The slot comes back when the association's thread ends.
        again = wait_until(
            lambda: (a := associate(port)).is_established and a, timeout=10, what="a free slot"
        )
        again.release()
        held[1].release()
    reasons = [
        r.getMessage().split(": ", 1)[1]
        for r in records.records
        if r.getMessage().startswith("association rejected")
    ]
    assert reasons[:8] == ["association limit of 2 reached"] * 8


def test_receivers_do_not_start_on_a_port_another_process_listens_on(tmp_path):
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # would share it silently
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        scp = ScpConfig(host="127.0.0.1", port=port, receivers=2)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            Receivers(ReceiverSetup(scp, tmp_path), 1)


def test_receivers_of_a_node_killed_while_they_start_exit_and_free_the_port(node_factory):
    """The node is killed the moment its port listens, about a second before its receivers
    have imported what they need: they must still see that their node is gone (they once took
    init for it and held the port for ever, and the node started again could not listen)."""
    node = node_factory(scp={"receivers": 3})
    spawned = wait_until(lambda: _receivers_of(node.process.pid), timeout=30, interval=0.005, what="spawned")
    node.process.kill()
    node.process.wait()
    assert "receiving processes beside the node's own" not in node.log.read_text(), "started too late"

    wait_until(lambda: not any(map(running, spawned)), timeout=15, what="receivers gone")
    assert port_free(node.port)


def test_a_stop_while_the_receivers_start_waits_for_the_start_and_stops_cleanly(node_factory):
    """systemd stops a service that is still starting with SIGTERM: the node must not die of it
    midway (receivers half started, the landing log held), but finish starting and stop."""
    node = node_factory(scp={"receivers": 3})
    wait_until(lambda: _receivers_of(node.process.pid), timeout=30, interval=0.005, what="spawned")
    node.process.send_signal(signal.SIGTERM)

    assert node.process.wait(timeout=60) == 0, node.log.read_text()
    said = node.log.read_text()
    assert "2 receiving processes beside the node's own" in said and "dicomnode stopped" in said


def _receivers_of(pid: int) -> list[int]:
    """The receiving processes the node `pid` started: its children by multiprocessing's spawn."""
    found = []
    for process in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((process / "stat").read_text().rpartition(")")[2].split()[1])
            spawned = parent == pid and b"spawn_main" in (process / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        if spawned:
            found.append(int(process.name))
    return found


def port_free(port: int) -> bool:
    """Whether a socket can listen on `port` (a listening socket holds it, with or without
    SO_REUSEPORT)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_a_receiver_that_cannot_start_fails_the_start_and_says_why(tmp_path, records):
    scp = ScpConfig(host="127.0.0.1", port=free_port(), min_free_mb=0, receivers=2)
    others = Receivers(ReceiverSetup(scp, tmp_path / "no-node-ran-here"), 1)
    with pytest.raises(OSError, match=r"receiver 1 did not start \(exit code 1\)"):
        others.start()
    assert port_free(scp.port), "the node's socket outlived a failed start"
    said = [r.getMessage() for r in records.records if r.processName == "receiver-1"]
    assert any("receiver 1 cannot start: SpoolError: no journal at" in line for line in said), said


def running(pid: int) -> bool:
    """Whether the process runs (a zombie waiting for its parent to reap it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_serve_with_receivers_counts_their_stores_and_stops_them_with_the_service(node_factory, tmp_path):
    node = node_factory(scp={"receivers": 3})
    log = wait_until(
        lambda: (
            (
                m := re.search(
                    r"2 receiving processes beside the node's own: \[(\d+), (\d+)\]", node.log.read_text()
                )
            )
            and m
        ),
        timeout=60,
        what="the receivers",
    )
    children = [int(pid) for pid in log.groups()]
    (tmp_path / "in").mkdir()
    paths = make_instances(CT, 24, tmp_path / "in")
    storescu(node.port, paths, associations=8)

    def stored() -> float:
        metrics = requests.get(f"{node.metrics_url}/metrics", timeout=10).text
        found = re.search(r'^dicomnode_instances_total\{outcome="stored"\} (\S+)$', metrics, re.M)
        return float(found[1]) if found else 0.0

    assert wait_until(lambda: stored() == 24, timeout=10, what="24 stores counted")
    audit = (tmp_path / "var" / "logs" / "audit.log").read_text()
    assert audit.count("association accepted") == 8
    stop_process(node.process)
    assert node.process.returncode == 0
    for pid in children:
        assert not running(pid), "a receiver outlived the node"


def test_receivers_exit_and_free_the_port_when_the_node_is_killed(node_factory):
    node = node_factory(scp={"receivers": 3})
    found = wait_until(
        lambda: re.search(
            r"2 receiving processes beside the node's own: \[(\d+), (\d+)\]", node.log.read_text()
        ),
        timeout=60,
        what="the receivers",
    )
    children = [int(pid) for pid in found.groups()]
    node.process.kill()
    node.process.wait()
    # A receiver of no node would keep taking associations no node processes.
    wait_until(lambda: not any(map(running, children)), timeout=10, what="receivers gone")
    assert port_free(node.port)
