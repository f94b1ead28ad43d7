"""Retinal OCT: every B-scan of a volume becomes a sample.

Two shapes reach a PACS: Ophthalmic Tomography Image objects (Modality OPT, PS3.3 A.52), a
multi-frame grayscale volume with one B-scan per frame, and the Secondary Capture exports of
older devices, one B-scan per instance or a multi-frame SC, sometimes in colour. Both are read
here frame by frame, so a volume costs one decoded frame of memory at a time besides its samples.
The study result aggregates the B-scans (the prompt set's `aggregate`), and the results name the
frames that drove each finding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    OphthalmicTomographyImageStorage,
    SecondaryCaptureImageStorage,
)

from dicomnode.flow import InputSpec, Sample
from dicomnode.imaging.common import (
    ImagingError,
    display_frames,
    frame_count,
    instance_label,
    needed_side,
    read_dataset,
    require_pixel_data,
    to_sample,
)

#: The SOP classes an OCT B-scan arrives in.
OCT_SOP_CLASSES = frozenset(
    {
        OphthalmicTomographyImageStorage,
        SecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)

#: More B-scans than any clinical OCT protocol acquires (dense macular cubes have 128 to 512);
#: a larger count is refused rather than held in memory. A prompt set may set `max_frames`.
MAX_FRAMES = 1024

OPTIONS = frozenset({"max_frames"})


def prepare(paths: Sequence[Path], spec: InputSpec, options: Mapping[str, object]) -> list[Sample]:
    """The B-scans of each file as samples, numbered by frame in multi-frame objects.

    Raises ImagingError, naming the attribute at fault, for a file that is not an OCT B-scan or
    volume, a volume without frames or with more than `max_frames`, or an undecodable frame.
    """
    max_frames = int(str(options.get("max_frames", MAX_FRAMES)))
    samples: list[Sample] = []
    for path in paths:
        ds = read_dataset(path)
        count = _require_b_scans(ds, max_frames)
        uid = str(ds.SOPInstanceUID)
        # A multi-frame object's frames are referenced by number, even a volume of one.
        numbered = "NumberOfFrames" in ds
        frames = [
            to_sample(uid, display, spec, frame=index + 1 if numbered else None)
            for index, display in enumerate(display_frames(ds, min_side=needed_side(spec)))
        ]
        if len(frames) < count:
            raise ImagingError(
                f"Pixel Data holds {len(frames)} frames, Number of Frames (0028,0008) says {count} "
                f"({instance_label(ds)})"
            )
        samples.extend(frames)
    return samples


def _require_b_scans(ds: Dataset, max_frames: int) -> int:
    """The number of B-scans in `ds`, or ImagingError naming what makes it no OCT image."""
    require_pixel_data(ds)
    if "SOPInstanceUID" not in ds:
        raise ImagingError("no SOP Instance UID (0008,0018): results could not reference it")
    sop_class = ds.get("SOPClassUID")
    if sop_class not in OCT_SOP_CLASSES:
        kind = sop_class.name if sop_class else "no SOP Class UID"
        raise ImagingError(
            f"SOP Class UID (0008,0016) is {kind}, not Ophthalmic Tomography or a Secondary "
            f"Capture export of OCT ({instance_label(ds)})"
        )
    count = frame_count(ds)
    if count > max_frames:
        raise ImagingError(
            f"Number of Frames (0028,0008) is {count}, more than the {max_frames} B-scans this "
            f"prompt set reads (imaging.max_frames) ({instance_label(ds)})"
        )
    return count
