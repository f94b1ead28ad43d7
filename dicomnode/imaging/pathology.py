"""Whole-slide pathology: a VL WSI pyramid becomes tissue tiles at the prompt set's magnification.

A slide is one series of VL Whole Slide Microscopy Image instances (PS3.3 A.32.8): a pyramid of
levels, each level one or several instances (a concatenation), each instance a grid of frames
laid out TILED_FULL or TILED_SPARSE, JPEG or JPEG 2000. wsidicom reads that layout; this module
decides what the model is shown:

1. the coarsest level still at least as fine as the target spacing (0.5 um/px is the 20x of
   most tissue-classification data sets): tiles are cut there and resized to the backbone input,
   so a tile covers the same tissue whatever the scanner's objective, and is never enlarged;
2. a tissue mask from the lowest-resolution level (Otsu on saturation: glass is grey, stained
   tissue is coloured), so background tiles are never decoded at full resolution;
3. at most `max_tiles` tissue tiles, spread evenly over the tissue when there are more, in the
   same order on every run.

Memory stays bounded whatever the slide size: the mask and thumbnail are built chunk by chunk
from the coarsest level, and only one tile of the chosen level is decoded at a time (wsidicom
caches decoded frames up to a fixed size).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import VLWholeSlideMicroscopyImageStorage
from wsidicom import WsiDicom
from wsidicom.config import Settings, use_settings
from wsidicom.errors import (
    WsiDicomError,
    WsiDicomFileError,
    WsiDicomMatchError,
    WsiDicomNotFoundError,
    WsiDicomNotSupportedError,
    WsiDicomOutOfBoundsError,
    WsiDicomStrictRequirementError,
)
from wsidicom.geometry import Point

from dicomnode.flow import InputSpec, Region, Sample
from dicomnode.imaging.common import LUMA_WEIGHTS, ImagingError, to_sample
from dicomnode.privacy import uid_tag

#: 20x: the pixel spacing of the public colorectal tile sets (Kather 2016 at 0.495 um/px,
#: NCT-CRC-HE-100K at 0.5) and of most tissue classifiers.
MICRONS_PER_PIXEL = 0.5
#: A level up to this much coarser than the target still counts as the target's level: scanners
#: quote 0.25 or 0.26 um/px for 40x, and a level at 0.52 um/px must not be refused for 0.5.
SPACING_TOLERANCE = 1.1
#: Enough tiles to find a tumour focus on a biopsy and to estimate class shares on a resection,
#: few enough that one slide does not hold the engine for long.
MAX_TILES = 64
#: A tile is tissue when at least this share of it is tissue in the mask.
MIN_TISSUE = 0.5
#: Longer side of the thumbnail the mask is computed on and the Secondary Capture shows.
THUMBNAIL_SIDE = 1024
#: Saturation below which a pixel is glass whatever Otsu says: on a slide that is all glass
#: Otsu still splits the noise in two.
MIN_SATURATION = 0.07
#: Largest region, in pixels of the coarsest level, decoded at once while building the thumbnail.
CHUNK_SIDE = 2048
#: Decoded frames wsidicom may keep per open slide; its default (100 MiB) is too generous for
#: several slides prepared in parallel worker processes.
DECODED_CACHE_BYTES = 32 * 1024 * 1024

#: What wsidicom and the codecs under it raise for a pyramid they cannot read: corrupt or
#: truncated JPEG / JPEG 2000 streams (OSError from Pillow, RuntimeError from openjpeg), frames
#: or instances that are not there, and headers that contradict each other. All of them mean
#: "this slide cannot be read", never "try again later".
DECODE_FAILURES = (
    OSError,
    RuntimeError,
    ValueError,
    KeyError,
    IndexError,
    WsiDicomError,
    WsiDicomFileError,
    WsiDicomNotFoundError,
    WsiDicomOutOfBoundsError,
    WsiDicomNotSupportedError,
    WsiDicomMatchError,
    WsiDicomStrictRequirementError,
)
#: What pydicom raises for a header it cannot parse (not DICOM, truncated, garbled elements).
HEADER_FAILURES = (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError)
_STREAM_REPR = re.compile(r"<[^<>]* object at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class Tiling:
    """How a slide is cut: target pixel spacing, tile cap and tissue share to keep a tile."""

    microns_per_pixel: float = MICRONS_PER_PIXEL
    max_tiles: int = MAX_TILES
    min_tissue: float = MIN_TISSUE


@dataclass(frozen=True)
class SlideTiles:
    """A slide's tissue tiles ready for the engine, with what the results need to show them.

    Each sample's `region` is (column, row, columns, rows) in the Total Pixel Matrix of the
    level the tiles were cut from, which all that level's instances share; its `frame` is the
    1-based frame number within its instance when the tile is exactly one stored frame, else
    None; its `display` is the slide's thumbnail (the same array for every tile), on which the
    Secondary Capture draws the tile scores. `tissue[i]` is the tissue share of tile i.
    `thumbnail` is the whole slide, RGB uint8, at `thumbnail_scale` thumbnail pixels per pixel
    of the tiled level (`level_size`, columns x rows); `tissue_mask` is the mask on its grid.
    """

    samples: list[Sample]
    tissue: list[float]
    level_size: tuple[int, int]
    microns_per_pixel: float
    thumbnail: np.ndarray
    thumbnail_scale: float
    tissue_mask: np.ndarray


#: The `imaging:` options of a pathology prompt set, with the Tiling field each sets.
OPTIONS = frozenset({"microns_per_pixel", "max_tiles", "min_tissue"})


def prepare(paths: Sequence[Path], spec: InputSpec, options: Mapping[str, object]) -> list[Sample]:
    """The tissue tiles of one slide (the instances of one pyramid) as samples.

    Raises ImagingError, naming what is wrong, for the reasons `tile_slide` gives and for an
    `imaging:` option of the prompt set that is out of range.
    """
    return tile_slide(paths, spec, tiling_from(options)).samples


def tiling_from(options: Mapping[str, object]) -> Tiling:
    """The Tiling a prompt set's `imaging:` options ask for; ImagingError naming a bad one."""
    tiling = Tiling()
    try:
        microns = float(str(options.get("microns_per_pixel", tiling.microns_per_pixel)))
        max_tiles = int(str(options.get("max_tiles", tiling.max_tiles)))
        min_tissue = float(str(options.get("min_tissue", tiling.min_tissue)))
    except ValueError as exc:
        raise ImagingError(f"imaging option of the prompt set is not a number: {exc}") from exc
    if not 0.05 <= microns <= 50:
        raise ImagingError(f"imaging.microns_per_pixel {microns} is outside 0.05 to 50 um/px")
    if max_tiles < 1:
        raise ImagingError(f"imaging.max_tiles {max_tiles} must be at least 1")
    if not 0 < min_tissue <= 1:
        raise ImagingError(f"imaging.min_tissue {min_tissue} must be above 0 and at most 1")
    return Tiling(microns_per_pixel=microns, max_tiles=max_tiles, min_tissue=min_tissue)


def group_by_series(paths: Sequence[Path]) -> list[list[Path]]:
    """A study's files as units: the VL WSI instances of each series form one slide.

    Anything else stays a unit of its own, so that `prepare` refuses it with its own reason
    instead of taking a whole slide down with it. Units come in the order of their first file.
    """
    units: dict[str, list[Path]] = {}
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except HEADER_FAILURES:
            header = None  # alone in its unit, `prepare` refuses it with the reason
        if header is not None and header.get("SOPClassUID") == VLWholeSlideMicroscopyImageStorage:
            key = f"series {header.get('SeriesInstanceUID')}"
        else:
            key = f"file {path}"
        units.setdefault(key, []).append(path)
    return list(units.values())


def tile_slide(paths: Sequence[Path], spec: InputSpec, tiling: Tiling = Tiling()) -> SlideTiles:
    """Open the pyramid made of `paths` and return its tissue tiles as backbone-ready samples.

    Raises ImagingError, naming the instance or level at fault, if a file is not a VL WSI
    instance, the pyramid lacks a level fine enough for `tiling.microns_per_pixel`, the slide
    shows no tissue, or a frame cannot be decoded.
    """
    _require_whole_slide(paths)
    with use_settings(Settings(decoded_frame_cache_size=DECODED_CACHE_BYTES)), _open(paths) as slide:
        level = _target_level(slide, tiling.microns_per_pixel)
        level_size = (level.size.width, level.size.height)
        thumbnail, scale = _thumbnail(slide, level_size)
        mask = tissue_mask(thumbnail)
        extent = max(1, round(spec.image_size * tiling.microns_per_pixel / _microns(level)))
        grid = list(_grid(level_size, extent))
        shares = [_tissue_share(mask, region, scale) for region in grid]
        kept = [index for index, share in enumerate(shares) if share >= tiling.min_tissue]
        if not kept:
            raise ImagingError(
                f"no tissue found on the slide (no {extent}-pixel tile of level {level.level} is at least "
                f"{tiling.min_tissue:.0%} tissue) ({_series_label(slide)})"
            )
        chosen = spread(kept, tiling.max_tiles)
        # One display for all the slide's tiles: pickled once when the tiles leave a worker.
        shown = np.rint(np.clip(thumbnail @ LUMA_WEIGHTS, 0, 255)).astype(np.uint8)
        samples = []
        for index in chosen:
            sample = _tile_sample(slide, level, grid[index], extent, spec)
            samples.append(replace(sample, display=shown))
    return SlideTiles(
        samples=samples,
        tissue=[shares[index] for index in chosen],
        level_size=level_size,
        microns_per_pixel=_microns(level),
        thumbnail=thumbnail,
        thumbnail_scale=scale,
        tissue_mask=mask,
    )


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Tissue (True) against glass on an RGB uint8 image: Otsu's threshold on HSV saturation.

    Stained tissue is saturated and glass is grey whatever the scanner's white balance, so
    saturation separates them where brightness alone would take pale adipose for glass. Very
    dark pixels (pen marks, slide edges) are saturated by noise and are not tissue.
    """
    rgb = thumbnail.astype(np.float32) / 255.0
    value = rgb.max(axis=2)
    saturation = np.where(value > 0, (value - rgb.min(axis=2)) / np.maximum(value, 1e-6), 0.0)
    threshold = max(otsu_threshold(saturation), MIN_SATURATION)
    return (saturation >= threshold) & (value > 0.15)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut that maximises between-class variance."""
    histogram, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    weights = histogram.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(weights)
    above = below[-1] - below
    below_sum = np.cumsum(weights * centres)
    below_mean = below_sum / np.maximum(below, 1)
    above_mean = (below_sum[-1] - below_sum) / np.maximum(above, 1)
    between = below * above * (below_mean - above_mean) ** 2
    # Empty bins between the two populations make a plateau of equal cuts: take its middle, not
    # its first bin, so the cut does not hug the glass.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(edges[int(round(best.mean())) + 1])


def spread(indices: Sequence[int], cap: int) -> list[int]:
    """At most `cap` of `indices`, evenly spaced over them (all of them if there are fewer)."""
    if cap < 1:
        raise ValueError(f"tile cap must be at least 1, got {cap}")
    if len(indices) <= cap:
        return list(indices)
    positions = np.linspace(0, len(indices) - 1, cap).round().astype(int)
    return [indices[position] for position in positions]


def _require_whole_slide(paths: Sequence[Path]) -> None:
    """Refuse a file that is not a VL WSI instance, or a level that lacks part of its instances.

    A level split over several instances (a concatenation, PS3.3 C.7.6.16.2.2.4) numbers its
    parts from 1 and gives each the offset of its first frame; a part that never arrived leaves
    a gap that no reader reports, and its tiles would be read as empty glass.
    """
    if not paths:
        raise ImagingError("no instances: a slide needs at least one VL Whole Slide Microscopy instance")
    parts: dict[str, list[Dataset]] = {}
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError as exc:
            # No path in the message: spool paths are made of UIDs, and this text reaches the logs.
            raise ImagingError("not a DICOM file (no 'DICM' File Meta Information)") from exc
        except HEADER_FAILURES as exc:
            raise ImagingError(f"unreadable DICOM header: {type(exc).__name__}: {exc}") from exc
        sop_class = header.get("SOPClassUID")
        if sop_class != VLWholeSlideMicroscopyImageStorage:
            kind = sop_class.name if sop_class else "dataset without SOP Class UID"
            uid = header.get("SOPInstanceUID")
            raise ImagingError(
                f"{kind} is not a VL Whole Slide Microscopy Image "
                f"(instance {uid_tag(str(uid)) if uid else 'without SOP Instance UID'})"
            )
        if header.get("ConcatenationUID"):
            parts.setdefault(str(header.ConcatenationUID), []).append(header)
    for concatenation, headers in parts.items():
        try:
            _require_every_part(concatenation, headers)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ImagingError):
                raise
            raise ImagingError(
                f"unreadable In-concatenation Number, Frame Offset or Number of Frames: {exc} "
                f"(concatenation {uid_tag(concatenation)})"
            ) from exc


def _require_every_part(concatenation: str, headers: list[Dataset]) -> None:
    """ImagingError naming the first missing part of one level's concatenation, if any."""
    headers = sorted(headers, key=lambda ds: int(ds.get("InConcatenationNumber") or 0))
    total = headers[0].get("InConcatenationTotalNumber")
    expected_offset = 0
    for number, header in enumerate(headers, start=1):
        found = int(header.get("InConcatenationNumber") or 0)
        offset = int(header.get("ConcatenationFrameOffsetNumber") or 0)
        label = f"concatenation {uid_tag(concatenation)}"
        if found != number:
            raise ImagingError(
                f"a pyramid level is missing part {number} of the instances it is split over "
                f"(In-concatenation Number (0020,9162) {found} follows {number - 1}) ({label})"
            )
        if offset != expected_offset:
            raise ImagingError(
                f"a pyramid level's part {number} starts at frame offset {offset} but its parts before "
                f"hold {expected_offset} frames (Concatenation Frame Offset Number (0020,9228)) ({label})"
            )
        expected_offset += int(header.get("NumberOfFrames") or 1)
    if total is not None and len(headers) != int(total):
        raise ImagingError(
            f"a pyramid level has {len(headers)} of the {int(total)} instances of its concatenation "
            f"(In-concatenation Total Number (0020,9163)) (concatenation {uid_tag(concatenation)})"
        )


def _open(paths: Sequence[Path]) -> WsiDicom:
    try:
        return WsiDicom.open(list(paths))
    except WsiDicomNotFoundError as exc:
        raise ImagingError(
            "no pyramid level among the slide's instances: none has Image Type (0008,0008) VOLUME"
        ) from exc
    except DECODE_FAILURES as exc:
        raise ImagingError(f"cannot open the slide's pyramid: {exc}") from exc


def _microns(level) -> float:
    """A level's pixel spacing in micrometres (the coarser axis, if they differ)."""
    return max(level.mpp.width, level.mpp.height)


def _target_level(slide: WsiDicom, microns_per_pixel: float):
    """The coarsest level still fine enough for the target spacing.

    Cutting there and shrinking to the backbone input decodes the fewest pixels without ever
    enlarging a tile. A pyramid whose finest level is coarser than the target has lost its base
    level (or was scanned at too low a magnification): it is refused rather than upsampled.
    """
    levels = sorted(slide.levels, key=_microns)
    fine_enough = [level for level in levels if _microns(level) <= microns_per_pixel * SPACING_TOLERANCE]
    if not fine_enough:
        present = ", ".join(f"level {level.level} at {_microns(level):.3g} um/px" for level in levels)
        raise ImagingError(
            f"no pyramid level at {microns_per_pixel} um/px or finer (present: {present}): the base "
            f"level is missing or the slide was scanned at a lower magnification ({_series_label(slide)})"
        )
    return fine_enough[-1]


def _series_label(slide: WsiDicom) -> str:
    return f"series {uid_tag(str(slide.uids.series_instance))}" if slide.uids else "series without UID"


def _thumbnail(slide: WsiDicom, level_size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The whole slide from its coarsest level, at most THUMBNAIL_SIDE on its longer side.

    Read in chunks of CHUNK_SIDE pixels, each box-filtered down on its own, so that a pyramid
    whose coarsest level is still large (or a slide of a single level) is never decoded whole.
    Returns the image and its scale relative to the tiled level.
    """
    coarsest = max(slide.levels, key=_microns)
    width, height = coarsest.size.width, coarsest.size.height
    factor = max(1, math.ceil(max(width, height) / THUMBNAIL_SIDE))
    chunk = max(factor, CHUNK_SIDE // factor * factor)
    out_width, out_height = math.ceil(width / factor), math.ceil(height / factor)
    thumbnail = np.empty((out_height, out_width, 3), dtype=np.uint8)
    for top in range(0, height, chunk):
        for left in range(0, width, chunk):
            size = (min(chunk, width - left), min(chunk, height - top))
            region = _decode(slide, coarsest, (left, top, *size))
            small = np.asarray(Image.fromarray(region).reduce(factor)) if factor > 1 else region
            row, col = top // factor, left // factor
            thumbnail[row : row + small.shape[0], col : col + small.shape[1]] = small
    return thumbnail, out_width / level_size[0]


def _grid(level_size: tuple[int, int], extent: int) -> Iterator[tuple[int, int, int, int]]:
    """Tiles of `extent` pixels over the level in raster order; edge tiles are clipped."""
    width, height = level_size
    for row in range(0, height, extent):
        for col in range(0, width, extent):
            yield col, row, min(extent, width - col), min(extent, height - row)


def _tissue_share(mask: np.ndarray, region: tuple[int, int, int, int], scale: float) -> float:
    """Share of a tile (in level pixels) that the mask (at `scale`) calls tissue."""
    col, row, width, height = region
    top, left = math.floor(row * scale), math.floor(col * scale)
    bottom = max(top + 1, math.ceil((row + height) * scale))
    right = max(left + 1, math.ceil((col + width) * scale))
    window = mask[top:bottom, left:right]
    return float(window.mean()) if window.size else 0.0


def _tile_sample(
    slide: WsiDicom, level, region: tuple[int, int, int, int], extent: int, spec: InputSpec
) -> Sample:
    """The tile at `region` as a sample of the instance holding its top-left frame.

    The sample names that frame when the tile is exactly one stored frame; a TILED_SPARSE level
    need not store a frame where a tile starts, and such a tile names the level's first instance.
    """
    instance = level.default_instance
    tile_width, tile_height = level.tile_size.width, level.tile_size.height
    col, row, width, height = region
    tiles = instance.image_data.tiles
    stored = [
        tiles.get_frame_index(Point(x, y), instance.default_z, instance.default_path)
        for y in range(row // tile_height, (row + height - 1) // tile_height + 1)
        for x in range(col // tile_width, (col + width - 1) // tile_width + 1)
    ]
    if all(index < 0 for index in stored):
        # Scanners leave glass out of TILED_SPARSE levels, never tissue the thumbnail shows.
        raise ImagingError(
            f"level {level.level} stores no frame at column {col}, row {row}, where the slide shows "
            "tissue: frames or an instance of the level are missing"
        )
    index = stored[0]
    aligned = extent == tile_width == tile_height and col % tile_width == 0 and row % tile_height == 0
    uid, frame = str(instance.datasets[0].uids.instance), None
    for dataset in instance.datasets:
        if dataset.frame_offset <= index < dataset.frame_offset + dataset.frame_count:
            uid = str(dataset.uids.instance)
            frame = index - dataset.frame_offset + 1 if aligned else None
    sample = to_sample(uid, _read_tile(slide, level, region, extent), spec, frame=frame)
    return replace(sample, region=Region(*region))


def _read_tile(slide: WsiDicom, level, region: tuple[int, int, int, int], extent: int) -> np.ndarray:
    """The tile's pixels as float [0, 1] RGB, `extent` square; a clipped edge tile is padded with glass."""
    pixels = _decode(slide, level, region)
    if pixels.shape[:2] != (extent, extent):
        padded = np.full((extent, extent, 3), 255, dtype=np.uint8)
        padded[: pixels.shape[0], : pixels.shape[1]] = pixels
        pixels = padded
    return pixels.astype(np.float32) / 255.0


def _decode(slide: WsiDicom, level, region: tuple[int, int, int, int]) -> np.ndarray:
    """Decode one region of a level as RGB uint8, or say which level and where it failed."""
    col, row, width, height = region
    try:
        pixels = slide.read_region((col, row), level.level, (width, height), as_array=True)
    except DECODE_FAILURES as exc:
        # Pillow names the in-memory stream it was given, address and all: that says nothing.
        reason = _STREAM_REPR.sub("the frame", " ".join(str(exc).split())) or type(exc).__name__
        raise ImagingError(
            f"cannot decode the frames of level {level.level} at column {col}, row {row} "
            f"(transfer syntax {level.default_instance.image_data.transfer_syntax.name}): {reason} "
            f"({_series_label(slide)})"
        ) from exc
    return np.asarray(pixels[..., :3], dtype=np.uint8)
