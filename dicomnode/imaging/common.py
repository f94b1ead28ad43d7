"""Turn stored DICOM pixel data into what a radiologist sees, then into a backbone's input.

`display_pixels` decodes any transfer syntax pydicom can with the installed plugins and applies
the viewer's pipeline (PS3.3 C.11: Modality LUT, VOI LUT or window, MONOCHROME1 inversion,
palette and YBR colour), so that the model is shown the image the radiologist reads, not raw
detector values. `to_sample` fits that image into the backbone's square input without cropping
anything away. Domain modules (cxr, ...) choose which instances are acceptable and call these.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.uid import UID

from dicomnode.flow import InputSpec, Sample
from dicomnode.imaging import j2k
from dicomnode.privacy import uid_tag

LOG = logging.getLogger(__name__)

GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})

# ITU-R BT.601 luma, the weights Pillow's "L" conversion uses, so a colour image's display copy
# looks as it would in any ordinary grayscale rendering.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# What pydicom's decoders raise for unsupported syntaxes, missing plugins, corrupt or truncated
# streams and inconsistent Image Pixel attributes: all mean "this instance cannot be shown".
DECODE_FAILURES = (RuntimeError, ValueError, NotImplementedError, AttributeError, KeyError)


class ImagingError(ValueError):
    """An instance whose pixels cannot be shown or prepared.

    The message names the attribute or transfer syntax at fault and the instance by its hashed
    SOP Instance UID, never by patient data, so it can go to logs and the journal as it is.
    """


def read_dataset(path: Path) -> Dataset:
    """Parse a stored file; a non-DICOM file is an imaging error, a missing one is not ours."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as exc:
        # No path in the message: spool paths are made of UIDs, and this text reaches the logs.
        raise ImagingError("not a DICOM file (no 'DICM' File Meta Information)") from exc


def instance_label(ds: Dataset) -> str:
    """How error messages name an instance: its hashed SOP Instance UID, if it has one."""
    uid = ds.get("SOPInstanceUID")
    return f"instance {uid_tag(str(uid))}" if uid else "instance without SOP Instance UID"


def require_pixel_data(ds: Dataset) -> None:
    """Raise ImagingError, naming the kind of object, if `ds` carries no Pixel Data.

    Checked before anything else so that an RT plan or a report sent to an imaging route is
    reported as what it is, not as a missing image attribute.
    """
    if "PixelData" not in ds:
        sop_class = ds.get("SOPClassUID")
        kind = sop_class.name if sop_class else "dataset"
        raise ImagingError(f"{kind} has no Pixel Data (7FE0,0010) ({instance_label(ds)})")


def display_pixels(ds: Dataset, index: int = 0, *, min_side: int | None = None) -> np.ndarray:
    """Frame `index` (0-based) of `ds` as a viewer displays it, float32 in [0, 1].

    Returns shape (rows, columns) for grayscale and (rows, columns, 3) RGB for colour. With
    `min_side`, the longer side the caller will use, a JPEG 2000 frame larger than needed is
    decoded at 1/2^r of its size, the smallest that keeps the longer side >= `min_side`
    (see `dicomnode.imaging.j2k`); its values are those of the full decode, only fewer.
    Grayscale goes through the Modality LUT (LUT sequence, else rescale slope/intercept), then
    the VOI LUT sequence, else the first window (LINEAR, LINEAR_EXACT or SIGMOID), else a
    min-max stretch of the frame, then MONOCHROME1 is inverted. Enhanced multi-frame objects
    are read from the frame's own functional groups (or the shared ones). Only the frame asked
    for is decoded, so a volume is read one frame at a time. Presentation LUT Shape is not
    applied separately: for MONOCHROME1 it restates the same inversion.
    """
    frame, meta = _decode_frame(ds, index, min_side)
    return _shown(frame, meta, ds, index)


def display_frames(ds: Dataset, *, min_side: int | None = None) -> Iterator[np.ndarray]:
    """Every frame of `ds` in order, each as `display_pixels` shows it (`min_side` likewise).

    The frames are decoded in one pass over the Pixel Data, so a compressed volume costs no more
    than its frames, and only one decoded frame is held at a time. JPEG 2000 frames that may be
    reduced are read one by one, each at the reduction its own codestream allows.
    """
    transfer_syntax = _transfer_syntax(ds)
    if min_side is not None and transfer_syntax in j2k.REDUCIBLE:
        for index in range(frame_count(ds)):
            yield display_pixels(ds, index, min_side=min_side)
        return
    frames = get_decoder(transfer_syntax).iter_array(ds)
    index = 0
    while True:
        with _decoding(ds, transfer_syntax):
            decoded = next(frames, None)
        if decoded is None:
            return
        yield _shown(decoded[0], decoded[1], ds, index)
        index += 1


def _shown(frame: np.ndarray, meta: dict, ds: Dataset, index: int) -> np.ndarray:
    """A decoded frame through the viewer's pipeline (see `display_pixels`)."""
    # The decoder may change the photometric interpretation (YBR_FULL, YBR_FULL_422, and the
    # JPEG 2000 YBR_ICT/YBR_RCT come back as RGB), so the decoded one is used.
    photometric, bits_stored = str(meta["photometric_interpretation"]), int(meta["bits_stored"])
    if photometric in GRAYSCALE:
        shown = _voi(_modality_values(frame, ds, index), ds, index)
        return (1.0 - shown if photometric == "MONOCHROME1" else shown).astype(np.float32)
    if photometric == "RGB":
        return (frame.astype(np.float64) / (2**bits_stored - 1)).astype(np.float32)
    if photometric == "PALETTE COLOR":
        return _palette_rgb(frame, ds)
    reason = f"unsupported Photometric Interpretation (0028,0004) {photometric!r}"
    raise ImagingError(f"{reason} ({instance_label(ds)})")


def to_sample(
    sop_instance_uid: str, display: np.ndarray, spec: InputSpec, frame: int | None = None
) -> Sample:
    """Fit a display image into the backbone's square input, normalised with its statistics.

    The whole image is kept: it is resized so its longer side is `spec.image_size` and padded
    with black to a square, because cropping could cut off the lung apices or costophrenic
    angles that a finding depends on. Grayscale is replicated to the three channels the
    backbone was trained on. The display copy is the uint8 luminance at the decoded size.
    """
    if display.ndim not in (2, 3) or (display.ndim == 3 and display.shape[2] != 3):
        raise ImagingError(f"display image has shape {display.shape}, expected (rows, cols[, 3])")
    channels = display if display.ndim == 3 else display[..., np.newaxis]
    square = _fit_and_pad(channels, spec.image_size)
    if square.shape[2] == 1:
        square = np.repeat(square, 3, axis=2)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    pixels = ((square - mean) / std).transpose(2, 0, 1)
    return Sample(
        sop_instance_uid=sop_instance_uid,
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        display=_luminance_uint8(display),
        frame=frame,
    )


def needed_side(spec: InputSpec) -> int:
    """The longer side a display image must keep: the backbone's input or the capture's image."""
    return max(spec.image_size, j2k.DISPLAY_SIDE)


def frame_count(ds: Dataset) -> int:
    """Number of Frames (0028,0008), 1 when absent; ImagingError when not a positive number."""
    value = ds.get("NumberOfFrames")
    if value is None or value == "":
        return 1
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        reason = f"Number of Frames (0028,0008) is {str(value)!r}: no frame to read"
        raise ImagingError(f"{reason} ({instance_label(ds)})")
    return count


def _transfer_syntax(ds: Dataset) -> UID:
    """The file's Transfer Syntax UID, after checking there are pixels to decode."""
    require_pixel_data(ds)
    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not transfer_syntax:
        raise ImagingError(f"no Transfer Syntax UID (0002,0010) ({instance_label(ds)})")
    return transfer_syntax


@contextmanager
def _decoding(ds: Dataset, transfer_syntax: UID) -> Iterator[None]:
    """Turn a decoder's failure into an ImagingError naming the transfer syntax and instance."""
    try:
        yield
    except DECODE_FAILURES as exc:
        # pydicom lists each plugin's refusal on its own line; keep them all, on one line.
        reason = " ".join(line.strip() for line in str(exc).splitlines()) or type(exc).__name__
        raise ImagingError(
            f"cannot decode Pixel Data in transfer syntax {transfer_syntax.name} "
            f"({transfer_syntax}): {reason} ({instance_label(ds)})"
        ) from exc


def _decode_frame(ds: Dataset, index: int, min_side: int | None = None) -> tuple[np.ndarray, dict]:
    """Decode only frame `index`; return it with the decoder's description of it.

    A JPEG 2000 frame is decoded reduced when `min_side` allows (see `display_pixels`), and in
    full when it does not or when the reduced decode fails for any reason.
    """
    transfer_syntax = _transfer_syntax(ds)
    if min_side is not None and transfer_syntax in j2k.REDUCIBLE:
        reduced = _decode_reduced(ds, index, transfer_syntax, min_side)
        if reduced is not None:
            return reduced
    with _decoding(ds, transfer_syntax):
        return get_decoder(transfer_syntax).as_array(ds, index=index)


def _decode_reduced(
    ds: Dataset, index: int, transfer_syntax: UID, min_side: int
) -> tuple[np.ndarray, dict] | None:
    """Frame `index` with the resolution levels `min_side` does not need discarded.

    None when no level can be discarded (the frame is no larger than needed, its codestream has
    no levels to spare, or its values need pydicom's sign correction) or when the reduced
    decode fails: the caller then decodes in full,
    which reports a corrupt frame as it always has.
    """
    try:
        offsets = None
        if "ExtendedOffsetTable" in ds:
            offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        count = frame_count(ds)
        codestream = get_frame(ds.PixelData, index, extended_offsets=offsets, number_of_frames=count)
        if j2k.sign_mismatch(codestream, ds):
            return None
        rows, columns = int(ds.Rows), int(ds.Columns)
        r = j2k.reduction(rows, columns, j2k.decomposition_levels(codestream), min_side)
        if r == 0:
            return None
        reduced_rows, reduced_columns = j2k.reduced_size(rows, columns, r)
        return get_decoder(transfer_syntax).as_array(
            ds,
            index=index,
            decoding_plugin=j2k.PLUGIN,
            rows=reduced_rows,
            columns=reduced_columns,
            j2k_reduce=r,
        )
    except (*DECODE_FAILURES, IndexError, OSError, Image.DecompressionBombError) as exc:
        LOG.debug("reduced JPEG 2000 decode failed, decoding in full (%s): %s", instance_label(ds), exc)
        return None


def _frame_item(ds: Dataset, macro_keyword: str, index: int = 0) -> Dataset:
    """Where frame `index`'s attributes of one functional group macro live.

    Enhanced multi-frame objects move Window and Rescale into per-frame or shared functional
    groups (PS3.3 C.7.6.16); classic objects keep them at the top level.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame) and per_frame[index].get(macro_keyword):
        return per_frame[index].get(macro_keyword)[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and shared[0].get(macro_keyword):
        return shared[0].get(macro_keyword)[0]
    return ds


def _modality_values(frame: np.ndarray, ds: Dataset, index: int = 0) -> np.ndarray:
    """Stored values to modality units (PS3.3 C.11.1): LUT if present, else slope/intercept."""
    if ds.get("ModalityLUTSequence"):
        item = ds.ModalityLUTSequence[0]
        return _lookup(frame, item.LUTDescriptor, _lut_table(item.LUTDescriptor, item.LUTData, ds))
    item = _frame_item(ds, "PixelValueTransformationSequence", index)
    slope = _first_number(item.get("RescaleSlope"), default=1.0)
    intercept = _first_number(item.get("RescaleIntercept"), default=0.0)
    return frame.astype(np.float64) * slope + intercept


def _voi(values: np.ndarray, ds: Dataset, index: int = 0) -> np.ndarray:
    """Modality values to [0, 1] as the viewer's default VOI (PS3.3 C.11.2).

    The VOI LUT sequence wins over a window when both are present, as in pydicom and most
    viewers: it is the modality's own, often non-linear, rendering. Without either, the frame
    is stretched min-max so the model never sees an all-grey image.
    """
    item = _frame_item(ds, "FrameVOILUTSequence", index)
    if item.get("VOILUTSequence"):
        return _voi_lut(values, item.VOILUTSequence[0], ds)
    window = _first_window(item)
    if window is not None:
        center, width = window
        return _window(values, center, width, str(item.get("VOILUTFunction") or "LINEAR"))
    return _min_max(values)


def _first_window(item: Dataset) -> tuple[float, float] | None:
    """The first Window Center/Width pair, or None if absent or not usable.

    A width below 1 is invalid for every VOI LUT Function's formula (PS3.3 C.11.2.1.2); such a
    window is ignored rather than refusing an otherwise readable image.
    """
    center = _first_number(item.get("WindowCenter"), default=None)
    width = _first_number(item.get("WindowWidth"), default=None)
    if center is None or width is None or width < 1:
        return None
    return center, width


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Window to [0, 1] by PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT) and C.11.2.1.3 (SIGMOID).

    Unknown function names fall back to LINEAR, the standard's default.
    """
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width == 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _voi_lut(values: np.ndarray, item: Dataset, ds: Dataset) -> np.ndarray:
    """Apply a VOI LUT item and scale its output to [0, 1]."""
    table = _lut_table(item.LUTDescriptor, item.LUTData, ds)
    mapped = _lookup(values, item.LUTDescriptor, table)
    return mapped / _full_scale(item.LUTDescriptor, table)


def _lookup(values: np.ndarray, descriptor: list[int], table: np.ndarray) -> np.ndarray:
    """Look values up in a LUT (PS3.3 C.11.1.1.1, C.11.2.1.1, C.7.6.3.1.5).

    Values below the first mapped value take the first entry, values past the end the last.
    """
    first_mapped = int(descriptor[1])
    index = np.clip(np.rint(values) - first_mapped, 0, len(table) - 1).astype(np.intp)
    return table[index].astype(np.float64)


def _lut_table(descriptor: list[int], data: bytes | list[int] | int, ds: Dataset) -> np.ndarray:
    """LUT Data as integers: US values arrive as numbers, OW as bytes in the file's byte order.

    pydicom 3.0 reads OW palette data as little endian even in big-endian files, so byte order
    is resolved here for every LUT. 8-bit entries are sometimes packed two per 16-bit word; the
    byte count tells which.
    """
    entries = int(descriptor[0]) or 2**16
    if not isinstance(data, bytes):
        return np.atleast_1d(np.asarray(data, dtype=np.int64))
    if len(data) == entries:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    word = ">u2" if ds.original_encoding[1] is False else "<u2"
    return np.frombuffer(data, dtype=word)[:entries].astype(np.int64)


def _full_scale(descriptor: list[int], table: np.ndarray) -> int:
    """The largest value a LUT's entries can hold, which maps to 1.0.

    Some modalities declare 16 bits per entry but fill only 8 or 12; like DCMTK, the entry
    width is then taken from the largest entry present, or the image would show almost black.
    """
    declared_bits = int(descriptor[2])
    used_bits = max(int(table.max()).bit_length(), 1)
    return 2 ** min(declared_bits, used_bits) - 1


def _min_max(values: np.ndarray) -> np.ndarray:
    """Stretch the frame's own range to [0, 1]; a flat frame is black."""
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.zeros(values.shape, dtype=np.float64)
    return (values - low) / (high - low)


def _palette_rgb(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Map palette indices through the Red, Green and Blue Palette Color LUTs to [0, 1] RGB."""
    descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
    if descriptor is None:
        raise ImagingError(
            "PALETTE COLOR image without Red Palette Color Lookup Table Descriptor (0028,1101) "
            f"({instance_label(ds)})"
        )
    if "RedPaletteColorLookupTableData" in ds:
        tables = [
            _lut_table(descriptor, ds[f"{colour}PaletteColorLookupTableData"].value, ds)
            for colour in ("Red", "Green", "Blue")
        ]
        rgb = np.stack([_lookup(frame, descriptor, table) for table in tables], axis=-1)
        return (rgb / _full_scale(descriptor, np.concatenate(tables))).astype(np.float32)
    return _segmented_palette_rgb(frame, ds)


def _segmented_palette_rgb(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Segmented palettes (PS3.3 C.7.9.2) are expanded by pydicom, which reads them correctly."""
    try:
        rgb = apply_color_lut(frame, ds)
    except (ValueError, AttributeError) as exc:
        raise ImagingError(
            "PALETTE COLOR image without usable Palette Color Lookup Table Data "
            f"(0028,1201-1203) or Segmented data (0028,1221-1223): {exc} ({instance_label(ds)})"
        ) from exc
    return (rgb[..., :3] / np.iinfo(rgb.dtype).max).astype(np.float32)


def _first_number(value: object, default: float | None) -> float | None:
    """First value of a DS/IS attribute that may be absent, empty or multi-valued."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if value else None
    if value is None or value == "":
        return default
    return float(value)


def _fit_and_pad(image: np.ndarray, size: int) -> np.ndarray:
    """Resize (rows, cols, channels) so the longer side is `size`, centre it on black.

    Pillow's BICUBIC widens its kernel when shrinking, so large radiographs are low-pass
    filtered rather than aliased; the overshoot of the cubic kernel is clipped back to [0, 1].
    """
    rows, cols = image.shape[:2]
    scale = size / max(rows, cols)
    new_rows, new_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
    square = np.zeros((size, size, image.shape[2]), dtype=np.float32)
    top, left = (size - new_rows) // 2, (size - new_cols) // 2
    for channel in range(image.shape[2]):
        plane = Image.fromarray(np.ascontiguousarray(image[..., channel], dtype=np.float32))
        resized = plane.resize((new_cols, new_rows), Image.Resampling.BICUBIC)
        square[top : top + new_rows, left : left + new_cols, channel] = np.asarray(resized)
    return np.clip(square, 0.0, 1.0)


def _luminance_uint8(display: np.ndarray) -> np.ndarray:
    """The display image as uint8 grayscale, for the rendered Secondary Capture."""
    gray = display @ LUMA_WEIGHTS if display.ndim == 3 else display
    return np.rint(np.clip(gray, 0.0, 1.0) * 255).astype(np.uint8)
