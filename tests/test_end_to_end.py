"""The walking skeleton against real peers: DCMTK sends, the node classifies, Orthanc receives.

Each test runs `dicomnode serve` as a process with the tiny seeded backbone and checks the
outcome where a PACS administrator would: in Orthanc's REST API, with `dicomnode status`, and
in the node's logs.
"""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import requests
import torch
import yaml
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation

from dicomnode.net.scu import Peer, store
from tests.conftest import (
    REPO,
    dciodvfy_errors,
    dcmtk,
    free_port,
    run_cli,
    start_node,
    start_orthanc,
    stop_process,
    tiny_backbone,
    wait_until,
    write_node_config,
)

SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.88.22",
}
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _results_in(orthanc, count: int = 2) -> list[pydicom.Dataset]:
    ids = wait_until(
        lambda: len(orthanc.instances()) >= count and orthanc.instances(), 90, what="results in Orthanc"
    )
    return [pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{i}/file").content)) for i in ids]


def _by_class(datasets: list[pydicom.Dataset]) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    srs = [d for d in datasets if d.SOPClassUID in SR_CLASSES]
    scs = [d for d in datasets if d.SOPClassUID == SC_CLASS]
    assert len(srs) == 1 and len(scs) == 1, [d.SOPClassUID for d in datasets]
    return srs[0], scs[0]


def _sr_text(sr: pydicom.Dataset) -> str:
    """Every text, code meaning and name in the SR content tree, flattened for assertions."""
    words: list[str] = []

    def walk(items) -> None:
        for item in items:
            for keyword in ("TextValue", "CodeMeaning"):
                if keyword in item:
                    words.append(str(item[keyword].value))
            for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
                if seq in item:
                    walk(item[seq])
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk([sr])
    return "\n".join(words)


def test_dcmtk_echo_and_store_of_a_chest_cr_ends_as_sr_and_sc_in_orthanc(
    tmp_path, orthanc, node_factory, chest_cr
):
    node = node_factory(destinations=[orthanc.destination(backoff_s=0.5)])
    echo = dcmtk("echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port))
    assert echo.returncode == 0, echo.stderr

    sent = dcmtk(
        "storescu", "-aec", "DICOMNODE", "-aet", "MODALITY", "127.0.0.1", str(node.port), str(chest_cr)
    )
    assert sent.returncode == 0, sent.stderr

    sr, sc = _by_class(_results_in(orthanc))
    source = pydicom.dcmread(chest_cr, stop_before_pixels=True)
    for result in (sr, sc):
        assert result.StudyInstanceUID == source.StudyInstanceUID
        assert result.PatientID == source.PatientID
        assert result.SeriesInstanceUID != source.SeriesInstanceUID
        assert result.Manufacturer == "dicomnode"
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    text = _sr_text(sr)
    assert "DEMO" in text
    for finding in ("Atelectasis", "Cardiomegaly", "Pneumothorax", "Hiatal hernia"):
        assert finding in text
    referenced = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {source.SOPInstanceUID}
    assert sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB"
    for index, instance in enumerate(orthanc.instances()):
        as_stored = tmp_path / f"from-orthanc-{index}.dcm"
        as_stored.write_bytes(orthanc.get(f"/instances/{instance}/file").content)
        assert not dciodvfy_errors(as_stored)

    status = wait_until(lambda: "orthanc:sent=2" in (s := node.cli("status").stdout) and s, 30, what="status")
    assert "done=1" in status


def test_jpeg2000_cr_sent_compressed_is_decoded_and_reported(orthanc, node_factory):
    node = node_factory(destinations=[orthanc.destination(backoff_s=0.5)])
    j2k = Path(get_testdata_file("RG1_J2KR.dcm"))
    sent = dcmtk("storescu", "-R", "-xv", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(j2k))
    assert sent.returncode == 0, sent.stderr
    stored = list((node.config.parent / "var" / "spool").rglob("*.dcm"))
    assert len(stored) == 1
    assert (
        pydicom.dcmread(stored[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
        == "1.2.840.10008.1.2.4.90"
    )
    _by_class(_results_in(orthanc))


def test_study_no_rule_routes_is_recorded_as_ignored_with_the_reason(node_factory):
    node = node_factory()
    extremity = get_testdata_file("RG3_UNCI.dcm")
    sent = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), extremity)
    assert sent.returncode == 0, sent.stderr
    status = wait_until(lambda: "ignored=1" in (s := node.cli("status").stdout) and s, 30, what="ignored")
    assert "BodyPartExamined is EXTREMITY, rule wants CHEST" in status


def _store_raw(tmp_path: Path, port: int, encoded_body: bytes, sop_instance_uid: str) -> tuple[int, str]:
    """C-STORE a dataset body byte for byte, as a broken modality would send it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "raw.dcm"
    with open(path, "wb") as handle:
        handle.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(handle, meta)
        handle.write(encoded_body)
    outcomes = store(Peer("127.0.0.1", port, "DICOMNODE"), [path], calling_ae="BROKEN")
    return outcomes[0].status, outcomes[0].comment


def test_unparseable_dataset_is_refused_with_a_reason_and_the_node_keeps_serving(tmp_path, node_factory):
    node = node_factory()
    # A sequence whose item does not start with an item tag: a corrupt stream pydicom rejects.
    broken = (
        bytes.fromhex("0800 1800 5549 0400")
        + b"1.2\x00"
        + bytes.fromhex("1000 1000 504e 0800")
        + b"Doe^John"
        + bytes.fromhex("0800 1511 5351 0000 ffffffff aaaa bbbb 04000000")
        + b"abcd"
    )
    status, comment = _store_raw(tmp_path, node.port, broken, "1.2")
    assert status == 0xC000
    assert "cannot be parsed" in comment
    echo = dcmtk("echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port))
    assert echo.returncode == 0, echo.stderr
    assert "Doe" not in node.log.read_text()
    assert "Doe" not in (node.config.parent / "var" / "logs" / "dicomnode.log").read_text()
    assert not list((node.config.parent / "var" / "spool").rglob("*.dcm"))


def test_instance_without_study_uid_is_refused_naming_the_attribute(tmp_path, node_factory):
    node = node_factory()
    ds = pydicom.Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.4"
    status, comment = _store_raw(tmp_path, node.port, encode(ds, False, True), "1.2.3")
    assert (status, comment) == (0xC000, "StudyInstanceUID missing")


def test_results_queued_while_the_pacs_is_down_are_delivered_when_it_comes_up(
    tmp_path, node_factory, chest_cr
):
    pacs_port = free_port()
    node = node_factory(
        destinations=[
            {
                "name": "late",
                "host": "127.0.0.1",
                "port": pacs_port,
                "ae_title": "ORTHANC",
                "backoff_s": 0.5,
                "max_backoff_s": 1,
            }
        ]
    )
    sent = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(chest_cr))
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: "late:pending=2" in node.cli("status").stdout, 60, what="pending deliveries")
    orthanc = start_orthanc(tmp_path / "late-orthanc", dicom_port=pacs_port)
    try:
        _by_class(_results_in(orthanc))
        wait_until(lambda: "late:sent=2" in node.cli("status").stdout, 30, what="sent")
    finally:
        stop_process(orthanc.process)


def test_node_killed_before_processing_resumes_the_study_after_restart(
    tmp_path, orthanc, node_factory, chest_cr
):
    node = node_factory(destinations=[orthanc.destination(backoff_s=0.5)], studies={"quiet_period_s": 3600})
    sent = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(chest_cr))
    assert sent.returncode == 0, sent.stderr
    node.process.kill()
    node.process.wait()
    node.config.write_text(node.config.read_text().replace("quiet_period_s: 3600", "quiet_period_s: 0.5"))
    restarted = start_node(node.config, node.port)
    try:
        _by_class(_results_in(orthanc))
    finally:
        stop_process(restarted.process)


def test_duplicate_instance_is_stored_once(node_factory, chest_cr):
    node = node_factory(studies={"quiet_period_s": 3600})
    for _ in range(2):
        sent = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(chest_cr))
        assert sent.returncode == 0, sent.stderr
    assert "stored=1" in node.cli("status").stdout
    assert len(list((node.config.parent / "var" / "spool").rglob("*.dcm"))) == 1


def test_wrong_called_ae_title_is_rejected_and_audited_with_the_reason(node_factory):
    node = node_factory()
    echo = dcmtk("echoscu", "-aec", "NOTUS", "127.0.0.1", str(node.port))
    assert echo.returncode != 0
    audit = (node.config.parent / "var" / "logs" / "audit.log").read_text()
    assert "called AE title 'NOTUS' is not ours" in audit
    assert dcmtk("echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)).returncode == 0


def _variant(source: Path, folder: Path, name: str, **changes) -> Path:
    """A copy of a real file as another study, with attributes changed (None deletes)."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        pydicom.uid.generate_uid(),
        pydicom.uid.generate_uid(),
        pydicom.uid.generate_uid(),
    )
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _routing_that_reads_patient_data(folder: Path) -> Path:
    """The shipped rules, then rules that read PatientName and PatientID and never match them.

    Routing then compares every study's patient name and ID, and must still keep them out of
    the reasons it gives the journal and the log.
    """
    rules = yaml.safe_load((REPO / "conf" / "routing.yaml").read_text())["rules"]
    rules += [
        {"name": "patient-name", "match": {"PatientName": ["Nobody^Known"]}, "prompt_set": "cxr"},
        {"name": "patient-id", "match": {"PatientID": ["NOBODY"]}, "prompt_set": "cxr"},
    ]
    path = folder / "routing.yaml"
    path.write_text(yaml.safe_dump({"rules": rules}, sort_keys=False))
    return path


def test_dx_is_reported_sc_is_ignored_and_a_chest_cr_without_pixels_fails_with_its_reason(
    tmp_path, orthanc, node_factory
):
    node = node_factory(
        destinations=[orthanc.destination(backoff_s=0.5)],
        routing=str(_routing_that_reads_patient_data(tmp_path)),
    )
    chest = Path(get_testdata_file("RG1_UNCR.dcm", download=False))
    # Each input is a patient the test chose. RG1's referring physician "ward" stays: highdicom
    # warns about that name quoting it, and the node must withhold the warning's text.
    # No real DX ships with pydicom's data: the real CR, relabelled as a DX for presentation.
    dx = _variant(
        chest,
        tmp_path,
        "dx.dcm",
        SOPClassUID=DigitalXRayImageStorageForPresentation,
        Modality="DX",
        PatientName="Doe^Jane",
        PatientID="MRN-884422",
    )
    no_pixels = _variant(
        chest, tmp_path, "cr-no-pixels.dcm", PixelData=None, PatientName="Roe^Richard", PatientID="MRN-551133"
    )
    secondary_capture = _variant(
        Path(get_testdata_file("SC_rgb.dcm", download=False)),
        tmp_path,
        "sc.dcm",
        PatientName="Poe^Edgar",
        PatientID="MRN-190949",
    )
    for path in (dx, no_pixels, secondary_capture):
        sent = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(path))
        assert sent.returncode == 0, sent.stderr

    sr, sc = _by_class(_results_in(orthanc))
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == pydicom.dcmread(dx).StudyInstanceUID
    status = wait_until(
        lambda: (
            all(s in (out := node.cli("status").stdout) for s in ("done=1", "failed=1", "ignored=1")) and out
        ),
        60,
        what="three outcomes",
    )
    assert "Modality is OT, rule wants CR|DX" in status
    assert "PatientName is a value that does not match" in status, "routing read the SC's patient"
    assert "no Pixel Data" in status
    assert len(list((node.config.parent / "var" / "spool").rglob("*.dcm"))) == 3, "nothing received is lost"

    node.process.terminate()
    assert node.process.wait(timeout=60) == 0
    log = node.log.read_text()
    assert "dicomnode stopped" in log
    log += (node.config.parent / "var" / "logs" / "dicomnode.log").read_text()
    assert '"ward"' not in log, "highdicom's warning quoting the referring physician reached the log"
    for path in (dx, no_pixels, secondary_capture):
        sent_ds = pydicom.dcmread(path, stop_before_pixels=True)
        for value in (
            str(sent_ds.PatientName),
            sent_ds.PatientID,
            sent_ds.StudyInstanceUID,
            sent_ds.SOPInstanceUID,
        ):
            assert value not in log, f"{value} reached the log"
            assert value not in status, f"{value} reached dicomnode status"


def test_below_the_free_space_floor_storescu_is_told_out_of_resources_and_nothing_is_kept(
    node_factory, chest_cr
):
    node = node_factory(scp={"min_free_mb": 1 << 40})  # a floor no disk reaches
    sent = dcmtk("storescu", "-v", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(chest_cr))
    assert "Refused: OutOfResources" in sent.stderr, sent.stderr
    assert not list((node.config.parent / "var" / "spool").rglob("*.dcm"))
    assert "stored=0 refused=1" in (node.config.parent / "var" / "logs" / "audit.log").read_text()


def test_calling_ae_outside_the_allowlist_is_rejected_and_audited_with_the_reason(node_factory):
    node = node_factory(scp={"allowed_calling_aes": ["PACS"]})
    refused = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "DICOMNODE", "127.0.0.1", str(node.port))
    assert refused.returncode != 0
    allowed = dcmtk("echoscu", "-aet", "PACS", "-aec", "DICOMNODE", "127.0.0.1", str(node.port))
    assert allowed.returncode == 0, allowed.stderr
    audit = (node.config.parent / "var" / "logs" / "audit.log").read_text()
    assert "calling AE title 'INTRUDER' is not in scp.allowed_calling_aes" in audit


def test_orthanc_forwards_a_study_and_gets_sr_and_sc_back_into_the_same_study(
    tmp_path, node_factory, chest_cr
):
    """The product's loop: the PACS sends a study to dicomnode and receives the results."""
    node_port = free_port()
    pacs = start_orthanc(tmp_path / "pacs", modalities={"dicomnode": ["DICOMNODE", "127.0.0.1", node_port]})
    try:
        node_factory(destinations=[pacs.destination(backoff_s=0.5)], port=node_port)
        uploaded = requests.post(f"{pacs.url}/instances", data=chest_cr.read_bytes(), timeout=30).json()
        forwarded = requests.post(f"{pacs.url}/modalities/dicomnode/store", data=uploaded["ID"], timeout=60)
        assert forwarded.status_code == 200, forwarded.text

        study = uploaded["ParentStudy"]
        wait_until(
            lambda: len(pacs.get(f"/studies/{study}/instances").json()) == 3, 90, what="results in study"
        )
        series = pacs.get(f"/studies/{study}/series").json()
        modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
        assert modalities == ["CR", "OT", "SR"]
    finally:
        stop_process(pacs.process)


def test_a_second_node_on_a_taken_port_exits_2_saying_it_cannot_listen(
    tmp_path, node_factory, tiny_architecture
):
    first = node_factory()
    folder = tmp_path / "second"
    folder.mkdir()
    config = write_node_config(folder, tiny_architecture, scp_port=first.port)

    done = run_cli("serve", "--config", str(config))

    assert done.returncode == 2
    assert (
        f"cannot start: Storage SCP cannot listen on 127.0.0.1:{first.port}: Address already in use"
        in done.stderr
    )
    assert "Traceback" not in done.stderr


def test_a_rule_naming_a_missing_prompt_set_stops_start_up_naming_the_file(tmp_path, tiny_architecture):
    routing = tmp_path / "routing.yaml"
    routing.write_text("rules:\n  - {name: chest, match: {Modality: CR}, prompt_set: nosuchset}\n")
    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port(), routing=str(routing))

    done = run_cli("serve", "--config", str(config))

    assert done.returncode == 2
    assert "nosuchset/promptset.yaml: cannot read prompt set" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_failure_that_passes_is_retried_until_the_results_reach_the_pacs(orthanc, node_factory, chest_cr):
    node = node_factory(
        destinations=[orthanc.destination(backoff_s=0.5)],
        studies={"retry_backoff_s": 1, "max_attempts": 10},
    )
    study = pydicom.dcmread(chest_cr, stop_before_pixels=True).StudyInstanceUID
    blocker = node.config.parent / "var" / "outbox" / study  # a file where the results folder goes
    blocker.write_text("not a folder")

    sent = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(chest_cr))
    assert sent.returncode == 0, sent.stderr
    status = wait_until(lambda: "study retrying" in (s := node.cli("status").stdout) and s, 60, what="retry")
    assert "failed: FileExistsError: [Errno 17] File exists" in status
    # The OS error names the results folder, which is the Study Instance UID: kept out of the
    # journal, the status shown to operators and monitoring, and the log.
    assert study not in status and study not in node.cli("status", "--json").stdout
    assert study not in node.log.read_text()

    blocker.unlink()
    _by_class(_results_in(orthanc))
    assert "done=1" in node.cli("status").stdout


def _predecessor_of(sr: pydicom.Dataset) -> tuple[str, str, str, str]:
    """(study, series, SOP class, SOP instance) of the one SR that `sr` supersedes."""
    (study,) = sr.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (sop,) = series.ReferencedSOPSequence
    return (
        study.StudyInstanceUID,
        series.SeriesInstanceUID,
        sop.ReferencedSOPClassUID,
        sop.ReferencedSOPInstanceUID,
    )


def _reference(sr: pydicom.Dataset) -> tuple[str, str, str, str]:
    return sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPClassUID, sr.SOPInstanceUID


def test_a_late_instance_and_a_new_backbone_give_reports_in_orthanc_that_supersede_the_earlier(
    tmp_path, orthanc, node_factory, chest_cr, tiny_architecture
):
    late_instance = Path(get_testdata_file("RG1_UNCR.dcm"))  # the same chest study, another view
    node = node_factory(destinations=[orthanc.destination(backoff_s=0.5)])
    first = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(chest_cr))
    assert first.returncode == 0, first.stderr
    sr1, _ = _by_class(_results_in(orthanc, 2))

    late = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(late_instance))
    assert late.returncode == 0, late.stderr
    second = _results_in(orthanc, 4)

    srs = {sr.SeriesDescription: sr for sr in second if sr.SOPClassUID in SR_CLASSES}
    assert set(srs) == {
        "DEMO dicomnode AI findings - no clinical meaning",
        "DEMO dicomnode AI findings v2, replaces v1 - no clinical meaning",
    }
    sr2 = srs["DEMO dicomnode AI findings v2, replaces v1 - no clinical meaning"]
    assert _predecessor_of(sr2) == _reference(sr1)
    scs = sorted(ds.SeriesDescription for ds in second if ds.SOPClassUID == SC_CLASS)
    assert scs == [
        "DEMO dicomnode AI image - no clinical meaning",
        "DEMO dicomnode AI image v2, replaces v1 - no clinical meaning",
    ]
    as_stored = tmp_path / "sr2.dcm"
    sr2.save_as(as_stored)
    assert not dciodvfy_errors(as_stored)

    # The DEMO backbone replaced by a checkpoint (of the same weights: only the identity changes),
    # then the study reprocessed while the node runs: a third report, no longer DEMO.
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_backbone(tiny_architecture).model.state_dict(), checkpoint)
    stop_process(node.process)
    config = yaml.safe_load(node.config.read_text())
    config["model"]["checkpoint"] = str(checkpoint)
    node.config.write_text(yaml.safe_dump(config))
    restarted = start_node(node.config, node.port)
    try:
        reprocess = restarted.cli("reprocess", sr1.StudyInstanceUID)
        assert reprocess.returncode == 0, reprocess.stderr
        third = _results_in(orthanc, 6)
    finally:
        stop_process(restarted.process)

    sr3s = [ds for ds in third if ds.SOPClassUID in SR_CLASSES and "v3" in ds.SeriesDescription]
    assert [ds.SeriesDescription for ds in sr3s] == ["dicomnode AI findings v3, replaces v2"]
    assert _predecessor_of(sr3s[0]) == _reference(sr2)
    assert "DEMO" not in _sr_text(sr3s[0])
    assert len({ds.SOPInstanceUID for ds in third}) == 6


_UNCLEAN_STOP = """
import os, sys
from pathlib import Path
from dicomnode.spool import Spool, instances
instances.SETTLE_S = 3600.0
spool = Spool(Path(sys.argv[1]))
spool.start_settling()
data = Path(sys.argv[2]).read_bytes()
received = spool.incoming_dir / "received.dcm"
received.write_bytes(data)
spool.store(received, sop_instance_uid=sys.argv[3], sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=sys.argv[4], series_instance_uid=sys.argv[5], calling_ae="CT", held=data)
os._exit(0)  # as a kill -9 or a power loss: the settler never ran
"""


def test_serve_writes_again_what_landed_before_an_unclean_stop(tmp_path, node_factory):
    ct_small = Path(get_testdata_file("CT_small.dcm", download=False))
    ds = pydicom.dcmread(ct_small)
    uids = [str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)]
    state = tmp_path / "var"
    subprocess.run([sys.executable, "-c", _UNCLEAN_STOP, str(state), str(ct_small), *uids], check=True)
    stored = state / "spool" / uids[1] / f"{uids[0]}.dcm"
    held = stored.read_bytes()
    stored.unlink()  # the power went before the kernel wrote the file back

    node = node_factory()

    assert stored.read_bytes() == held
    assert "restored 1 instance files after an unclean stop" in node.log.read_text()

    # Running, it lands what it receives (the journal's mark counts the log's records).
    mr_small = Path(get_testdata_file("MR_small.dcm", download=False))
    assert dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(mr_small)).returncode == 0
    journal = sqlite3.connect(f"file:{state / 'journal.sqlite'}?mode=ro", uri=True)
    assert journal.execute("SELECT seq FROM landing_marks WHERE log='0'").fetchone() == (2,)
    journal.close()
