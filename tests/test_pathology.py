"""Pathology imaging: real VL WSI pyramids become tissue tiles at the target magnification.

The pyramids are written by OrthancWSIDicomizer (TILED_SPARSE, JPEG and JPEG 2000, levels split
over several instances) and by pydicom (TILED_FULL, and TILED_SPARSE with the glass left out),
from one seeded slide whose tissue blobs are known, so each test can check the tiles against
the pixels they were cut from.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sr.codedict import codes

from dicomnode.flow import InputSpec
from dicomnode.imaging import pathology
from dicomnode.imaging.common import ImagingError
from dicomnode.imaging.pathology import Tiling, otsu_threshold, spread, tile_slide, tissue_mask
from tests.wsi import GLASS, dicomize, slide_image, tiled_pyramid

SPEC = InputSpec(image_size=224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
SIDE = 2048


@pytest.fixture(scope="module")
def slide() -> np.ndarray:
    return slide_image(SIDE, seed=3)


@pytest.fixture(scope="module")
def full_pyramid(slide, tmp_path_factory) -> list[Path]:
    return tiled_pyramid(slide, tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def orthanc_pyramid(slide, tmp_path_factory) -> list[Path]:
    """224-pixel JPEG 2000 frames, so tiles are stored frames; level 0 split over instances."""
    folder = tmp_path_factory.mktemp("orthanc")
    return dicomize(slide, folder, tile=224, compression="jpeg2000", max_size_mb=1)


def headers(paths: list[Path]) -> dict[str, pydicom.Dataset]:
    datasets = (pydicom.dcmread(path, stop_before_pixels=True) for path in paths)
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def box(sample) -> tuple[int, int, int, int]:
    region = sample.region
    return region.column, region.row, region.columns, region.rows


def shown(sample) -> np.ndarray:
    """The tile as the model sees it, back in (rows, columns, RGB) [0, 1] (identity statistics)."""
    return sample.pixels.transpose(1, 2, 0)


def expected_tile(slide: np.ndarray, region: tuple[int, int, int, int], level_scale: int = 1) -> np.ndarray:
    """The region cut from the source image at base resolution, resized to the model input."""
    col, row, width, height = (value * level_scale for value in region)
    block = np.full((height, width, 3), GLASS, dtype=np.uint8)
    part = slide[row : row + height, col : col + width]
    block[: part.shape[0], : part.shape[1]] = part
    resized = Image.fromarray(block).resize((SPEC.image_size, SPEC.image_size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


def test_tiles_of_a_tiled_full_pyramid_are_the_tissue_at_20x(slide, full_pyramid):
    tiles = tile_slide(full_pyramid, SPEC)
    assert tiles.microns_per_pixel == pytest.approx(0.5)
    assert tiles.level_size == (SIDE, SIDE)
    assert 4 <= len(tiles.samples) <= pathology.MAX_TILES
    truth = tissue_mask(slide)
    for sample, tissue in zip(tiles.samples, tiles.tissue, strict=True):
        col, row, width, height = box(sample)
        assert (width, height) == (224, 224) and col % 224 == 0 and row % 224 == 0
        assert truth[row : row + height, col : col + width].mean() >= 0.4
        assert tissue >= pathology.MIN_TISSUE
        assert sample.pixels.shape == (3, 224, 224) and sample.pixels.dtype == np.float32
        assert np.abs(shown(sample) - expected_tile(slide, box(sample))).mean() < 0.03
        # Every tile shows the slide's thumbnail, the very same array.
        assert sample.display is tiles.samples[0].display and sample.display.shape == (512, 512)
    # Frames are 256 pixels, tiles 224: no tile is one stored frame.
    assert {sample.frame for sample in tiles.samples} == {None}
    assert {sample.sop_instance_uid for sample in tiles.samples} == {
        str(pydicom.dcmread(full_pyramid[0], stop_before_pixels=True).SOPInstanceUID)
    }


def test_no_glass_tile_is_kept_and_every_tissue_tile_is(slide, full_pyramid):
    tiles = tile_slide(full_pyramid, SPEC, Tiling(max_tiles=10_000))
    kept = {box(sample)[:2] for sample in tiles.samples}
    truth = tissue_mask(slide)
    for row in range(0, SIDE, 224):
        for col in range(0, SIDE, 224):
            share = truth[row : row + 224, col : col + 224].mean()
            if share > 0.8:
                assert (col, row) in kept
            if share < 0.2:
                assert (col, row) not in kept


def test_orthanc_jpeg2000_tiles_name_the_stored_frame_they_are(slide, orthanc_pyramid):
    tiles = tile_slide(orthanc_pyramid, SPEC, Tiling(max_tiles=10_000))
    by_uid = headers(orthanc_pyramid)
    assert len({sample.sop_instance_uid for sample in tiles.samples}) >= 2, "level 0 spans several instances"
    for sample in tiles.samples:
        assert sample.frame is not None
        source = by_uid[sample.sop_instance_uid]
        assert source.TotalPixelMatrixColumns == SIDE
        position = source.PerFrameFunctionalGroupsSequence[sample.frame - 1].PlanePositionSlideSequence[0]
        assert (
            position.ColumnPositionInTotalImagePixelMatrix - 1,
            position.RowPositionInTotalImagePixelMatrix - 1,
        ) == box(sample)[:2]
        # JPEG 2000 here is lossless: the tile is the source's pixels.
        assert np.abs(shown(sample) - expected_tile(slide, box(sample))).mean() < 0.01


def test_sparse_pyramid_without_glass_frames_gives_the_tiles_of_the_full_one(tmp_path, slide, full_pyramid):
    sparse = tiled_pyramid(slide, tmp_path, sparse=True, skip_background=True)
    assert pydicom.dcmread(sparse[0]).NumberOfFrames < 64, "glass frames were left out"
    full_tiles, sparse_tiles = tile_slide(full_pyramid, SPEC), tile_slide(sparse, SPEC)
    assert [s.region for s in sparse_tiles.samples] == [s.region for s in full_tiles.samples]
    for a, b in zip(full_tiles.samples, sparse_tiles.samples, strict=True):
        assert np.abs(a.pixels - b.pixels).mean() < 0.02


def test_coarser_target_cuts_tiles_from_the_matching_level(slide, full_pyramid):
    at_10x = tile_slide(full_pyramid, SPEC, Tiling(microns_per_pixel=1.0))
    assert at_10x.level_size == (SIDE // 2, SIDE // 2) and at_10x.microns_per_pixel == pytest.approx(1.0)
    assert {box(sample)[2] for sample in at_10x.samples} <= {224, SIDE // 2 - 4 * 224}
    between = tile_slide(full_pyramid, SPEC, Tiling(microns_per_pixel=0.7))
    # No level at 0.7 um/px: the 0.5 level is cut in 314-pixel tiles and shrunk, never enlarged.
    assert between.level_size == (SIDE, SIDE)
    assert {box(sample)[2] for sample in between.samples if box(sample)[0] + 314 <= SIDE} == {314}
    first = at_10x.samples[0]
    assert np.abs(shown(first) - expected_tile(slide, box(first), level_scale=2)).mean() < 0.04


def test_tile_cap_spreads_over_the_tissue_and_repeats(full_pyramid):
    every = [s.region for s in tile_slide(full_pyramid, SPEC, Tiling(max_tiles=10_000)).samples]
    capped = [s.region for s in tile_slide(full_pyramid, SPEC, Tiling(max_tiles=5)).samples]
    again = [s.region for s in tile_slide(full_pyramid, SPEC, Tiling(max_tiles=5)).samples]
    assert len(capped) == 5 and capped == again
    assert capped[0] == every[0] and capped[-1] == every[-1]
    assert set(capped) <= set(every)


def test_spread_keeps_order_ends_and_bounds():
    assert spread([3, 5, 8], 10) == [3, 5, 8]
    assert spread(list(range(100)), 5) == [0, 25, 50, 74, 99]
    with pytest.raises(ValueError, match="at least 1"):
        spread([1, 2], 0)


def test_otsu_splits_two_populations():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.05, 0.01, 5000), rng.normal(0.5, 0.05, 2000)]).clip(0, 1)
    assert 0.1 < otsu_threshold(values) < 0.4


def test_thumbnail_built_in_chunks_equals_the_whole_level(monkeypatch, full_pyramid):
    whole = tile_slide(full_pyramid, SPEC)
    monkeypatch.setattr(pathology, "CHUNK_SIDE", 96)
    monkeypatch.setattr(pathology, "THUMBNAIL_SIDE", 200)
    chunked = tile_slide(full_pyramid, SPEC)
    assert chunked.thumbnail.shape == (171, 171, 3)
    reference = np.asarray(Image.fromarray(whole.thumbnail).reduce(3))
    assert np.abs(chunked.thumbnail.astype(int) - reference.astype(int)).max() <= 1


def test_slide_of_glass_only_is_refused(tmp_path):
    glass = np.full((512, 512, 3), GLASS, dtype=np.uint8)
    noisy = np.clip(glass + np.random.default_rng(1).normal(0, 4, glass.shape), 0, 255).astype(np.uint8)
    with pytest.raises(ImagingError, match="no tissue found on the slide"):
        tile_slide(tiled_pyramid(noisy, tmp_path, levels=2), SPEC)


def test_pyramid_without_its_base_level_is_refused(orthanc_pyramid):
    by_uid = headers(orthanc_pyramid)
    coarse = [
        path
        for path, ds in zip(orthanc_pyramid, by_uid.values(), strict=True)
        if ds.TotalPixelMatrixColumns < SIDE
    ]
    with pytest.raises(ImagingError, match=r"no pyramid level at 0.5 um/px .*base level is missing"):
        tile_slide(coarse, SPEC)


def test_undecodable_frame_names_the_level_and_place(tmp_path, slide):
    paths = tiled_pyramid(slide, tmp_path)
    ds = pydicom.dcmread(paths[0])
    frames = list(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    ds.PixelData = encapsulate([frame[:100] for frame in frames])
    ds.save_as(paths[0])
    expected = r"cannot decode the frames of level 0 at column \d+, row \d+ .*JPEG"
    with pytest.raises(ImagingError, match=expected):
        tile_slide(paths, SPEC)


def test_instances_that_are_not_whole_slide_are_refused(tmp_path, chest_cr, full_pyramid):
    with pytest.raises(ImagingError, match="Computed Radiography Image Storage is not a VL Whole Slide"):
        tile_slide([*full_pyramid, chest_cr], SPEC)
    text = tmp_path / "note.dcm"
    text.write_bytes(b"not dicom")
    with pytest.raises(ImagingError, match="not a DICOM file"):
        tile_slide([text], SPEC)
    with pytest.raises(ImagingError, match="no instances"):
        tile_slide([], SPEC)


def test_whole_slide_instances_without_a_volume_level_are_refused(tmp_path, full_pyramid):
    copies = []
    for path in full_pyramid:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
        copies.append(tmp_path / path.name)
        ds.save_as(copies[-1])
    with pytest.raises(ImagingError, match=r"Image Type \(0008,0008\) VOLUME"):
        tile_slide(copies, SPEC)


def test_converter_output_has_what_the_tests_rely_on(orthanc_pyramid):
    syntaxes = {str(ds.file_meta.TransferSyntaxUID.name) for ds in map(pydicom.dcmread, orthanc_pyramid)}
    assert syntaxes == {"JPEG 2000 Image Compression (Lossless Only)"}
    assert shutil.which("OrthancWSIDicomizer")


def test_domain_groups_a_studys_slides_by_series_and_prepares_each(tmp_path, slide, full_pyramid, chest_cr):
    from dicomnode import imaging, pipeline

    second = tiled_pyramid(slide_image(1024, seed=5), tmp_path / "second", levels=2)
    paths = [full_pyramid[2], second[0], chest_cr, full_pyramid[0], second[1], full_pyramid[1]]
    assert imaging.units("pathology", paths) == [
        [full_pyramid[2], full_pyramid[0], full_pyramid[1]],
        [second[0], second[1]],
        [chest_cr],
    ]
    prepared = pipeline.prepare("pathology", paths, SPEC, options={"max_tiles": 3})
    assert len(prepared.samples) == 3 + len(tile_slide(second, SPEC, Tiling(max_tiles=3)).samples)
    assert [source.SOPInstanceUID for source in prepared.sources] == [
        sample.sop_instance_uid for sample in prepared.samples
    ]
    assert list(prepared.problems) == [chest_cr]
    assert "is not a VL Whole Slide Microscopy Image" in prepared.problems[chest_cr]


def test_prompt_set_imaging_options_set_the_tiling_and_bad_values_are_named(full_pyramid):
    from dicomnode import imaging

    at_10x = imaging.prepare_unit("pathology", full_pyramid, SPEC, {"microns_per_pixel": 1.0, "max_tiles": 2})
    assert len(at_10x) == 2 and all(sample.region.column < SIDE // 2 for sample in at_10x)
    for options, message in (
        ({"max_tiles": 0}, "imaging.max_tiles 0 must be at least 1"),
        ({"min_tissue": 1.5}, "imaging.min_tissue 1.5 must be above 0"),
        ({"microns_per_pixel": "x"}, "imaging option of the prompt set is not a number"),
        ({"microns_per_pixel": 0}, "imaging.microns_per_pixel 0.0 is outside"),
    ):
        with pytest.raises(ImagingError, match=message):
            imaging.prepare_unit("pathology", full_pyramid, SPEC, options)


def test_shipped_pathology_prompt_set_loads_with_its_eight_coded_classes():
    from dicomnode.model.promptset import load_prompt_set
    from tests.conftest import REPO

    prompt_set = load_prompt_set(REPO / "prompts" / "pathology")
    assert prompt_set.domain == "pathology" and prompt_set.task == "multi-class"
    assert [finding.name for finding in prompt_set.findings] == [
        "Tumour",
        "Stroma",
        "Complex",
        "Lymphocytes",
        "Debris",
        "Mucosa",
        "Adipose",
        "Background",
    ]
    assert prompt_set.procedure.value == "252416005"
    assert len({finding.code.value for finding in prompt_set.findings}) == 8


def slide_predictions(samples) -> list:
    """Tumour probability rising from left to right across the slide, the rest shared evenly."""
    from dicomnode.flow import Prediction

    predictions = []
    for sample in samples:
        tumour = round(sample.region.column / SIDE, 6)
        rest = (1.0 - tumour) / 7
        predictions.append(Prediction(sample.sop_instance_uid, (tumour, *[rest] * 7), sample.frame))
    return predictions


def test_slide_results_give_composition_strongest_tiles_and_heat_map(tmp_path, orthanc_pyramid):
    import highdicom as hd

    from dicomnode import pipeline
    from dicomnode.flow import ModelIdentity
    from dicomnode.model.promptset import load_prompt_set
    from dicomnode.results import write_results
    from tests.conftest import REPO, dciodvfy_errors

    prompt_set = load_prompt_set(REPO / "prompts" / "pathology")
    prepared = pipeline.prepare("pathology", orthanc_pyramid, SPEC, options={"max_tiles": 10_000})
    samples, sources = prepared.samples, prepared.sources
    predictions = slide_predictions(samples)
    model = ModelIdentity("dicomnode-pathology", "0.1.0", "pathology", "5" * 64, "ViT-B-16", "a" * 64, False)
    result = write_results(
        out_dir=tmp_path,
        sources=sources,
        samples=samples,
        predictions=predictions,
        findings=prompt_set.findings,
        procedure=prompt_set.procedure,
        model=model,
        aggregation=prompt_set.aggregation,
    )
    sr_path, sc_path = result.paths
    assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(sc_path) == []

    content = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(sr_path)).content
    groups = [*content.get_image_measurement_groups(), *content.get_planar_roi_measurement_groups()]
    by_name = {str(group.tracking_identifier): group for group in groups}
    tumour = [p.probabilities[0] for p in predictions]
    tile_mm2 = 224 * 224 * 0.0005**2
    tumour_tiles = sum(1 for p in predictions if np.argmax(p.probabilities) == 0)
    certainty = by_name["Tumour"].get_measurements(name=codes.DCM.CertaintyOfFinding)[0]
    assert float(certainty.value) == pytest.approx(100 * sum(tumour) / len(tumour), abs=1e-3)
    area = by_name["Tumour"].get_measurements(name=codes.SCT.AreaOfDefinedRegion)[0]
    assert float(area.value) == pytest.approx(tumour_tiles * tile_mm2, rel=1e-4)
    assert str(area.unit.value) == "mm2"

    order = sorted(range(len(samples)), key=lambda i: -tumour[i])[:5]
    for rank, index in enumerate(order, start=1):
        group = by_name[f"Tumour tile {rank}"]
        region = group.roi
        sample = samples[index]
        corner = (sample.region.column, sample.region.row)
        assert region.value[0].tolist() == [float(corner[0]), float(corner[1])]
        assert region.value[2].tolist() == [float(corner[0] + 224), float(corner[1] + 224)]
        assert region.PixelOriginInterpretation == "VOLUME"
        reference = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == sample.sop_instance_uid
        assert int(reference.ReferencedFrameNumber) == sample.frame

    capture = pydicom.dcmread(sc_path)
    strongest = samples[order[0]]
    reference = capture.SourceImageSequence[0]
    assert (reference.ReferencedSOPInstanceUID, int(reference.ReferencedFrameNumber)) == (
        strongest.sop_instance_uid,
        strongest.frame,
    )
    pixels = capture.pixel_array.astype(int)
    assert ((pixels[..., 0] > pixels[..., 2] + 60) & (pixels[..., 1] < 200)).sum() > 100, "warm tiles shown"

    from dicomnode.results import slide as slide_results

    heat = slide_results.heat_map(
        samples=samples,
        predictions=predictions,
        sources=sources,
        findings=prompt_set.findings,
        shares=slide_results.composition(samples, predictions, sources),
    ).astype(int)
    scale = strongest.display.shape[1] / SIDE
    coldest = samples[min(range(len(samples)), key=lambda i: tumour[i])]
    for sample, warm in ((strongest, True), (coldest, False)):
        row, column = (round((value + 150) * scale) for value in (sample.region.row, sample.region.column))
        red, _, blue = heat[row, column]
        assert bool(red > blue + 60) is warm and bool(blue > red + 20) is not warm
    assert max(heat[3, 3]) - min(heat[3, 3]) < 20, "glass away from the tiles stays grey"


def test_study_with_a_bad_slide_fails_that_slide_with_the_reason(tmp_path, full_pyramid, slide):
    from dicomnode import pipeline

    broken = tiled_pyramid(slide, tmp_path / "broken")
    ds = pydicom.dcmread(broken[0])
    frames = list(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    ds.PixelData = encapsulate([frame[:64] for frame in frames])
    ds.save_as(broken[0])
    prepared = pipeline.prepare("pathology", [*broken, *full_pyramid], SPEC)
    assert {sample.sop_instance_uid for sample in prepared.samples} == {
        str(pydicom.dcmread(full_pyramid[0], stop_before_pixels=True).SOPInstanceUID)
    }
    assert set(prepared.problems) == set(broken)
    assert all("cannot decode the frames of level 0" in reason for reason in prepared.problems.values())


def test_level_missing_a_part_of_its_concatenation_is_refused(orthanc_pyramid):
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in orthanc_pyramid]
    base = [
        (int(ds.InConcatenationNumber), path)
        for ds, path in zip(headers, orthanc_pyramid, strict=True)
        if ds.TotalPixelMatrixColumns == SIDE
    ]
    assert len(base) >= 3, "the converter split the base level"
    second = dict(base)[2]
    with pytest.raises(ImagingError, match=r"missing part 2 of the instances it is split over"):
        tile_slide([path for path in orthanc_pyramid if path != second], SPEC)


def test_sparse_level_without_the_frames_of_tissue_is_refused(tmp_path, slide):
    paths = tiled_pyramid(slide, tmp_path, sparse=True, skip_background=True)
    ds = pydicom.dcmread(paths[0])
    frames = list(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    keep = len(frames) // 3
    ds.PixelData = encapsulate(frames[:keep])
    ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[:keep]
    ds.NumberOfFrames = keep
    ds.save_as(paths[0])
    with pytest.raises(
        ImagingError, match=r"level 0 stores no frame at column \d+, row \d+, where the slide"
    ):
        tile_slide(paths, SPEC, Tiling(max_tiles=10_000))


def test_truncated_instance_is_its_own_unit_and_refused_with_the_reason(tmp_path, full_pyramid):
    from dicomnode import pipeline

    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(full_pyramid[1].read_bytes()[:400])
    paths = [*full_pyramid, truncated]
    prepared = pipeline.prepare("pathology", paths, SPEC, options={"max_tiles": 2})
    assert len(prepared.samples) == 2
    assert list(prepared.problems) == [truncated]
    # pydicom reads what the header still holds: no SOP Class UID is left to call it a slide.
    assert prepared.problems[truncated] == (
        "dataset without SOP Class UID is not a VL Whole Slide Microscopy Image "
        "(instance without SOP Instance UID)"
    )


@pytest.mark.parametrize("sparse", [False, True], ids=["TILED_FULL", "TILED_SPARSE"])
def test_written_pyramids_are_valid_and_highdicom_reads_the_slide_back(tmp_path, sparse):
    import highdicom as hd

    from tests.conftest import dciodvfy_errors

    image = slide_image(1024, seed=2)
    paths = tiled_pyramid(image, tmp_path, levels=2, sparse=sparse)
    for path in paths:
        assert dciodvfy_errors(path) == []
    matrix = hd.imread(str(paths[0])).get_total_pixel_matrix()
    assert matrix.shape == image.shape
    assert np.abs(matrix - image.astype(np.float64)).mean() < 8, "JPEG at quality 90 of the same slide"


def test_a_large_slide_of_one_level_is_read_in_bounded_memory(tmp_path):
    import tracemalloc

    side = 8192  # one level of 8192 x 8192 RGB: 201 MB decoded at once
    paths = tiled_pyramid(slide_image(side, seed=4), tmp_path, levels=1)
    tracemalloc.start()
    try:
        tiles = tile_slide(paths, SPEC, Tiling(max_tiles=16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(tiles.samples) == 16 and tiles.thumbnail.shape == (1024, 1024, 3)
    assert peak < 100 * 2**20, f"peak {peak / 2**20:.0f} MiB: the level was decoded whole"
