"""`dicomnode bench imaging`: decode plus preprocessing rate beside the engine's consumption rate.

Imaging runs on CPU worker processes while the engine runs on the device; the node keeps up
only if the workers prepare samples at least as fast as the engine consumes them. For each kind
of input the same preparer the node uses is timed on one core, unit by unit (an instance, a
volume, a slide), and its samples per second are set beside the images per second of the
configured backbone's image tower on its device, measured in the same run at the engine's batch
size. The ratio says how many imaging workers one device needs.

The inputs are real encoded files: pydicom-data's JPEG 2000 chest radiograph (1955 x 1841,
RG1_J2KR.dcm) unless another is given; an OCT volume written here as devices store one (an
Ophthalmic Tomography object of 128 B-scans of 496 x 512, JPEG baseline frames); and a whole-slide
pyramid written here (40x base level, JPEG tiles, see `dicomnode.bench.slides`) that is tiled at
20x as a pathology prompt set would. Nothing is downloaded.
"""

from __future__ import annotations

import io
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, OphthalmicTomographyImageStorage, generate_uid

from dicomnode.bench import BenchError
from dicomnode.bench.infer import backbone_autocast, time_calls
from dicomnode.bench.slides import slide_image, tiled_pyramid
from dicomnode.flow import InputSpec
from dicomnode.imaging import ImagingError, cxr, oct, pathology
from dicomnode.model.backbone import Backbone

#: The benchmark slide: 8192 pixels a side at 0.25 um/px (a 2 mm field at 40x), four levels.
SLIDE_SIDE = 8192
SLIDE_SPACING_MM = 0.00025
SLIDE_LEVELS = 4
#: The benchmark OCT volume: a dense macular cube as a Spectralis stores it.
OCT_B_SCANS = 128
OCT_ROWS, OCT_COLUMNS = 496, 512


@dataclass(frozen=True)
class ImagingResult:
    """Decode plus preprocessing of one kind of input, against the engine's rate."""

    input: str
    description: str
    samples_per_unit: int
    unit_ms: float
    samples_per_s: float
    engine_images_per_s: float
    workers_to_feed_engine: int


def bench_imaging(
    backbone: Backbone,
    report: Callable[[str], None],
    *,
    radiograph: Path,
    rounds: int = 3,
    batch: int = 32,
    slide_side: int = SLIDE_SIDE,
) -> dict:
    """Time each input's preparer and the backbone; return the JSON document of the figures."""
    device = backbone.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report(f"imaging: decode + preprocessing on 1 CPU core; engine: {backbone.architecture} on {name}")
    engine_rate = engine_images_per_s(backbone, batch, rounds)
    report(f"  engine (image tower, batch {batch}): {engine_rate:10.1f} img/s")
    spec = backbone.input_spec
    results = [_radiograph(radiograph, spec, rounds, engine_rate)]
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-imaging-") as tmp:
        results.append(_oct(Path(tmp), spec, rounds, engine_rate))
        results.append(_slide(Path(tmp), slide_side, spec, rounds, engine_rate))
    for row in results:
        ratio = row.engine_images_per_s / row.samples_per_s
        report(
            f"  {row.input:10s} {row.samples_per_unit:5d} samples/unit  {row.unit_ms:9.1f} ms/unit  "
            f"{row.samples_per_s:9.1f} samples/s  engine/imaging {ratio:7.2f}x"
            f"  -> {row.workers_to_feed_engine} workers  ({row.description})"
        )
    return {
        "device": name,
        "architecture": backbone.architecture,
        "demo_weights": backbone.demo,
        "batch": batch,
        "engine_images_per_s": engine_rate,
        "results": [asdict(row) for row in results],
    }


def engine_images_per_s(backbone: Backbone, batch: int, rounds: int) -> float:
    """Images per second of the bare image tower on its device, as the engine runs it."""
    size = backbone.input_spec.image_size
    pixels = torch.randn(batch, 3, size, size, device=backbone.device).to(backbone.input_dtype)

    def run():
        with torch.inference_mode(), backbone_autocast(backbone):
            return backbone.model.encode_image(pixels)

    seconds = time_calls(run, backbone.device, iterations=max(rounds, 3), warmup=2)
    return batch * len(seconds) / sum(seconds)


def _radiograph(path: Path, spec: InputSpec, rounds: int, engine_rate: float) -> ImagingResult:
    try:
        seconds = _unit_seconds(lambda: [cxr.prepare(path, spec)], rounds)
    except ImagingError as exc:
        raise BenchError(f"the radiograph {path.name} cannot be prepared: {exc}") from exc
    return _result("radiograph", f"{path.name}, chest preparer", 1, seconds, engine_rate)


def _oct(folder: Path, spec: InputSpec, rounds: int, engine_rate: float) -> ImagingResult:
    path = folder / "oct.dcm"
    oct_volume(OCT_B_SCANS).save_as(path, enforce_file_format=True)
    seconds = _unit_seconds(lambda: oct.prepare([path], spec, {}), rounds)
    description = f"{OCT_B_SCANS} B-scans of {OCT_ROWS}x{OCT_COLUMNS}, JPEG baseline, OCT preparer"
    return _result("oct", description, OCT_B_SCANS, seconds, engine_rate)


def oct_volume(b_scans: int, seed: int = 0) -> Dataset:
    """An Ophthalmic Tomography volume of speckled retinal layers, one JPEG frame per B-scan."""
    rng = np.random.default_rng(seed)
    rows = np.arange(OCT_ROWS)[:, np.newaxis]
    columns = np.arange(OCT_COLUMNS)[np.newaxis, :]
    frames = []
    for index in range(b_scans):
        surface = 150 + 30 * np.sin(columns / 80 + index / 20)
        depth = rows - surface
        layers = np.where((depth > 0) & (depth < 200), 90 + 60 * np.cos(depth / 12) ** 2, 10)
        scan = np.clip(layers * rng.gamma(4.0, 0.25, size=(OCT_ROWS, OCT_COLUMNS)), 0, 255).astype(np.uint8)
        stream = io.BytesIO()
        Image.fromarray(scan).save(stream, format="JPEG", quality=90)
        frames.append(stream.getvalue())
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID = OphthalmicTomographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "OPT", "BENCH"
    ds.Rows, ds.Columns, ds.NumberOfFrames = OCT_ROWS, OCT_COLUMNS, b_scans
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return ds


def _slide(folder: Path, side: int, spec: InputSpec, rounds: int, engine_rate: float) -> ImagingResult:
    paths = tiled_pyramid(slide_image(side, seed=0), folder, levels=SLIDE_LEVELS, spacing_mm=SLIDE_SPACING_MM)
    tiling = pathology.Tiling(max_tiles=10_000)
    count = len(pathology.tile_slide(paths, spec, tiling).samples)
    seconds = _unit_seconds(lambda: pathology.tile_slide(paths, spec, tiling).samples, rounds)
    description = (
        f"{side}x{side} px pyramid at {SLIDE_SPACING_MM * 1000:g} um/px, {SLIDE_LEVELS} levels, JPEG, "
        f"every tissue tile at {pathology.MICRONS_PER_PIXEL} um/px"
    )
    return _result("wsi", description, count, seconds, engine_rate)


def _unit_seconds(prepare: Callable[[], Sequence[object]], rounds: int) -> float:
    """Median seconds to prepare one unit (first call included: the node sees each file once)."""
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        prepare()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def _result(kind: str, description: str, samples: int, seconds: float, engine_rate: float) -> ImagingResult:
    rate = samples / seconds
    return ImagingResult(
        input=kind,
        description=description,
        samples_per_unit=samples,
        unit_ms=seconds * 1e3,
        samples_per_s=rate,
        engine_images_per_s=engine_rate,
        workers_to_feed_engine=max(1, math.ceil(engine_rate / rate)),
    )
