"""The study's findings burned into a Secondary Capture image, for viewers that ignore SR.

Every PACS viewer shows an image; far fewer render a TID 1500 report. The Secondary Capture is
the source image, scaled, with a panel beside it listing each finding, its probability and the
decision, the algorithm that produced them and, for a demo model, a red banner across the top.
The panel sits beside the image rather than over it so that no anatomy is hidden.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pydicom
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.valuerep import VR

from dicomnode.flow import ModelIdentity
from dicomnode.identity import NODE_MANUFACTURER
from dicomnode.results.sr import StudyFinding

# The longer side of the source image in the capture: large enough to read, small enough to
# send and store cheaply. The panel and banner are added to it.
IMAGE_SIDE = 1024
PANEL_WIDTH = 520
MARGIN = 16

TITLE_SIZE = 26
TEXT_SIZE = 20
SMALL_SIZE = 16
BANNER_HEIGHT = 52

WHITE = (255, 255, 255)
GREY = (170, 170, 170)
PRESENT_COLOUR = (255, 190, 0)
BANNER_RED = (200, 0, 0)
PANEL_BACKGROUND = (0, 0, 0)

# Pillow's built-in font has no em dash; the banner stays ASCII so it renders everywhere.
DEMO_BANNER = "DEMO - NO CLINICAL MEANING (random weights)"

# Columns of the findings table, from the panel's left edge.
PROBABILITY_COLUMN = 250
DECISION_COLUMN = 350


def build_secondary_capture(
    *,
    source: pydicom.Dataset,
    display: np.ndarray,
    findings: Sequence[StudyFinding],
    model: ModelIdentity,
    basis: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str,
    frames: Sequence[int] = (),
) -> SCImage:
    """An RGB Secondary Capture of `display` annotated with `findings`, in `source`'s study.

    `display` is the source image as a viewer shows it (uint8, rows x columns), or its `frames`
    side by side; `basis` says what the study-level probabilities were taken over, stated in the
    panel ("highest over 2 images").
    """
    pixels = render_findings(display=display, findings=findings, model=model, basis=basis)
    capture = SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=NODE_MANUFACTURER,
        # highdicom insists on an orientation for the PATIENT coordinate system and accepts
        # single letters only; the source's own value replaces this one below.
        patient_orientation=("L", "F"),
        series_description=series_description,
        manufacturer_model_name=model.algorithm_name[:64],
        software_versions=model.algorithm_version[:64],
    )
    # Scaling keeps the directions of rows and columns, so the source's orientation (oblique
    # ones included) holds for the capture; unknown, it is left empty as PS3.3 allows for
    # Patient Orientation (General Image module, type 2C).
    capture.PatientOrientation = _patient_orientation(source)
    _copy_anatomy(source, capture)
    capture.BurnedInAnnotation = "YES"
    capture.DerivationDescription = "Source image with AI findings burned in by dicomnode"
    capture.SourceImageSequence = [_source_reference(source, frames)]
    return capture


def render_findings(
    *,
    display: np.ndarray,
    findings: Sequence[StudyFinding],
    model: ModelIdentity,
    basis: str,
) -> np.ndarray:
    """The annotated capture as an RGB uint8 array (rows, columns, 3)."""
    image = _scaled(display)
    banner = BANNER_HEIGHT if model.demo else 0
    canvas = Image.new(
        "RGB",
        (image.width + PANEL_WIDTH, banner + max(image.height, _panel_height(findings))),
        PANEL_BACKGROUND,
    )
    canvas.paste(image.convert("RGB"), (0, banner))
    draw = ImageDraw.Draw(canvas)
    if model.demo:
        _draw_banner(draw, canvas.width)
    _draw_panel(draw, (image.width + MARGIN, banner + MARGIN), findings, model, basis)
    return np.asarray(canvas, dtype=np.uint8)


def _scaled(display: np.ndarray) -> Image.Image:
    """The display image (grey, or RGB as a slide's heat map) resized to IMAGE_SIDE on its longer side."""
    image = Image.fromarray(np.ascontiguousarray(display, dtype=np.uint8))
    scale = IMAGE_SIDE / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _panel_height(findings: Sequence[StudyFinding]) -> int:
    """Height `_draw_panel` needs: title, three header lines, one row per finding, footer."""
    header = MARGIN + TITLE_SIZE + 12 + 3 * (SMALL_SIZE + 8) + MARGIN
    footer = MARGIN + 2 * (SMALL_SIZE + 8) + MARGIN
    return header + len(findings) * (TEXT_SIZE + 10) + footer


def _draw_banner(draw: ImageDraw.ImageDraw, width: int) -> None:
    """The red demo banner across the whole capture."""
    draw.rectangle((0, 0, width - 1, BANNER_HEIGHT - 1), fill=BANNER_RED)
    font = ImageFont.load_default(size=TITLE_SIZE + 4)
    draw.text((width // 2, BANNER_HEIGHT // 2), DEMO_BANNER, font=font, fill=WHITE, anchor="mm")


def _draw_panel(
    draw: ImageDraw.ImageDraw,
    origin: tuple[int, int],
    findings: Sequence[StudyFinding],
    model: ModelIdentity,
    basis: str,
) -> None:
    """Header, one row per finding (name, probability, decision), footer."""
    title = ImageFont.load_default(size=TITLE_SIZE)
    text = ImageFont.load_default(size=TEXT_SIZE)
    small = ImageFont.load_default(size=SMALL_SIZE)
    x, y = origin
    width = PANEL_WIDTH - 2 * MARGIN

    draw.text((x, y), "dicomnode AI findings", font=title, fill=WHITE)
    y += TITLE_SIZE + 12
    for line in (
        _fit(f"{model.algorithm_name} {model.algorithm_version}", small, width),
        _fit(f"prompt set {model.prompt_set}", small, width),
        _fit(f"probability: {basis}", small, width),
    ):
        draw.text((x, y), line, font=small, fill=GREY)
        y += SMALL_SIZE + 8
    y += MARGIN

    for study_finding in findings:
        colour = PRESENT_COLOUR if study_finding.present else GREY
        decision = "PRESENT" if study_finding.present else "absent"
        name = _fit(study_finding.finding.name.replace("_", " "), text, PROBABILITY_COLUMN - 12)
        draw.text((x, y), name, font=text, fill=WHITE)
        draw.text((x + PROBABILITY_COLUMN, y), f"{study_finding.probability:.2f}", font=text, fill=colour)
        draw.text((x + DECISION_COLUMN, y), decision, font=text, fill=colour)
        y += TEXT_SIZE + 10

    y += MARGIN
    draw.text((x, y), "AI output: review the images before any clinical use.", font=small, fill=GREY)
    if model.demo:
        draw.text((x, y + SMALL_SIZE + 8), DEMO_BANNER, font=small, fill=BANNER_RED)


def _fit(line: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """`line`, shortened with an ellipsis if it is wider than `width` pixels in `font`."""
    if font.getlength(line) <= width:
        return line
    while line and font.getlength(line + "...") > width:
        line = line[:-1]
    return line + "..."


def _patient_orientation(source: pydicom.Dataset) -> list[str] | None:
    """The source's Patient Orientation if it has its two values (row, column), else None."""
    value = source.get("PatientOrientation")
    if not value or len(value) != 2 or not all(value):
        return None
    return [str(value[0]), str(value[1])]


def _copy_anatomy(source: pydicom.Dataset, capture: Dataset) -> None:
    """Body Part Examined and Laterality of the source series (General Series module).

    Laterality is required when the body part is paired (PS3.3 type 2C); with neither
    attribute in the source the body part is unknown, and so, honestly, is the laterality.
    """
    for keyword in ("BodyPartExamined", "Laterality"):
        if source.get(keyword):
            setattr(capture, keyword, source.get(keyword))
    if "BodyPartExamined" not in capture and "Laterality" not in capture:
        capture.Laterality = None


def _source_reference(source: pydicom.Dataset, frames: Sequence[int]) -> Dataset:
    """Source Image Sequence item pointing at the image, or the frames of it, that were rendered."""
    item = Dataset()
    item.add_new("ReferencedSOPClassUID", VR.UI, source.SOPClassUID)
    item.add_new("ReferencedSOPInstanceUID", VR.UI, source.SOPInstanceUID)
    if frames:
        item.add_new("ReferencedFrameNumber", VR.IS, [int(f) for f in frames])
    return item
