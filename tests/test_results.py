"""The results room writes a conformant SR and SC per study, deterministic and marked when demo.

Sources are two real encoded computed radiographs of one chest study from pydicom-data
(RG1_UNCR and RG1_UNCI: same StudyInstanceUID, two SOP instances); the outputs are read back
with pydicom and highdicom and checked with dicom3tools' `dciodvfy`.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

import dicomnode.durable as durable
from dicomnode.config import load_routing
from dicomnode.flow import Code, Finding, ModelIdentity, Prediction, ReportVersion, Sample
from dicomnode.privacy import uid_tag
from dicomnode.results import ResultsError, series_description, write_results
from dicomnode.routing import Decision, decide, read_header
from dicomnode.spool import Spool
from tests.conftest import dciodvfy_errors

SOURCE_FILES = ("RG1_UNCR.dcm", "RG1_UNCI.dcm")

CHEST_RADIOGRAPH = Code("399208008", "SCT", "Plain chest X-ray")
FINDINGS = (
    Finding("Atelectasis", Code("46621007", "SCT", "Atelectasis"), threshold=0.5),
    Finding("Cardiomegaly", Code("8186001", "SCT", "Cardiomegaly"), threshold=0.95),
    Finding("Effusion", Code("60046008", "SCT", "Pleural effusion"), threshold=0.25),
)
# Per image, in the order of FINDINGS. Study level (max): 0.6 present, 0.9 absent (below 0.95),
# 0.25 present (equal to its threshold).
PROBABILITIES = ((0.2, 0.9, 0.1), (0.6, 0.3, 0.25))
EXPECTED = {"Atelectasis": (60.0, True), "Cardiomegaly": (90.0, False), "Effusion": (25.0, True)}

MODEL = ModelIdentity(
    algorithm_name="dicomnode-cxr-zeroshot",
    algorithm_version="0.1.0",
    prompt_set="cxr",
    prompt_set_sha256="3" * 64,
    backbone="ViT-B-16",
    backbone_sha256="a" * 64,
    demo=False,
)
DEMO_MODEL = replace(MODEL, backbone_sha256=None, demo=True, backbone_seed=0)


def _source_path(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"{name} missing: install the test extra (pydicom-data)"
    return str(path)


def _display(path: str) -> np.ndarray:
    """The image as a viewer shows it, uint8: what the imaging room hands to the results."""
    ds = pydicom.dcmread(path)
    pixels = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    pixels = (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1.0) * 255.0
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = 255.0 - pixels
    return pixels.astype(np.uint8)


@pytest.fixture(scope="module")
def study() -> tuple[list[pydicom.Dataset], list[Sample], list[Prediction]]:
    """Sources (header only, as the node reads them), samples and predictions of one study."""
    paths = [_source_path(name) for name in SOURCE_FILES]
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    samples = [
        Sample(
            sop_instance_uid=str(ds.SOPInstanceUID),
            pixels=np.zeros((3, 8, 8), np.float32),
            display=_display(path),
        )
        for ds, path in zip(sources, paths, strict=True)
    ]
    predictions = [
        Prediction(sop_instance_uid=str(ds.SOPInstanceUID), probabilities=probabilities)
        for ds, probabilities in zip(sources, PROBABILITIES, strict=True)
    ]
    return sources, samples, predictions


def _write(
    study,
    out_dir: Path,
    model: ModelIdentity = MODEL,
    order=(0, 1),
    procedure: Code = CHEST_RADIOGRAPH,
    latest: ReportVersion | None = None,
):
    sources, samples, predictions = study
    return write_results(
        out_dir=out_dir,
        sources=[sources[i] for i in order],
        samples=[samples[i] for i in order],
        predictions=[predictions[i] for i in order],
        findings=FINDINGS,
        procedure=procedure,
        model=model,
        latest=latest,
    )


@pytest.fixture(scope="module")
def written(study, tmp_path_factory):
    """One non-demo run: (ResultSet, SR dataset, SC dataset)."""
    result = _write(study, tmp_path_factory.mktemp("results"))
    sr_path, sc_path = result.paths
    return result, pydicom.dcmread(sr_path), pydicom.dcmread(sc_path)


def test_writes_exactly_one_sr_and_one_sc(written):
    result, sr, sc = written
    sr_path, sc_path = result.paths
    assert sorted(sr_path.parent.iterdir()) == sorted([sr_path, sc_path])
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.Modality == "OT"
    assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID


def test_outputs_belong_to_the_source_study_in_two_new_series(study, written):
    sources, _, _ = study
    result, sr, sc = written
    assert result.study_instance_uid == sources[0].StudyInstanceUID
    source_series = {ds.SeriesInstanceUID for ds in sources}
    for output in (sr, sc):
        assert output.StudyInstanceUID == sources[0].StudyInstanceUID
        assert output.PatientID == sources[0].PatientID
        assert output.PatientName == sources[0].PatientName
        assert output.AccessionNumber == sources[0].AccessionNumber
        assert output.Manufacturer == "dicomnode"
        assert output.SeriesInstanceUID not in source_series
        assert "DEMO" not in output.SeriesDescription
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID


def test_routing_knows_both_results_as_our_own_and_never_routes_them_back(written, tmp_path):
    # A rule that takes any SR or SC: only the loop guard keeps a forwarded result out.
    rules = tmp_path / "routing.yaml"
    rules.write_text("rules: [{name: any-result, match: {Modality: [SR, OT]}, prompt_set: cxr}]\n")
    routing = load_routing(rules)
    result, _, _ = written

    for path in result.paths:
        decision = decide(routing, read_header(path))
        assert decision == Decision(None, None, "a result dicomnode produced itself"), path.name


def _groups(sr: pydicom.Dataset):
    return hd.sr.ComprehensiveSR.from_dataset(sr).content.get_image_measurement_groups()


def _items(group, name):
    """The content items called `name` directly inside a measurement group."""
    return group[0].ContentSequence.find(name)


def test_sr_has_one_coded_group_per_finding_with_decision_and_probability(written):
    _, sr, _ = written
    groups = _groups(sr)
    assert [group.tracking_identifier for group in groups] == [f.name for f in FINDINGS]
    for group, finding in zip(groups, FINDINGS, strict=True):
        assert (group.finding_type.value, group.finding_type.scheme_designator) == (
            finding.code.value,
            finding.code.scheme,
        )
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name.value == finding.code.value
        (measurement,) = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert measurement.unit == codes.UCUM.Percent
        probability, present = EXPECTED[finding.name]
        assert measurement.value == pytest.approx(probability)
        assert evaluation.value == (codes.SCT.Present if present else codes.SCT.Absent)


def test_sr_reports_the_procedure_the_prompt_set_declares(study, tmp_path):
    result = _write(study, tmp_path, procedure=Code("36643-5", "LN", "XR Chest 2 Views"))
    sr = pydicom.dcmread(result.paths[0])
    procedures = [
        item.ConceptCodeSequence[0]
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"  # (121058, DCM, "Procedure reported")
    ]
    assert [(c.CodeValue, c.CodingSchemeDesignator) for c in procedures] == [("36643-5", "LN")]


def test_sr_identifies_the_algorithm_and_references_every_source(study, written):
    sources, _, _ = study
    _, sr, _ = written
    for group in _groups(sr):
        (name,) = _items(group, codes.DCM.AlgorithmName)
        (version,) = _items(group, codes.DCM.AlgorithmVersion)
        (parameters,) = _items(group, codes.DCM.AlgorithmParameters)
        assert (name.value, version.value) == (MODEL.algorithm_name, MODEL.algorithm_version)
        assert MODEL.prompt_set_sha256 in parameters.value
        referenced = {image.referenced_sop_instance_uid for image in group.source_images}
        assert referenced == {ds.SOPInstanceUID for ds in sources}
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert {item.ReferencedSOPInstanceUID for item in evidence.ReferencedSOPSequence} == {
        ds.SOPInstanceUID for ds in sources
    }


def test_sc_is_an_rgb_capture_with_burned_in_findings(study, written):
    sources, _, _ = study
    _, _, sc = written
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    assert sc.BurnedInAnnotation == "YES"
    assert max(sc.Rows, sc.Columns) <= 1600
    assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in {ds.SOPInstanceUID for ds in sources}
    assert sc.PatientOrientation == sources[0].PatientOrientation


def test_rerun_yields_the_same_uids_whatever_the_order_of_sources(study, written, tmp_path):
    _, sr, sc = written
    again = _write(study, tmp_path, order=(1, 0))
    sr_again, sc_again = (pydicom.dcmread(path) for path in again.paths)
    for first, second in ((sr, sr_again), (sc, sc_again)):
        assert second.SOPInstanceUID == first.SOPInstanceUID
        assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert [g.tracking_uid for g in _groups(sr_again)] == [g.tracking_uid for g in _groups(sr)]


def test_rerun_into_the_same_folder_replaces_the_files(study, tmp_path):
    first = _write(study, tmp_path)
    second = _write(study, tmp_path)
    assert second.paths == first.paths
    assert sorted(tmp_path.iterdir()) == sorted(first.paths)


def test_another_prompt_set_yields_new_uids(study, written, tmp_path):
    _, sr, sc = written
    other = replace(MODEL, prompt_set_sha256="4" * 64)
    sr_other, sc_other = (pydicom.dcmread(path) for path in _write(study, tmp_path, other).paths)
    uids = {sr.SOPInstanceUID, sr.SeriesInstanceUID, sc.SOPInstanceUID, sc.SeriesInstanceUID}
    assert not uids & {
        sr_other.SOPInstanceUID,
        sr_other.SeriesInstanceUID,
        sc_other.SOPInstanceUID,
        sc_other.SeriesInstanceUID,
    }


def _uids(result) -> set[str]:
    datasets = [pydicom.dcmread(path) for path in result.paths]
    return {ds.SOPInstanceUID for ds in datasets} | {ds.SeriesInstanceUID for ds in datasets}


@pytest.mark.parametrize(
    "other",
    [
        replace(MODEL, backbone_sha256="b" * 64),
        replace(MODEL, backbone="ViT-L-14"),
        DEMO_MODEL,
        replace(MODEL, algorithm_version="0.2.0"),
    ],
    ids=["weights", "architecture", "demo-instead-of-checkpoint", "algorithm-version"],
)
def test_another_backbone_or_algorithm_yields_new_uids(study, written, tmp_path, other):
    result, _, _ = written
    assert not _uids(result) & _uids(_write(study, tmp_path, other))


def test_demo_weights_of_another_seed_yield_new_uids(study, tmp_path):
    first = _write(study, tmp_path / "seed0", DEMO_MODEL)
    again = _write(study, tmp_path / "again", DEMO_MODEL)
    other = _write(study, tmp_path / "seed1", replace(DEMO_MODEL, backbone_seed=1))
    assert _uids(again) == _uids(first)
    assert not _uids(other) & _uids(first)


def _predecessors(sr: pydicom.Dataset) -> list[tuple[str, str, str, str]]:
    """(study, series, SOP class, SOP instance) of each item of the Predecessor Documents Sequence."""
    return [
        (
            study.StudyInstanceUID,
            series.SeriesInstanceUID,
            sop.ReferencedSOPClassUID,
            sop.ReferencedSOPInstanceUID,
        )
        for study in sr.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]


def test_a_late_instance_gives_a_second_version_that_supersedes_the_first(study, tmp_path):
    early = _write(study, tmp_path / "early", order=(0,))
    sr_early = pydicom.dcmread(early.paths[0])
    assert early.version.number == 1 and early.version.replaces is None
    assert "PredecessorDocumentsSequence" not in sr_early
    assert sr_early.SeriesDescription == "dicomnode AI findings"

    late = _write(study, tmp_path / "late", order=(0, 1), latest=early.version)

    sr_late, sc_late = (pydicom.dcmread(path) for path in late.paths)
    assert not _uids(late) & _uids(early)
    assert _predecessors(sr_late) == [
        (sr_early.StudyInstanceUID, sr_early.SeriesInstanceUID, sr_early.SOPClassUID, sr_early.SOPInstanceUID)
    ]
    assert sr_late.SeriesDescription == "dicomnode AI findings v2, replaces v1"
    assert sc_late.SeriesDescription == "dicomnode AI image v2, replaces v1"
    assert late.version.number == 2 and late.version.replaces == early.version.sr
    # The same finding is tracked across the versions of the report.
    assert [g.tracking_uid for g in _groups(sr_late)] == [g.tracking_uid for g in _groups(sr_early)]
    for path in late.paths:
        assert not dciodvfy_errors(path)


def test_a_version_written_again_is_identical_and_one_back_to_earlier_content_is_a_new_version(
    study, tmp_path
):
    first = _write(study, tmp_path / "1", order=(0,))
    second = _write(study, tmp_path / "2", order=(0, 1), latest=first.version)

    again = _write(study, tmp_path / "2-again", order=(1, 0), latest=second.version)
    back = _write(study, tmp_path / "3", order=(0,), latest=second.version)

    assert again.version == second.version and _uids(again) == _uids(second)
    assert _predecessors(pydicom.dcmread(again.paths[0])) == _predecessors(pydicom.dcmread(second.paths[0]))
    assert back.version.number == 3 and back.version.replaces == second.version.sr
    assert not _uids(back) & (_uids(first) | _uids(second))


def test_a_superseding_demo_report_is_marked_and_fits_the_long_string(study, tmp_path):
    first = _write(study, tmp_path / "1", DEMO_MODEL, order=(0,))
    second = _write(study, tmp_path / "2", DEMO_MODEL, latest=first.version)
    sr, sc = (pydicom.dcmread(path) for path in second.paths)
    assert sr.SeriesDescription == "DEMO dicomnode AI findings v2, replaces v1 - no clinical meaning"
    assert sc.SeriesDescription == "DEMO dicomnode AI image v2, replaces v1 - no clinical meaning"
    for number in (1, 2, 10, 12345):
        for kind in ("dicomnode AI findings", "dicomnode AI image"):
            description = series_description(kind, number, demo=True)
            assert description.startswith("DEMO ") and len(description) <= 64
    for path in second.paths:
        assert not dciodvfy_errors(path)


def test_a_latest_version_of_another_study_is_refused(study, written, tmp_path):
    result, _, _ = written
    stranger = replace(result.version, study_instance_uid="1.2.3.4")
    with pytest.raises(ResultsError, match=uid_tag("1.2.3.4")) as refused:
        _write(study, tmp_path, latest=stranger)
    assert "1.2.3.4" not in str(refused.value), "UIDs reach the log as tags only"
    assert not list(tmp_path.iterdir())


def test_demo_model_is_marked_in_series_report_and_image(study, tmp_path):
    sr, sc = (pydicom.dcmread(path) for path in _write(study, tmp_path, DEMO_MODEL).paths)
    assert "DEMO" in sr.SeriesDescription and "DEMO" in sc.SeriesDescription
    for group in _groups(sr):
        (name,) = _items(group, codes.DCM.AlgorithmName)
        assert "DEMO model, random weights, no clinical meaning" in name.value
    banner = sc.pixel_array[:6, :, :].reshape(-1, 3)  # above the banner text
    assert np.all(banner == (200, 0, 0))


def test_real_model_carries_no_demo_marking(written):
    _, sr, sc = written
    for group in _groups(sr):
        (name,) = _items(group, codes.DCM.AlgorithmName)
        assert "DEMO" not in name.value
    top_left = sc.pixel_array[:20, :20, :]
    assert np.all(top_left[..., 0] == top_left[..., 1])


@pytest.mark.parametrize("model", [MODEL, DEMO_MODEL], ids=["real", "demo"])
def test_outputs_pass_dciodvfy(study, tmp_path, model):
    for path in _write(study, tmp_path, model).paths:
        assert not dciodvfy_errors(path)


def test_source_without_orientation_or_body_part_still_passes_dciodvfy(study, tmp_path):
    sources, samples, predictions = study
    bare = [pydicom.Dataset(ds) for ds in sources]
    for ds in bare:
        del ds.PatientOrientation, ds.BodyPartExamined
    result = write_results(
        out_dir=tmp_path,
        sources=bare,
        samples=samples,
        predictions=predictions,
        findings=FINDINGS,
        procedure=CHEST_RADIOGRAPH,
        model=MODEL,
    )
    sc = pydicom.dcmread(result.paths[1])
    assert "PatientOrientation" in sc and not sc.PatientOrientation  # type 2: present, empty
    for path in result.paths:
        assert not dciodvfy_errors(path)


def test_a_source_without_type_2_patient_and_study_attributes_gets_results_that_pass_dciodvfy(
    study, tmp_path
):
    sources, samples, predictions = study
    bare = [pydicom.Dataset(ds) for ds in sources]
    for ds in bare:
        del ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName, ds.AccessionNumber
    result = write_results(
        out_dir=tmp_path,
        sources=bare,
        samples=samples,
        predictions=predictions,
        findings=FINDINGS,
        procedure=CHEST_RADIOGRAPH,
        model=MODEL,
    )
    for path in result.paths:
        written = pydicom.dcmread(path)
        assert "PatientBirthDate" in written and not written.PatientBirthDate
        assert not dciodvfy_errors(path)
    assert "PatientBirthDate" not in bare[0], "the caller's header is left as it was"


def test_sources_from_two_studies_are_refused(study, tmp_path):
    sources, samples, predictions = study
    stranger = pydicom.dcmread(_source_path("RG3_UNCR.dcm"), stop_before_pixels=True)
    with pytest.raises(ResultsError, match=uid_tag(stranger.StudyInstanceUID)) as refused:
        write_results(
            out_dir=tmp_path,
            sources=[sources[0], stranger],
            samples=[samples[0], replace(samples[1], sop_instance_uid=str(stranger.SOPInstanceUID))],
            predictions=[
                predictions[0],
                replace(predictions[1], sop_instance_uid=str(stranger.SOPInstanceUID)),
            ],
            findings=FINDINGS,
            procedure=CHEST_RADIOGRAPH,
            model=MODEL,
        )
    assert str(stranger.StudyInstanceUID) not in str(refused.value), "UIDs reach the log as tags only"
    assert not list(tmp_path.iterdir())


def test_mismatched_inputs_are_refused_naming_the_fault(study, tmp_path):
    sources, samples, predictions = study
    cases = [
        ({"samples": samples[:1]}, "1 samples"),
        ({"predictions": [predictions[1], predictions[0]]}, uid_tag(sources[0].SOPInstanceUID)),
        (
            {"predictions": [replace(predictions[0], probabilities=(0.5,)), predictions[1]]},
            "1 probabilities for 3 findings",
        ),
        (
            {"predictions": [replace(predictions[0], probabilities=(0.5, 1.5, 0.1)), predictions[1]]},
            r"\[0, 1\]",
        ),
        ({"findings": ()}, "no findings"),
    ]
    for change, message in cases:
        arguments = {
            "out_dir": tmp_path,
            "sources": sources,
            "samples": samples,
            "predictions": predictions,
            "findings": FINDINGS,
            "procedure": CHEST_RADIOGRAPH,
            "model": MODEL,
        }
        with pytest.raises(ResultsError, match=message):
            write_results(**{**arguments, **change})


def test_results_room_does_not_import_torch():
    code = "import sys, dicomnode.results; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_new_outbox_folder_of_a_study_is_synced_to_its_parent(study, tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(durable, "fsync_dir", synced.append)

    _write(study, tmp_path / "outbox" / "1.2.3")

    assert tmp_path / "outbox" in synced, "the study folder's entry in outbox/"


def test_the_spool_knows_results_written_into_its_outbox_by_their_uid(study, tmp_path):
    # What the SCP checks when a PACS forwards a result back with its Manufacturer rewritten.
    spool = Spool(tmp_path / "var")
    sources, _, _ = study
    study_uid = str(sources[0].StudyInstanceUID)
    result = _write(study, spool.outbox_dir / study_uid)

    for path in result.paths:
        assert spool.wrote_result(study_uid, str(pydicom.dcmread(path).SOPInstanceUID)), path.name
    assert not spool.wrote_result(study_uid, str(sources[0].SOPInstanceUID))
    spool.close()
