"""Chest radiographs: accept a single grayscale projection image and prepare it for the model.

The routing rules decide that a study is a chest X-ray; this module is the safety net that
refuses what a CXR prompt set cannot sensibly score (cross-sectional slices, colour captures,
multi-frame objects, objects without pixels), with a message that says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pydicom.dataset import Dataset

from dicomnode.flow import InputSpec, Sample
from dicomnode.imaging.common import (
    GRAYSCALE,
    ImagingError,
    display_pixels,
    instance_label,
    needed_side,
    read_dataset,
    require_pixel_data,
    to_sample,
)

# Projection radiography as it reaches a PACS: CR and DX from detectors, RG (PS3.3 C.7.3.1.1.1),
# and OT because digitised films and secondary captures of radiographs are labelled so.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "RG", "OT"})


def prepare(path: Path, spec: InputSpec) -> Sample:
    """Read one stored instance and return it as a backbone-ready `Sample`.

    Raises ImagingError if the file is not DICOM or not a single-frame grayscale projection
    image, or if its pixels cannot be decoded.
    """
    ds = read_dataset(path)
    _require_projection_image(ds)
    return to_sample(str(ds.SOPInstanceUID), display_pixels(ds, min_side=needed_side(spec)), spec)


def prepare_each(paths: Sequence[Path], spec: InputSpec, options: Mapping[str, object]) -> list[Sample]:
    """One sample per radiograph: the domain's unit is one instance (no options)."""
    return [prepare(path, spec) for path in paths]


def _require_projection_image(ds: Dataset) -> None:
    """Refuse what a chest radiograph model must not score, naming the attribute at fault."""
    require_pixel_data(ds)
    if "SOPInstanceUID" not in ds:
        raise ImagingError("no SOP Instance UID (0008,0018): results could not reference it")
    label = instance_label(ds)
    modality = str(ds.get("Modality") or "")
    if modality not in PROJECTION_MODALITIES:
        raise ImagingError(
            f"Modality (0008,0060) {modality!r} is not a projection radiograph "
            f"(expected one of {sorted(PROJECTION_MODALITIES)}) ({label})"
        )
    photometric = str(ds.get("PhotometricInterpretation") or "")
    if ds.get("SamplesPerPixel", 1) != 1 or photometric not in GRAYSCALE:
        raise ImagingError(
            f"Photometric Interpretation (0028,0004) {photometric!r} is not grayscale ({label})"
        )
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames != 1:
        raise ImagingError(f"Number of Frames (0028,0008) is {frames}, expected 1 ({label})")
