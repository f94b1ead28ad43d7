"""C-STOREs served straight off the P-DATA stream (net/storestream.py), and the quick walk of a
received header (net/header.py) that decides with them.

Peers: pynetdicom's SCU, sending in fragments of 64 bytes (as a peer with a tiny maximum PDU
does), with a C-ECHO between its C-STOREs, and breaking the P-DATA rules on purpose; pydicom
as the judge of every byte the stream writes or sends, and of every header the walk reads.
"""

from __future__ import annotations

import random
import struct
import time
import warnings
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, decode
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomnode.net.header import Unusual, read_header
from dicomnode.net.scp import _read_header
from dicomnode.net.storestream import c_store_response, file_meta, p_data
from tests.conftest import wait_until
from tests.test_scp import scp  # noqa: F401 (a fixture)


@pytest.mark.parametrize(
    ("sop_class", "instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even lengths
        ("1.2.840.10008.5.1.4.1.1.22", "1.2.33.4", "1.2.840.10008.1.2"),  # odd: padded
        ("1.2.840.10008.5.1.4.1.1.77.1.6", "2.25.1", "1.2.840.10008.1.2.4.91"),
    ],
)
def test_the_file_meta_is_byte_for_byte_what_pydicom_writes(sop_class, instance, syntax):
    expected = DicomBytesIO()
    expected.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(
        expected,
        create_file_meta(
            sop_class_uid=UID(sop_class), sop_instance_uid=UID(instance), transfer_syntax=UID(syntax)
        ),
    )
    assert file_meta(sop_class, instance, syntax) == expected.getvalue()


def test_a_c_store_response_reads_back_as_pydicom_decodes_it():
    command = c_store_response(7, "1.2.840.10008.5.1.4.1.1.2", "1.2.345", 0xC000, "x" * 70)

    ds = decode(BytesIO(command), True, True)
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 7
    assert ds.CommandDataSetType == 0x0101
    assert ds.Status == 0xC000
    assert ds.ErrorComment == "x" * 64  # LO: at most 64 characters
    assert ds.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.AffectedSOPInstanceUID == "1.2.345"
    assert ds.CommandGroupLength == len(command) - 12
    assert "ErrorComment" not in decode(BytesIO(c_store_response(1, "1.2", "1.2.3", 0, None)), True, True)


def test_a_response_longer_than_the_peers_maximum_pdu_is_sent_in_fragments():
    command = c_store_response(1, "1.2.840.10008.5.1.4.1.1.2", "1.2.345", 0xA700, "node storage full")
    stream, fragments, controls = p_data(3, command, 40), [], []
    while stream:
        pdu_type, _, length = struct.unpack_from(">BBL", stream)
        item_length, context_id, control = struct.unpack_from(">LBB", stream, 6)
        assert (pdu_type, context_id, item_length) == (0x04, 3, length - 4)
        assert length <= 40
        fragments.append(stream[12 : 6 + length])
        controls.append(control)
        stream = stream[6 + length :]
    assert len(fragments) > 1
    assert b"".join(fragments) == command
    assert controls == [0x01] * (len(fragments) - 1) + [0x03]  # command; the last one marked


def _ct(tmp_path: Path, uid: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    return ds


def _associate(port: int, *contexts):
    ae = AE(ae_title="TINYPDU")
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    return assoc


def _store_in_fragments(assoc, ds: pydicom.Dataset, max_pdu: int) -> int:
    """Send a C-STORE as a peer whose PDUs hold `max_pdu` bytes does; the response's status."""
    context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == ds.SOPClassUID)
    assoc._reactor_checkpoint.clear()  # as pynetdicom's own send_c_store: its thread leaves the response
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        for primitive in _c_store_pdata(ds, context_id, max_pdu):
            assoc.dul.send_pdu(primitive)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return response.Status


def test_commands_and_data_sets_in_64_byte_fragments_are_stored_with_an_echo_between(tmp_path, scp):  # noqa: F811
    spool, port = scp
    assoc = _associate(
        port, (CTImageStorage, [ExplicitVRLittleEndian]), (Verification, [ImplicitVRLittleEndian])
    )
    sent = [_ct(tmp_path, f"1.2.826.0.1.3680043.8.498.{n}") for n in (1, 2)]
    try:
        statuses = [
            _store_in_fragments(assoc, sent[0], 64),  # command and data set in fragments of 58 bytes
            assoc.send_c_echo().Status,
            _store_in_fragments(assoc, sent[1], 64),
        ]
    finally:
        assoc.release()
    assert statuses == [0, 0, 0]
    stored = sorted(spool.instances_dir.rglob("*.dcm"))
    assert len(stored) == 2
    for ds in sent:
        kept = pydicom.dcmread(next(p for p in stored if p.stem == ds.SOPInstanceUID))
        assert kept.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert kept.PixelData == ds.PixelData
        assert kept.PatientName == ds.PatientName
    assert not list(spool.incoming_dir.iterdir())


def _c_store_pdata(ds: pydicom.Dataset, context_id: int, max_pdu: int) -> list:
    """pynetdicom's P-DATA primitives for a C-STORE-RQ of `ds` (explicit VR little endian)."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    encoded = BytesIO()
    pydicom.filewriter.write_dataset(pydicom.filebase.DicomFileLike(encoded), _explicit_le(ds))
    request.DataSet = BytesIO(encoded.getvalue())
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return list(message.encode_msg(context_id, max_pdu))


def _explicit_le(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds = ds.copy()
    ds.set_original_encoding(False, True)
    return ds


@pytest.mark.parametrize("broken", ["data set on another context", "command inside a data set"])
def test_a_peer_breaking_the_p_data_rules_is_aborted_and_nothing_is_kept(tmp_path, scp, broken):  # noqa: F811
    spool, port = scp
    assoc = _associate(
        port, (CTImageStorage, [ExplicitVRLittleEndian]), (CTImageStorage, [ImplicitVRLittleEndian])
    )
    aborted = []
    assoc.bind(evt.EVT_ABORTED, lambda event: aborted.append(True))
    contexts = [cx.context_id for cx in assoc.accepted_contexts]
    primitives = _c_store_pdata(_ct(tmp_path, "1.2.826.0.1.3680043.8.498.3"), contexts[0], 1024)
    assert len(primitives) > 3
    if broken == "data set on another context":
        values = primitives[2].presentation_data_value_list
        values[0] = (contexts[1], values[0][1])
    else:  # a second command starts before the first data set ended
        primitives.insert(2, primitives[0])
    for primitive in primitives:
        assoc.dul.send_pdu(primitive)
    wait_until(lambda: aborted, 10, what="association aborted")
    assert not list(spool.instances_dir.rglob("*.dcm"))
    wait_until(lambda: not list(spool.incoming_dir.iterdir()), 10, what="partial file deleted")


def _identity(ds: pydicom.Dataset) -> tuple[str, ...]:
    keywords = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Manufacturer")
    return tuple(str(ds.get(keyword, "")).strip() for keyword in keywords)


def _walked(path: Path) -> tuple[str, ...] | None:
    """What the walk reads of `path`, the same from the file as from its bytes held in memory."""
    try:
        header = read_header(path)
    except Unusual:
        with pytest.raises(Unusual):
            read_header(path, path.read_bytes())
        return None
    assert read_header(path, path.read_bytes()) == header
    fields = (
        "sop_class_uid",
        "sop_instance_uid",
        "study_instance_uid",
        "series_instance_uid",
        "manufacturer",
    )
    return tuple(getattr(header, field) for field in fields)


def _test_files() -> list[Path]:
    """pydicom's test files and pydicom-data's, found where they are installed (no download)."""
    folders = {Path(get_testdata_file(name, download=False)).parent for name in ("CT_small.dcm", "liver.dcm")}
    return sorted(path for folder in folders for path in folder.rglob("*.dcm"))


def test_the_walk_reads_what_pydicom_reads_in_pydicoms_test_files_or_leaves_them_to_it():
    walked = 0
    for path in _test_files():
        identity = _walked(path)
        if identity is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert identity == _identity(_read_header(path)), path.name
        walked += 1
    assert walked > 100  # the common files are read by the walk, not left to pydicom


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # explicit VR little endian, private tags
        "MR_small_implicit.dcm",  # implicit VR
        "MR_small_bigendian.dcm",  # explicit VR big endian
        "JPEG2000.dcm",  # encapsulated pixel data
        "reportsi.dcm",  # nested sequences of undefined length
        "waveform_ecg.dcm",  # sequences of items of defined and undefined length
    ],
)
def test_a_stream_cut_anywhere_is_taken_for_whole_by_the_walk_only_where_pydicom_takes_it(tmp_path, name):
    data = Path(get_testdata_file(name, download=False)).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data)
    assert _walked(path) is not None, "the whole file is read by the walk"
    taken = 0
    for cut in sorted(random.Random(name).sample(range(132, len(data)), 300)):
        path.write_bytes(data[:cut])
        if _walked(path) is None:
            continue
        taken += 1  # only a cut between two top-level elements leaves a stream that is whole
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _read_header(path)  # raises (TruncatedDataset) where pydicom's reading finds it cut
    assert taken < 30
