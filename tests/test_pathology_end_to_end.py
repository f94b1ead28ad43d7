"""Whole slides against real peers: converters write the pyramids, DCMTK sends, Orthanc receives.

Four studies, each one slide, go to a running `dicomnode serve` by storescu: one converted by
OrthancWSIDicomizer (JPEG 2000, levels split over several instances), one written with pydicom
(TILED_FULL, JPEG), one whose base level never arrives and one whose frames cannot be decoded.
The first two are answered in Orthanc by an SR and an SC that dciodvfy accepts; the other two
fail with their reason in `dicomnode status` and the node's log, and hold nothing else up.
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import yaml
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from tests.conftest import dciodvfy_errors, dcmtk, wait_until
from tests.wsi import dicomize, slide_image, tiled_pyramid

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _send(port: int, paths: list[Path], syntax: str) -> None:
    """storescu proposing the files' own compressed transfer syntax (-xv JPEG 2000, -xy JPEG)."""
    sent = dcmtk(
        "storescu",
        "-R",
        syntax,
        "-aec",
        "DICOMNODE",
        "-aet",
        "SCANNER",
        "127.0.0.1",
        str(port),
        *map(str, paths),
    )
    assert sent.returncode == 0, sent.stderr


def _undecodable(paths: list[Path]) -> list[Path]:
    """The pyramid with every frame of its base level cut short."""
    ds = pydicom.dcmread(paths[0])
    frames = list(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    ds.PixelData = encapsulate([frame[:64] for frame in frames])
    ds.save_as(paths[0])
    return paths


def test_slides_sent_by_storescu_are_answered_in_orthanc_and_bad_ones_fail_with_their_reason(
    tmp_path, orthanc, node_factory
):
    routing = tmp_path / "routing.yaml"
    rule = {"name": "slides", "match": {"Modality": ["SM"]}, "prompt_set": "pathology"}
    routing.write_text(yaml.safe_dump({"rules": [rule]}))
    node = node_factory(destinations=[orthanc.destination(backoff_s=0.5)], routing=str(routing))

    converted_study = generate_uid()
    converted = dicomize(
        slide_image(2048, seed=11),
        tmp_path / "converted",
        tile=64,  # the tiny test backbone's input: every tile is one stored frame
        compression="jpeg2000",
        max_size_mb=1,
        header={"StudyInstanceUID": converted_study},
    )
    written = tiled_pyramid(slide_image(2048, seed=12), tmp_path / "written")
    headless = tiled_pyramid(slide_image(2048, seed=13), tmp_path / "headless")[1:]
    broken = _undecodable(tiled_pyramid(slide_image(2048, seed=14), tmp_path / "broken"))
    _send(node.port, converted, "-xv")
    for pyramid in (written, headless, broken):
        _send(node.port, pyramid, "-xy")

    answered = {converted_study, str(pydicom.dcmread(written[0], stop_before_pixels=True).StudyInstanceUID)}
    ids = wait_until(lambda: len(orthanc.instances()) >= 4 and orthanc.instances(), 180, what="results")
    results = [pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{i}/file").content)) for i in ids]
    assert {ds.StudyInstanceUID for ds in results} == answered
    for study in answered:
        classes = sorted(ds.SOPClassUID for ds in results if ds.StudyInstanceUID == study)
        assert classes == sorted([SR_CLASS, SC_CLASS])
    for index, instance in enumerate(ids):
        as_stored = tmp_path / f"from-orthanc-{index}.dcm"
        as_stored.write_bytes(orthanc.get(f"/instances/{instance}/file").content)
        assert dciodvfy_errors(as_stored) == []

    sr = next(ds for ds in results if ds.StudyInstanceUID == converted_study and ds.SOPClassUID == SR_CLASS)
    regions = _regions(sr)
    assert len(regions) == 5
    converted_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in converted}
    for region in regions:
        assert region.PixelOriginInterpretation == "VOLUME" and region.GraphicType == "POLYLINE"
        reference = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID in converted_uids
        assert int(reference.ReferencedFrameNumber) >= 1

    status = wait_until(
        lambda: all(s in (out := node.cli("status").stdout) for s in ("done=2", "failed=2")) and out,
        120,
        what="two studies done and two failed",
    )
    assert status.count("base level is missing") == 1, "a slide's reason is said once, not per instance"
    assert "cannot decode the frames of level 0" in status
    log = node.log.read_text()
    assert "base level is missing" in log and "cannot decode the frames of level 0" in log
    assert "Slide^Test" not in status + log, "patient names stay out of status and logs"


def _regions(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every SCOORD content item of the SR."""
    found = []

    def walk(items) -> None:
        for item in items:
            if item.get("ValueType") == "SCOORD":
                found.append(item)
            walk(item.get("ContentSequence", []))

    walk([sr])
    return found


def test_infer_names_each_tile_of_a_slide_and_writes_its_results(tmp_path, tiny_architecture):
    from tests.conftest import free_port, run_cli, write_node_config

    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port())
    pyramid = tiled_pyramid(slide_image(1024, seed=21), tmp_path / "slide", levels=2)
    out = tmp_path / "out"

    done = run_cli(
        "infer", *map(str, pyramid), "--prompt-set", "pathology", "--config", str(config), "--out", str(out)
    )

    assert done.returncode == 0, done.stderr
    tiles = [line for line in done.stdout.splitlines() if ": prompt set pathology" in line]
    assert tiles and all(" tile at column " in line for line in tiles)
    written = sorted(out.rglob("*.dcm"))
    assert [path.name[:3] for path in written] == ["sc-", "sr-"]
    assert all(dciodvfy_errors(path) == [] for path in written)
