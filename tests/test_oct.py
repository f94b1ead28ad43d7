"""Retinal OCT end to end: every B-scan a sample, study results that name the frames behind them.

Volumes are built by the tests as real DICOM (Ophthalmic Tomography, and the Secondary Capture
exports of older devices), sent by DCMTK's storescu where a peer is involved, and the outputs
are judged by dciodvfy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from dicomnode import imaging
from dicomnode.engine import Engine
from dicomnode.flow import Aggregation, Code, Finding, InputSpec, ModelIdentity, Prediction
from dicomnode.imaging import ImagingError
from dicomnode.model.promptset import PromptSetError, load_prompt_set
from dicomnode.pipeline import classify
from dicomnode.results import write_results
from tests.conftest import REPO, dciodvfy_errors, dcmtk, tiny_backbone, wait_until
from tests.synthetic import oct_volume

SPEC = InputSpec(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
OCT_PROCEDURE = Code("1", "99TEST", "Test OCT procedure")
FINDINGS = (
    Finding("lesion", Code("2", "99TEST", "Test lesion"), threshold=0.5),
    Finding("normal", Code("3", "99TEST", "Test normal"), threshold=0.5),
)
MODEL = ModelIdentity("dicomnode-oct-zeroshot", "0.1.0", "oct", "4" * 64, "tiny", "b" * 64, demo=False)


def _saved(ds: pydicom.Dataset, folder: Path, name: str) -> Path:
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_every_b_scan_of_a_volume_is_a_sample_numbered_by_its_frame(tmp_path):
    path = _saved(oct_volume(6, lesion_frames=[4]), tmp_path, "volume.dcm")
    samples = imaging.prepare_unit("oct", [path], SPEC)
    assert [s.frame for s in samples] == [1, 2, 3, 4, 5, 6]
    assert all(s.pixels.shape == (3, 32, 32) for s in samples)
    # The lesion frame is the one that looks different: frames are not mixed up.
    means = [s.display.mean() for s in samples]
    assert int(np.argmin(means)) == 4


def test_a_compressed_volume_gives_the_samples_of_the_uncompressed_one(tmp_path):
    volume = oct_volume(4, lesion_frames=[1])
    plain = imaging.prepare_unit("oct", [_saved(volume, tmp_path, "plain.dcm")], SPEC)
    volume.compress(RLELossless)
    rle = imaging.prepare_unit("oct", [_saved(volume, tmp_path, "rle.dcm")], SPEC)
    for a, b in zip(plain, rle, strict=True):
        assert a.frame == b.frame
        np.testing.assert_array_equal(a.display, b.display)


def test_secondary_capture_exports_of_older_devices_are_read(tmp_path):
    single = imaging.prepare_unit(
        "oct", [_saved(oct_volume(1, sop_class=SecondaryCaptureImageStorage), tmp_path, "sc.dcm")], SPEC
    )
    assert [s.frame for s in single] == [None]
    colour = oct_volume(3, sop_class=MultiFrameTrueColorSecondaryCaptureImageStorage, colour=True)
    samples = imaging.prepare_unit("oct", [_saved(colour, tmp_path, "rgb.dcm")], SPEC)
    assert [s.frame for s in samples] == [1, 2, 3]
    assert samples[0].display.ndim == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ds: setattr(ds, "NumberOfFrames", 0), r"Number of Frames \(0028,0008\) is '0': no frame"),
        (lambda ds: setattr(ds, "PixelData", ds.PixelData[: 64 * 64 * 2]), "Pixel Data|frames"),
        (lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.1"), "not Ophthalmic Tomography"),
        (lambda ds: delattr(ds, "PixelData"), r"no Pixel Data \(7FE0,0010\)"),
    ],
    ids=["no-frames", "truncated", "not-oct", "no-pixels"],
)
def test_a_broken_volume_is_refused_naming_what_is_wrong(tmp_path, change, message):
    volume = oct_volume(4)
    change(volume)
    with pytest.raises(ImagingError, match=message):
        imaging.prepare_unit("oct", [_saved(volume, tmp_path, "bad.dcm")], SPEC)


def test_a_volume_short_of_frames_is_refused_even_after_a_whole_one(tmp_path):
    whole = _saved(oct_volume(4), tmp_path, "whole.dcm")
    short = oct_volume(4)
    short.compress(RLELossless)
    frames = list(generate_frames(short.PixelData, number_of_frames=4))
    short.PixelData = encapsulate(frames[:2])  # two B-scans where Number of Frames says four
    short = _saved(short, tmp_path, "short.dcm")
    for paths in ([short], [whole, short]):
        with pytest.raises(
            ImagingError, match=r"Pixel Data holds 2 frames, Number of Frames \(0028,0008\) says 4"
        ):
            imaging.prepare_unit("oct", paths, SPEC)


def test_an_undecodable_frame_is_refused_naming_the_transfer_syntax(tmp_path):
    volume = oct_volume(3)
    volume.compress(RLELossless)
    frames = list(generate_frames(volume.PixelData, number_of_frames=3))
    # The last frame keeps its RLE header but loses the segments it points at.
    volume.PixelData = encapsulate([*frames[:2], frames[2][:64]])
    with pytest.raises(ImagingError, match="RLE Lossless"):
        imaging.prepare_unit("oct", [_saved(volume, tmp_path, "bad.dcm")], SPEC)


def test_more_b_scans_than_the_prompt_set_reads_are_refused_before_decoding(tmp_path):
    path = _saved(oct_volume(5), tmp_path, "big.dcm")
    with pytest.raises(ImagingError, match=r"more than the 4 B-scans .*imaging.max_frames"):
        imaging.prepare_unit("oct", [path], SPEC, {"max_frames": 4})


def test_the_shipped_oct_set_is_multi_class_top_k_and_rejects_unknown_imaging_options(tmp_path):
    shipped = load_prompt_set(REPO / "prompts" / "oct")
    assert (shipped.domain, shipped.task) == ("oct", "multi-class")
    assert shipped.aggregation.method == "top-k" and shipped.aggregation.k > 1
    assert all(f.code.scheme == "SCT" for f in shipped.findings)
    content = yaml.safe_load((REPO / "prompts" / "oct" / "promptset.yaml").read_text())
    content["imaging"] = {"max_frame": 10}
    (tmp_path / "oct").mkdir()
    (tmp_path / "oct" / "promptset.yaml").write_text(yaml.safe_dump(content))
    with pytest.raises(PromptSetError, match=r"imaging.max_frame: not an option of domain 'oct'"):
        load_prompt_set(tmp_path / "oct")


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [(Aggregation("max"), 0.9), (Aggregation("mean"), 0.4), (Aggregation("top-k", 2), 0.75)],
)
def test_aggregation_makes_one_probability_per_finding(aggregation, expected):
    assert aggregation.combine([0.1, 0.9, 0.6, 0.2, 0.2]) == pytest.approx(expected)


def _oct_results(tmp_path: Path, aggregation: Aggregation):
    """Write the results of a 5-frame volume whose frames 2 and 4 score highest for `lesion`."""
    path = _saved(oct_volume(5, lesion_frames=[1, 3]), tmp_path, "volume.dcm")
    samples = imaging.prepare_unit("oct", [path], SPEC)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    lesion = (0.1, 0.8, 0.2, 0.7, 0.05)
    predictions = [
        Prediction(header.SOPInstanceUID, (p, 1.0 - p), frame)
        for p, frame in zip(lesion, range(1, 6), strict=True)
    ]
    result = write_results(
        out_dir=tmp_path / "out",
        sources=[header] * 5,
        samples=samples,
        predictions=predictions,
        findings=FINDINGS,
        procedure=OCT_PROCEDURE,
        model=MODEL,
        aggregation=aggregation,
    )
    return header, [pydicom.dcmread(p) for p in result.paths]


def _group_frames(sr: pydicom.Dataset) -> dict[str, list[int]]:
    """Per finding group of the SR, the frame numbers its source image reference names."""
    frames = {}
    for container in sr.ContentSequence:
        for group in container.get("ContentSequence", []):
            items = group.get("ContentSequence", [])
            name = [
                i.ConceptCodeSequence[0].CodeMeaning
                for i in items
                if i.ConceptNameCodeSequence[0].CodeValue == "121071"
            ]
            refs = [i.ReferencedSOPSequence[0] for i in items if i.ValueType == "IMAGE"]
            if name and refs:
                frames[name[0]] = [int(f) for f in refs[0].ReferencedFrameNumber]
    return frames


def test_the_sr_names_the_b_scans_that_drove_each_finding_and_passes_dciodvfy(tmp_path):
    header, (sr, sc) = _oct_results(tmp_path, Aggregation("top-k", 2))
    frames = _group_frames(sr)
    assert frames["Test lesion"] == [2, 4, 3]
    assert frames["Test normal"] == [5, 1, 3]
    measured = [
        item.MeasuredValueSequence[0].NumericValue
        for container in sr.ContentSequence
        for group in container.get("ContentSequence", [])
        for item in group.get("ContentSequence", [])
        if item.ValueType == "NUM"
    ]
    assert [float(v) for v in measured] == pytest.approx([75.0, 92.5])
    reference = sc.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == header.SOPInstanceUID
    # The capture shows the evidence of the leading finding (the most probable present one).
    assert [int(f) for f in reference.ReferencedFrameNumber] == [5, 1, 3]
    for path in tmp_path.joinpath("out").iterdir():
        assert not dciodvfy_errors(path), path.name


def test_the_capture_shows_the_driving_b_scans_side_by_side(tmp_path):
    _, (_, capture) = _oct_results(tmp_path, Aggregation("max"))
    assert [int(f) for f in capture.SourceImageSequence[0].ReferencedFrameNumber] == [5, 1, 3]
    # Three square B-scans in a row, scaled to the capture's image width: a third as high as a
    # single square B-scan's capture would be (which is as high as it is wide).
    assert capture.Rows < capture.Columns / 3


def test_classify_runs_every_b_scan_through_the_engine_a_batch_at_a_time(tmp_path, tiny_architecture):
    prompt_set = load_prompt_set(REPO / "prompts" / "oct")
    volume = _saved(oct_volume(7, lesion_frames=[2]), tmp_path, "volume.dcm")
    outcomes = {}
    for max_batch in (3, 16):
        engine = Engine(tiny_backbone(tiny_architecture), max_batch=max_batch)
        try:
            outcomes[max_batch] = classify(engine, prompt_set, [volume]).predictions
            largest = max(images for _, images, _ in engine.recent_batches)
        finally:
            engine.stop()
        assert largest <= max_batch
    assert [p.frame for p in outcomes[3]] == [1, 2, 3, 4, 5, 6, 7]
    assert len({p.probabilities for p in outcomes[3]}) > 1
    assert all(sum(p.probabilities) == pytest.approx(1.0, abs=1e-4) for p in outcomes[3])
    for small, whole in zip(outcomes[3], outcomes[16], strict=True):
        assert small.probabilities == pytest.approx(whole.probabilities, abs=1e-5)


def test_an_oct_volume_sent_by_storescu_is_answered_in_orthanc_with_frames_named(
    tmp_path, orthanc, node_factory
):
    routing = tmp_path / "routing.yaml"
    routing.write_text(
        yaml.safe_dump({"rules": [{"name": "oct", "match": {"Modality": ["OPT"]}, "prompt_set": "oct"}]})
    )
    node = node_factory(destinations=[orthanc.destination(backoff_s=0.5)], routing=str(routing))
    volume = _saved(oct_volume(8, lesion_frames=[5], key="e2e"), tmp_path, "volume.dcm")
    sent = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(volume))
    assert sent.returncode == 0, sent.stderr
    ids = wait_until(lambda: len(orthanc.instances()) >= 2 and orthanc.instances(), 90, what="results")
    results = {}
    for index, instance in enumerate(ids):
        path = tmp_path / f"result-{index}.dcm"
        path.write_bytes(orthanc.get(f"/instances/{instance}/file").content)
        assert not dciodvfy_errors(path)
        ds = pydicom.dcmread(path)
        results[ds.Modality] = ds
    frames = _group_frames(results["SR"])
    assert frames and all(1 <= f <= 8 for named in frames.values() for f in named)
    assert "ReferencedFrameNumber" in results["OT"].SourceImageSequence[0]
