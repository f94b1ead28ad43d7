"""Whole-slide results: the tissue composition, the strongest tiles, and a heat map of the tiles.

A slide reaches the results as one sample per tissue tile, each with its region in the Total
Pixel Matrix of the level it was cut from and, as its display, the slide's thumbnail. Three
things are made of them here:

- the composition: each class's share of the tissue tiles (the tiles whose most probable class
  it is) and the tissue area that share stands for, in mm2, which the SR gives per class;
- the strongest tiles of the slide's first class (the tumour, in the pathology prompt set) as
  TID 1410 planar regions of the SR: a rectangle in the source's Total Pixel Matrix (Pixel Origin
  Interpretation VOLUME) on the instance, and where the tile is one stored frame, that frame;
- the capture: the thumbnail in grey with each tile coloured by its probability of that class,
  the strongest tiles outlined and numbered as in the SR, and the composition written under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from highdicom.sr import (
    CodedConcept,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    PixelOriginInterpretationValues,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    SourceImageForRegion,
    TrackingIdentifier,
)
from PIL import Image, ImageDraw, ImageFont

from dicomnode.flow import Finding, ModelIdentity, Prediction, Sample
from dicomnode.results.sr import CERTAINTY_OF_FINDING, PERCENT, algorithm_identification
from dicomnode.results.uids import name_based_uid

#: How many of the strongest tiles of the first class the SR outlines and the capture numbers.
STRONGEST_TILES = 5
#: Opacity of the tile colours over the grey thumbnail.
HEAT_ALPHA = 0.55
LEGEND_SIZE = 18
OUTLINE = (255, 255, 255)


@dataclass(frozen=True)
class Composition:
    """How a slide's tissue tiles divide among the classes, in the order of the findings."""

    tiles: int
    shares: tuple[float, ...]
    areas_mm2: tuple[float, ...]


def is_slide(samples: Sequence[Sample]) -> bool:
    """True when the samples are tiles of a slide (they carry regions)."""
    return any(sample.region is not None for sample in samples)


def composition(
    samples: Sequence[Sample], predictions: Sequence[Prediction], sources: Sequence[pydicom.Dataset]
) -> Composition:
    """Each class's share of the tiles and the area of those tiles, from the tiles' pixel spacing."""
    counts = np.zeros(len(predictions[0].probabilities))
    areas = np.zeros_like(counts)
    for sample, prediction, source in zip(samples, predictions, sources, strict=True):
        best = int(np.argmax(prediction.probabilities))
        counts[best] += 1
        areas[best] += _tile_area_mm2(sample, source)
    return Composition(
        tiles=len(samples),
        shares=tuple(float(c) for c in counts / len(samples)),
        areas_mm2=tuple(float(a) for a in areas),
    )


def strongest(
    predictions: Sequence[Prediction], finding_index: int = 0, count: int = STRONGEST_TILES
) -> list[int]:
    """Indices of the `count` tiles most probable for the finding, strongest first (ties: first)."""
    order = sorted(range(len(predictions)), key=lambda i: -predictions[i].probabilities[finding_index])
    return order[:count]


def tile_regions(
    *,
    samples: Sequence[Sample],
    predictions: Sequence[Prediction],
    sources: Sequence[pydicom.Dataset],
    finding: Finding,
    model: ModelIdentity,
) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    """TID 1410 groups for the strongest tiles of `finding` (the first class), strongest first.

    Each names the tile as a closed rectangle in the Total Pixel Matrix of its instance and, when
    the tile is one stored frame, that frame, with the tile's probability as Certainty of Finding.
    """
    code = CodedConcept(
        value=finding.code.value, scheme_designator=finding.code.scheme, meaning=finding.code.meaning
    )
    groups = []
    for rank, index in enumerate(strongest(predictions), start=1):
        sample, source = samples[index], sources[index]
        region = sample.region
        corners = np.array(
            [
                (region.column, region.row),
                (region.column + region.columns, region.row),
                (region.column + region.columns, region.row + region.rows),
                (region.column, region.row + region.rows),
                (region.column, region.row),
            ],
            dtype=np.float64,
        )
        frames = [sample.frame] if sample.frame is not None else None
        name = f"{finding.name} tile {rank}"
        # Named like the findings' groups: the same tile rank of this prompt set in this study is
        # the same tracked region in every version of the report.
        tracking_uid = name_based_uid(
            "sr-tile", str(source.StudyInstanceUID), model.prompt_set, f"{finding.name}-{rank}"
        )
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=name),
                referenced_region=ImageRegion(
                    graphic_type=GraphicTypeValues.POLYLINE,
                    graphic_data=corners,
                    source_image=SourceImageForRegion.from_source_image(source, frames),
                    pixel_origin_interpretation=PixelOriginInterpretationValues.VOLUME,
                ),
                finding_type=code,
                algorithm_id=algorithm_identification(model),
                measurements=[
                    Measurement(
                        name=CERTAINTY_OF_FINDING,
                        value=round(100.0 * predictions[index].probabilities[0], 4),
                        unit=PERCENT,
                    )
                ],
            )
        )
    return groups


def slide_samples(samples: Sequence[Sample], sources: Sequence[pydicom.Dataset], around: int) -> list[int]:
    """Indices of the tiles of the slide that tile `around` belongs to (same series)."""
    series = sources[around].SeriesInstanceUID
    return [i for i, ds in enumerate(sources) if ds.SeriesInstanceUID == series and samples[i].region]


def heat_map(
    *,
    samples: Sequence[Sample],
    predictions: Sequence[Prediction],
    sources: Sequence[pydicom.Dataset],
    findings: Sequence[Finding],
    shares: Composition,
) -> np.ndarray:
    """The slide thumbnail in grey, each tile coloured by its probability of the first class.

    The strongest tiles are outlined and numbered as in the SR; under the slide, a colour bar and
    each class's share of the tissue tiles. All tiles are of one slide and share its thumbnail.
    """
    thumbnail = np.asarray(samples[0].display, dtype=np.uint8)
    scale = thumbnail.shape[1] / int(sources[0].TotalPixelMatrixColumns)
    shown = np.repeat(thumbnail[..., np.newaxis], 3, axis=2).astype(np.float32)
    for sample, prediction in zip(samples, predictions, strict=True):
        top, left, bottom, right = _on_thumbnail(sample, scale)
        tile = shown[top:bottom, left:right]
        tile[...] = (1 - HEAT_ALPHA) * tile + HEAT_ALPHA * _ramp(prediction.probabilities[0])
    image = Image.fromarray(np.clip(shown, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, min(24, thumbnail.shape[1] // 40)))
    for rank, index in enumerate(strongest(predictions), start=1):
        top, left, bottom, right = _on_thumbnail(samples[index], scale)
        draw.rectangle((left, top, right - 1, bottom - 1), outline=OUTLINE, width=2)
        draw.text((left + 3, top + 2), str(rank), font=font, fill=OUTLINE)
    return np.asarray(_with_legend(image, findings, shares), dtype=np.uint8)


def _with_legend(image: Image.Image, findings: Sequence[Finding], shares: Composition) -> Image.Image:
    """The slide with a colour bar for the first class and the composition below it."""
    font = ImageFont.load_default(size=LEGEND_SIZE)
    line = LEGEND_SIZE + 8
    columns = 2
    rows = (len(findings) + columns - 1) // columns
    width = max(image.width, 640)
    canvas = Image.new("RGB", (width, image.height + (rows + 3) * line), (0, 0, 0))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = image.height + 8
    bar = 200
    for x in range(bar):
        draw.line((8 + x, y, 8 + x, y + LEGEND_SIZE), fill=tuple(int(v) for v in _ramp(x / (bar - 1))))
    draw.text((16 + bar, y), f"probability of {findings[0].name} per tile (0 to 1)", font=font, fill=OUTLINE)
    y += line
    draw.text((8, y), f"share of {shares.tiles} tissue tiles (most probable class):", font=font, fill=OUTLINE)
    y += line
    for index, finding in enumerate(findings):
        x = 8 + (index % columns) * (width // columns)
        row_y = y + (index // columns) * line
        draw.text((x, row_y), f"{finding.name} {shares.shares[index]:.0%}", font=font, fill=OUTLINE)
    return canvas


def _on_thumbnail(sample: Sample, scale: float) -> tuple[int, int, int, int]:
    """Top, left, bottom, right of a tile on the thumbnail (at least one pixel)."""
    region = sample.region
    top, left = int(region.row * scale), int(region.column * scale)
    bottom = max(top + 1, round((region.row + region.rows) * scale))
    right = max(left + 1, round((region.column + region.columns) * scale))
    return top, left, bottom, right


def _ramp(value: float) -> np.ndarray:
    """A blue-to-red colour for a probability: blue 0, cyan, yellow, red 1."""
    anchors = np.array([(40, 60, 220), (0, 200, 220), (250, 220, 0), (230, 20, 20)], dtype=np.float32)
    position = float(np.clip(value, 0.0, 1.0)) * (len(anchors) - 1)
    low = min(int(position), len(anchors) - 2)
    return anchors[low] + (anchors[low + 1] - anchors[low]) * (position - low)


def _tile_area_mm2(sample: Sample, source: pydicom.Dataset) -> float:
    """The tile's area from its instance's Pixel Spacing (shared functional groups, mm)."""
    spacing = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    return sample.region.rows * float(spacing[0]) * sample.region.columns * float(spacing[1])
