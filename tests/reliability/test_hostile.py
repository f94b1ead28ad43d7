"""Hostile input over the network: malformed files, a fuzzed corpus, malformed associations.

One node serves the whole module, as it would serve a hostile network: every malformed file
of pydicom's test data and datasets mutated by hypothesis (wrong lengths, bad VRs, truncated
pixel data, absurd Rows/Columns, huge NumberOfFrames, broken sequences) are sent to it byte
for byte, as a broken modality would send them. Each must get a DIMSE status (a failure, or
success for what can be stored and is later ignored or failed with a reason) or a refused
presentation context; the node must stay up, its memory bounded, its texts free of the names,
IDs and UIDs sent. Then associations that break the rules: wrong called AE, unknown caller,
a PDU larger than negotiated, aborts in the middle of a dataset, idle connections.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import sqlite3
import struct
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_files
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from dicomnode.bench.receive import write_large_instance
from dicomnode.net.scu import AssociationFailed, Peer, store
from dicomnode.spool import is_valid_uid
from tests.conftest import RunningNode, free_port, start_node, stop_process, wait_until, write_node_config
from tests.reliability.conftest import assert_no_leak, identifiers_of, node_texts, peak_rss_mib, write_study

#: Peak resident memory the node may reach over the whole module (the tiny backbone, torch,
#: two imaging processes are separate): a 65535 x 65535 image decoded would need 8 GiB.
MAX_PEAK_RSS_MIB = 1536
TIMEOUT_S = 2.0
CALLER = "FUZZER"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_architecture) -> Iterator[tuple[RunningNode, Path]]:
    """A node with short timeouts and an allowlist of callers; and a folder for what is sent."""
    folder = tmp_path_factory.mktemp("hostile")
    port = free_port()
    config = write_node_config(
        folder,
        tiny_architecture,
        scp_port=port,
        scp={
            "allowed_calling_aes": [CALLER],
            "acse_timeout_s": TIMEOUT_S,
            "dimse_timeout_s": TIMEOUT_S,
            "network_timeout_s": TIMEOUT_S,
        },
        studies={"quiet_period_s": 0.3, "poll_interval_s": 0.1, "retry_backoff_s": 0.5, "max_attempts": 2},
    )
    node = start_node(config, port)
    yield node, folder / "sent"
    stop_process(node.process)


def _peer(node: RunningNode, called: str = "DICOMNODE") -> Peer:
    return Peer("127.0.0.1", node.port, called, timeout_s=10)


def _alive(node: RunningNode) -> None:
    assert node.process.poll() is None, f"the node died:\n{node.log.read_text()[-3000:]}"
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established, "the node no longer accepts an association"
    assoc.release()


def _uid_or_new(value) -> str:
    value = str(value or "").strip()
    return value if is_valid_uid(value) else generate_uid()


def as_sent(body: bytes, sop_class: str, transfer_syntax: str, sop_instance: str, path: Path) -> Path:
    """A file whose dataset is `body` byte for byte, behind a file meta the sender can use.

    pynetdicom sends a file's dataset as it is on disk, from after its file meta, without
    decoding it: the meta only names the presentation context and the SOP instance.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _uid_or_new(sop_class)
    meta.MediaStorageSOPInstanceUID = _uid_or_new(sop_instance)
    meta.TransferSyntaxUID = transfer_syntax if is_valid_uid(str(transfer_syntax)) else ImplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=True)
        out.write(body)
    return path


def sendable(source: Path, folder: Path) -> Path:
    """The dataset of any file (with or without a usable file meta) ready for the raw sender.

    What the file meta lacks is taken from the dataset as pydicom reads it by force (its SOP
    class and instance, and its encoding as the transfer syntax), as a sender would know them.
    """
    meta = FileMetaDataset()
    with source.open("rb") as handle:
        try:
            if read_preamble(handle, force=True) is not None:
                meta = _read_file_meta_info(handle)
        except Exception:
            handle.seek(0)
        body = handle.read()
    guessed = {
        "SOPClassUID": SecondaryCaptureImageStorage,
        "SOPInstanceUID": "",
        "syntax": ImplicitVRLittleEndian,
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(source, force=True, stop_before_pixels=True)
        guessed.update({k: str(ds[k].value) for k in ("SOPClassUID", "SOPInstanceUID") if k in ds})
        implicit, little = ds.original_encoding
        guessed["syntax"] = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian}.get(
            (implicit, little), ExplicitVRBigEndian
        )
    except Exception:
        pass
    return as_sent(
        body,
        meta.get("MediaStorageSOPClassUID", guessed["SOPClassUID"]),
        meta.get("TransferSyntaxUID", guessed["syntax"]),
        meta.get("MediaStorageSOPInstanceUID", guessed["SOPInstanceUID"]),
        folder / f"{source.parent.name}-{source.name}.dcm",
    )


def malformed_test_files() -> list[Path]:
    """pydicom's test files that its strict reading (warnings as errors) refuses, directories aside."""
    found = []
    for name in get_testdata_files():
        path = Path(name)
        if not path.is_file():
            continue
        try:
            with warnings.catch_warnings(), pydicom_config.strict_reading():
                warnings.simplefilter("error")
                ds = pydicom.dcmread(path)
                for _ in ds.iterall():
                    pass
                if "PixelData" in ds:
                    ds.PixelData  # noqa: B018 - reading it is the check
        except Exception:
            found.append(path)
    return found


def _answered(outcome) -> bool:
    """A DIMSE status came back, or the node refused the presentation context."""
    return outcome.status is not None or outcome.context_rejected


def send_and_check(node: RunningNode, path: Path) -> str:
    """Send one file; fails unless the node answered and is still up. Returns the outcome."""
    try:
        (outcome,) = store(_peer(node), [path], calling_ae=CALLER)
    except AssociationFailed:  # its SOP class refused in negotiation
        _alive(node)
        return "refused"
    assert _answered(outcome), f"no answer for {path.name}: {outcome.comment}"
    _alive(node)
    return "stored" if outcome.ok else f"status 0x{outcome.status:04X}"


def test_every_malformed_file_of_pydicom_gets_an_answer_and_the_node_stays_up(hostile, tally):
    node, folder = hostile
    files = malformed_test_files()
    assert len(files) >= 20, [f.name for f in files]
    for source in files:
        with tally.case(f"malformed file {source.name}"):
            send_and_check(node, sendable(source, folder / "malformed"))
    with tally.case("no patient data of the malformed files in the node's texts"):
        _settle(node)
        assert_no_leak(node_texts(node), identifiers_of(files))


#: The ways a real dataset is broken: each draws the bytes of one hostile dataset.
MUTATIONS = ("length", "vr", "truncated", "rows_columns", "frames", "sequence", "bytes")


def _encoded(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def _element_offsets(body: bytes) -> list[int]:
    """Where each top-level element of an explicit VR little endian body starts."""
    offsets, position = [], 0
    while position + 8 <= len(body):
        offsets.append(position)
        vr = body[position + 4 : position + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR"):
            length = struct.unpack_from("<I", body, position + 8)[0]
            position += 12 + (0 if length == 0xFFFFFFFF else length)
        else:
            position += 8 + struct.unpack_from("<H", body, position + 6)[0]
    return offsets


@st.composite
def hostile_datasets(draw, template: pydicom.Dataset) -> tuple[str, str, bytes]:
    """(mutation, SOP Instance UID, dataset bytes): a real chest radiograph broken one way.

    Each its own instance, so that none is taken for the resend of another.
    """
    mutation = draw(st.sampled_from(MUTATIONS))
    ds = copy.deepcopy(template)
    # Drawn, not generated: hypothesis replays an example from its draws alone.
    ds.SOPInstanceUID = f"2.25.1{draw(st.integers(0, 10**29 - 1)):029d}"
    if mutation == "rows_columns":
        ds.Rows = draw(st.sampled_from([0, 1, 65535]))
        ds.Columns = draw(st.sampled_from([0, 65535, 40000]))
    elif mutation == "frames":
        ds.NumberOfFrames = draw(st.sampled_from(["2147483647", "999999999999", "-1", "0", "1e9"]))
    elif mutation == "sequence":
        broken = pydicom.Dataset()
        broken.CodeValue = "X" * draw(st.integers(0, 20))
        ds.ReferencedImageSequence = [broken] * draw(st.integers(1, 3))
    body = _encoded(ds)
    body = body[body.index(b"DICM") + 4 :]
    body = body[struct.unpack_from("<I", body, 8)[0] + 12 :]  # past the file meta group
    offsets = _element_offsets(body)
    at = draw(st.sampled_from(offsets))
    if mutation == "length":
        value = draw(st.sampled_from([0, 1, 3, 0xFFFF, 0x7FFF]))
        body = body[: at + 6] + struct.pack("<H", value) + body[at + 8 :]
    elif mutation == "vr":
        vr = draw(st.sampled_from([b"XX", b"\0\0", b"SQ", b"OB", b"UN", b"ZZ", b"sq"]))
        body = body[: at + 4] + vr + body[at + 6 :]
    elif mutation == "truncated":
        pixels = body.rfind(b"\xe0\x7f\x10\x00")
        body = body[: draw(st.integers(max(pixels, 0), len(body) - 1))]
    elif mutation == "sequence":
        start = body.find(b"\x08\x00\x40\x11")  # (0008,1140) Referenced Image Sequence
        cut = draw(st.integers(start + 1, start + 40)) if start >= 0 else len(body)
        body = body[:cut] + body[cut + draw(st.integers(1, 16)) :]
    elif mutation == "bytes":
        flips = draw(st.lists(st.tuples(st.integers(0, len(body) - 1), st.integers(0, 255)), max_size=8))
        data = bytearray(body)
        for position, value in flips:
            data[position] = value
        body = bytes(data)
    return mutation, str(ds.SOPInstanceUID), body


def test_fuzzed_datasets_get_an_answer_and_the_node_stays_up_with_memory_bounded(hostile, tally):
    node, folder = hostile
    study = write_study(folder / "templates", 90000, instances=1, size=128)
    template = pydicom.dcmread(study.paths[0])
    baseline = peak_rss_mib(node.process.pid)
    count = iter(range(1_000_000))

    @settings(
        max_examples=120,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(hostile_datasets(template))
    def send(drawn: tuple[str, str, bytes]) -> None:
        mutation, sop_instance_uid, body = drawn
        number = next(count)
        path = as_sent(
            body,
            ComputedRadiographyImageStorage,
            "1.2.840.10008.1.2.1",
            sop_instance_uid,
            folder / "fuzzed" / f"{number:04d}-{mutation}.dcm",
        )
        with tally.case(f"fuzzed dataset {number} ({mutation})"):
            send_and_check(node, path)

    send()
    with tally.case("the node settles every fuzzed study, memory bounded, no patient data in its texts"):
        _settle(node)
        _alive(node)
        peak = peak_rss_mib(node.process.pid)
        tally.peak_rss_mib = max(tally.peak_rss_mib, peak)
        assert peak < MAX_PEAK_RSS_MIB, f"peak RSS {peak:.0f} MiB (at start of fuzzing {baseline:.0f})"
        assert_no_leak(node_texts(node), study.identifiers)


def _settle(node: RunningNode) -> None:
    """Wait until no study is waiting or in work: each is done, ignored or failed with a reason."""
    journal = node.config.parent / "var" / "journal.sqlite"

    def settled() -> bool:
        with sqlite3.connect(journal, timeout=30) as db:
            return not db.execute(
                "SELECT count(*) FROM studies WHERE state IN ('receiving', 'processing')"
            ).fetchone()[0]

    wait_until(settled, 180, 0.5, what="every study settled")


def _audit(node: RunningNode) -> str:
    return (node.config.parent / "var" / "logs" / "audit.log").read_text()


def _association(node: RunningNode, calling: str = CALLER, called: str = "DICOMNODE", sop_class: str = ""):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(sop_class or ComputedRadiographyImageStorage, "1.2.840.10008.1.2.1")
    ae.network_timeout = 30
    return ae.associate("127.0.0.1", node.port, ae_title=called)


def _closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """True when the node closes (or aborts) the connection within `within_s` seconds."""
    sock.settimeout(within_s)
    try:
        while True:
            data = sock.recv(65536)
            if not data or data[:1] == b"\x07":  # closed, or an A-ABORT
                return True
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def _incoming_empty(node: RunningNode) -> bool:
    return not any((node.config.parent / "var" / "incoming").iterdir())


def test_wrong_called_ae_and_unknown_caller_are_rejected_with_the_reason_in_the_audit(hostile, tally):
    node, _ = hostile
    with tally.case("wrong called AE title"):
        assoc = _association(node, called="NOTTHENODE")
        assert assoc.is_rejected
        wait_until(lambda: "called=NOTTHENODE" in _audit(node), 10, what="audit line")
        _alive(node)
    with tally.case("unknown calling AE title"):
        assoc = _association(node, calling="STRANGER")
        assert assoc.is_rejected
        wait_until(lambda: "calling=STRANGER" in _audit(node), 10, what="audit line")
        _alive(node)
    lines = [line for line in _audit(node).splitlines() if "NOTTHENODE" in line or "STRANGER" in line]
    assert all("rejected" in line and line.rsplit(": ", 1)[-1] for line in lines), lines


def test_a_pdu_larger_than_negotiated_and_a_pdu_claiming_four_gigabytes_end_the_association(hostile, tally):
    node, _ = hostile
    baseline = peak_rss_mib(node.process.pid)
    with tally.case("P-DATA PDU of 4 MiB after a maximum of 128 KiB was negotiated"):
        assoc = _association(node)
        assert assoc.is_established
        value = b"\0" * (4 << 20)
        pdv = struct.pack(">IBB", len(value) + 2, 3, 0x00) + value  # context 3, dataset fragment
        with contextlib.suppress(OSError):  # the node may close the connection before the end
            assoc.dul.socket.socket.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
        wait_until(lambda: not assoc.is_established, 3 * TIMEOUT_S + 5, what="association ended")
        _alive(node)
    with tally.case("PDU header announcing 4 GiB, 1 MiB of it, then silence"):
        with socket.create_connection(("127.0.0.1", node.port)) as sock:
            sock.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0) + b"\0" * (1 << 20))
            assert _closed_by_peer(sock, 3 * TIMEOUT_S + 5)
        _alive(node)
    with tally.case("P-DATA PDU announcing and sending 128 MiB"):
        assoc = _association(node)
        assert assoc.is_established
        size = 128 << 20
        chunk = b"\0" * (1 << 20)
        raw = assoc.dul.socket.socket
        with contextlib.suppress(OSError):  # the node closed the connection instead of reading it
            raw.sendall(struct.pack(">BBI", 0x04, 0, size))
            for _ in range(size // len(chunk)):
                raw.sendall(chunk)
        wait_until(lambda: not assoc.is_established, 3 * TIMEOUT_S + 5, what="association ended")
        _alive(node)
    grown = peak_rss_mib(node.process.pid) - baseline
    assert grown < 64, f"peak memory grew by {grown:.0f} MiB while reading oversized PDUs"


def test_aborts_and_broken_connections_leave_no_half_received_file(hostile, tally):
    node, folder = hostile
    folder.mkdir(parents=True, exist_ok=True)
    large = write_large_instance(folder / "large.dcm", megabytes=24)
    sop_class = str(read_file_meta_info(large).MediaStorageSOPClassUID)
    with tally.case("A-ABORT in the middle of a dataset"):
        assoc = _association(node, sop_class=sop_class)
        sender = threading.Thread(target=assoc.send_c_store, args=(large,), daemon=True)
        sender.start()
        wait_until(lambda: not _incoming_empty(node), 30, 0.005, what="receipt under way")
        assoc.abort()
        wait_until(lambda: _incoming_empty(node), 30, what="half-received file deleted")
        _alive(node)
    with tally.case("connection closed without an abort in the middle of a dataset"):
        assoc = _association(node, sop_class=sop_class)
        sender = threading.Thread(target=assoc.send_c_store, args=(large,), daemon=True)
        sender.start()
        wait_until(lambda: not _incoming_empty(node), 30, 0.005, what="receipt under way")
        assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
        # The node gives up on the silent peer after network_timeout_s; its file goes when an
        # association ends once it is untouched for twice that (here: the checks of _alive).
        wait_until(lambda: _alive(node) or _incoming_empty(node), 8 * TIMEOUT_S + 10, 0.5)
        _alive(node)
    with tally.case("garbage instead of an A-ASSOCIATE-RQ"):
        with socket.create_connection(("127.0.0.1", node.port)) as sock:
            sock.sendall(bytes(range(256)) * 16)
            assert _closed_by_peer(sock, 3 * TIMEOUT_S + 5)
        _alive(node)


def test_idle_connections_are_closed_by_the_timeouts(hostile, tally):
    node, _ = hostile
    with (
        tally.case("TCP connection that never associates"),
        socket.create_connection(("127.0.0.1", node.port)) as sock,
    ):
        assert _closed_by_peer(sock, 3 * TIMEOUT_S + 5)
    with tally.case("association that goes silent"):
        assoc = _association(node)
        assert assoc.is_established
        wait_until(lambda: not assoc.is_established, 3 * TIMEOUT_S + 5, what="idle association ended")
        _alive(node)
