"""Whole-slide pyramids for the tests, written by real converters as a PACS would receive them.

`dicomize` turns a slide image into a VL Whole Slide Microscopy pyramid with OrthancWSIDicomizer
(Debian package orthanc-wsi: TILED_SPARSE instances, one or several per level, JPEG or JPEG 2000
frames). The slide itself and the pydicom-written pyramids (TILED_FULL, and TILED_SPARSE with the
glass left out) come from `dicomnode.bench.slides`, which the imaging benchmark uses too.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from dicomnode.bench.slides import GLASS, slide_image, tiled_pyramid

__all__ = ["GLASS", "dicomize", "slide_image", "tiled_pyramid"]


def dicomize(
    image: np.ndarray,
    folder: Path,
    *,
    levels: int = 3,
    tile: int = 256,
    compression: str = "jpeg",
    spacing_mm: float = 0.0005,
    max_size_mb: int = 0,
    header: dict[str, str] | None = None,
) -> list[Path]:
    """Convert `image` with OrthancWSIDicomizer into `folder`; return the instance files.

    `spacing_mm` is the base level's pixel spacing (0.0005 mm is 20x); `max_size_mb` above 0
    splits large levels into several instances (a concatenation). OrthancWSIDicomizer 1.1 writes
    no Image Type, without which no reader knows a level from a label, so `header` adds it with
    the patient and study attributes. The image is square because that version swaps the
    imaged width and height when it derives the pixel spacing.
    """
    if image.shape[0] != image.shape[1]:
        raise ValueError(f"OrthancWSIDicomizer 1.1 needs a square image, got {image.shape[:2]}")
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "slide.png"
    Image.fromarray(image).save(source)
    dataset = {
        "ImageType": "ORIGINAL\\PRIMARY\\VOLUME\\NONE",
        "PatientName": "Slide^Test",
        "PatientID": "P-WSI",
    }
    dataset.update(header or {})
    dataset_path = folder / "dataset.json"
    dataset_path.write_text(json.dumps(dataset))
    output = folder / "dicom"
    output.mkdir()
    side_mm = image.shape[0] * spacing_mm
    subprocess.run(
        [
            "OrthancWSIDicomizer",
            f"--dataset={dataset_path}",
            f"--folder={output}",
            "--pyramid=1",
            f"--levels={levels}",
            f"--tile-width={tile}",
            f"--tile-height={tile}",
            f"--compression={compression}",
            f"--max-size={max_size_mb}",
            f"--imaged-width={side_mm}",
            f"--imaged-height={side_mm}",
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    source.unlink()
    return sorted(output.glob("*.dcm"))
