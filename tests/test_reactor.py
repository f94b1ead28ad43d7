"""The SCP's event-driven associations (net/reactor.py): nothing sleeps while instances flow, and
every way an association ends still ends it, its threads and its wake-up pipe.

Real peers: DCMTK's storescu (plain and +tls) and pynetdicom's SCU for an abort and a silence.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomnode.bench.receive import make_instances
from dicomnode.net import reactor, scp
from tests.conftest import dcmtk, wait_until
from tests.test_access import pki, require_clients, stored_files  # noqa: F401 (pki: a fixture)
from tests.test_access import scp as running_scp


def _acceptor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, Association) and t.is_acceptor]


def _open_descriptors() -> int:
    """Sockets and pipes this process holds open (the journal's files stay open, and may open late)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
    return sum(link.startswith(("socket:", "pipe:")) for link in links)


def _instances(tmp_path: Path, count: int) -> list[Path]:
    (tmp_path / "sent").mkdir()
    return make_instances(Path(get_testdata_file("CT_small.dcm")), count, tmp_path / "sent")


def _storescu(port: int, paths: list[Path], *options: str):
    done = dcmtk("storescu", "-aec", "DICOMNODE", *options, "127.0.0.1", str(port), *map(str, paths))
    assert done.returncode == 0, done.stderr
    return done


def _ended_cleanly(descriptors_before: int) -> None:
    wait_until(lambda: not _acceptor_threads(), 30, what="association threads ended")
    wait_until(lambda: _open_descriptors() <= descriptors_before, 30, what="sockets and pipes closed")


def test_fifty_instances_over_one_association_are_stored_without_any_thread_sleeping(tmp_path, monkeypatch):
    sent = _instances(tmp_path, 50)
    naps: list[str] = []
    sleep = time.sleep

    def recorded_sleep(seconds: float) -> None:
        if threading.current_thread() is not threading.main_thread():
            naps.append(f"{threading.current_thread().name} slept {seconds}")
        sleep(seconds)

    with running_scp(tmp_path) as port:
        before = _open_descriptors()
        monkeypatch.setattr(time, "sleep", recorded_sleep)
        _storescu(port, sent)
        _ended_cleanly(before)
        monkeypatch.undo()

    assert len(stored_files(tmp_path)) == 50
    assert naps == []


def test_an_association_the_sender_aborts_ends_with_its_threads_and_pipe(tmp_path):
    with running_scp(tmp_path) as port:
        before = _open_descriptors()
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert assoc.is_established
        assert assoc.send_c_store(Path(get_testdata_file("CT_small.dcm"))).Status == 0x0000

        assoc.abort()

        _ended_cleanly(before)
    assert len(stored_files(tmp_path)) == 1


def test_a_silent_association_is_ended_by_the_network_timeout(tmp_path):
    with running_scp(tmp_path, network_timeout_s=1.0) as port:
        before = _open_descriptors()
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert assoc.is_established

        wait_until(lambda: not assoc.is_established, 30, what="the node ended the silent association")

        assert assoc.is_aborted
        _ended_cleanly(before)


def test_many_instances_over_one_tls_association_are_all_stored(tmp_path, pki):  # noqa: F811
    client = pki.client
    sent = _instances(tmp_path, 30)
    with running_scp(tmp_path, tls=require_clients(pki)) as port:
        before = _open_descriptors()
        tls = ("+tls", str(client.private_key), str(client.certificate), "+cf", str(pki.ca.certificate))
        _storescu(port, sent, *tls)
        _ended_cleanly(before)
    assert len(stored_files(tmp_path)) == 30


@pytest.fixture
def created(monkeypatch) -> list[Association]:
    """The associations the SCP creates, as it creates them."""
    associations: list[Association] = []

    def recorded(handler):
        associations.append(reactor.acceptor_association(handler))
        return associations[-1]

    monkeypatch.setattr(scp, "acceptor_association", recorded)
    return associations


def test_associations_share_the_servers_presentation_contexts_and_leave_them_unchanged(tmp_path, created):
    sent = _instances(tmp_path, 2)
    with running_scp(tmp_path) as port:
        _storescu(port, sent[:1])
        _storescu(port, sent[1:])
    first, second = created
    contexts = first._server.contexts
    assert all(a is b for a, b in zip(first.acceptor.supported_contexts, contexts, strict=True))
    assert all(a is b for a, b in zip(second.acceptor.supported_contexts, contexts, strict=True))
    assert isinstance(first, reactor.EventDrivenAssociation)
    # As start_scp made them: negotiation gave none an ID or dropped a transfer syntax.
    assert all(cx.context_id is None for cx in contexts)
    storage = [cx for cx in contexts if cx.abstract_syntax != Verification]
    assert storage and all(cx.transfer_syntax == ALL_TRANSFER_SYNTAXES for cx in storage)
    assert len(stored_files(tmp_path)) == 2


def test_on_a_pynetdicom_version_not_checked_the_stock_association_serves(tmp_path, created, monkeypatch):
    monkeypatch.setattr(reactor, "CHECKED_VERSIONS", frozenset())
    sent = _instances(tmp_path, 3)
    with running_scp(tmp_path) as port:
        _storescu(port, sent)
    assert [type(assoc) for assoc in created] == [Association]
    assert len(stored_files(tmp_path)) == 3
