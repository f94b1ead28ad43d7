"""JPEG 2000 frames decoded at a reduced resolution, when the callers need no more.

A JPEG 2000 codestream is a wavelet pyramid: discarding its r finest resolution levels gives the
image at 1/2^r of its size for a fraction of the decode (openjpeg's `reduce`). The node shows a
radiograph at the backbone's input size and in the Secondary Capture at `DISPLAY_SIDE`, so the
levels above what they need are skipped. pylibjpeg-openjpeg, pydicom's default JPEG 2000 decoder,
exposes no `reduce`; Pillow's JPEG 2000 plugin, also built on openjpeg, does (`Image.reduce`).

The reduced decode is a pydicom decoding plugin, so pydicom's runner still does everything
around the codec (frame lookup, J2K precision and sign correction, YBR_ICT/RCT to RGB) exactly as
for a full decode: only the size differs. Any failure of the reduced path is the caller's cue to
decode in full.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image, features
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.pixels.common import PhotometricInterpretation as PI
from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless

#: The Secondary Capture's image side (results.sc.IMAGE_SIDE; a test keeps them equal): the
#: largest a display copy is ever shown, so no frame need be decoded larger.
DISPLAY_SIDE = 1024

#: The transfer syntaxes read at reduced resolution. HTJ2K is left to the full decode: no HTJ2K
#: test file is at hand to prove the reduced path on it.
REDUCIBLE = frozenset({JPEG2000Lossless, JPEG2000})

#: pydicom's name for the reduced decoding plugin, registered on import of this module.
PLUGIN = "dicomnode-reduced-j2k"

DECODER_DEPENDENCIES = {uid: ("numpy", "pillow>=10.0") for uid in REDUCIBLE}

# JPEG 2000 markers (ITU-T T.800 Annex A): start of codestream, tile-part, coding style default
# and coding style component.
_SOC, _SOT, _COD, _COC, _SIZ = 0xFF4F, 0xFF90, 0xFF52, 0xFF53, 0xFF51


def decomposition_levels(codestream: bytes) -> int:
    """The fewest wavelet decomposition levels any component has, from the main header.

    Read from the COD marker and any COC markers that override it (T.800 A.6.1, A.6.2): no
    more than this many resolution levels can be discarded. Tile-part headers may lower it
    further; openjpeg then refuses the reduced decode and the caller decodes in full.
    Raises ValueError for a codestream without SOC or COD.
    """
    if int.from_bytes(codestream[:2], "big") != _SOC:
        raise ValueError("not a JPEG 2000 codestream (no SOC marker)")
    position, levels, components = 2, [], 0
    while position + 4 <= len(codestream):
        marker = int.from_bytes(codestream[position : position + 2], "big")
        length = int.from_bytes(codestream[position + 2 : position + 4], "big")
        segment = codestream[position + 4 : position + 2 + length]
        if marker == _SOT:
            break
        if marker == _SIZ:
            components = int.from_bytes(segment[34:36], "big")
        elif marker == _COD:
            levels.append(segment[5])
        elif marker == _COC:
            # Ccoc is one byte for fewer than 257 components, else two; then Scoc, then levels.
            levels.append(segment[(1 if components < 257 else 2) + 1])
        position += 2 + length
    if not levels:
        raise ValueError("JPEG 2000 main header has no COD marker")
    return min(levels)


def sign_mismatch(codestream: bytes, ds: Dataset) -> bool:
    """Whether the codestream's signedness contradicts Pixel Representation (0028,0103).

    Some encoders store signed pixels as unsigned samples; pydicom corrects each decoded value,
    but the coarser levels are averages of the uncorrected values, which no per-value fix can
    undo (-1 stored as 8191 averages with 0 to nonsense). Such frames are decoded in full.
    """
    signed = get_j2k_parameters(codestream).get("is_signed")
    return signed is not None and bool(signed) != bool(ds.get("PixelRepresentation", 0))


def reduction(rows: int, columns: int, levels: int, min_side: int) -> int:
    """How many resolution levels to discard so the longer side stays at least `min_side`.

    The largest r <= `levels` whose reduced image (openjpeg rounds each side up:
    ceil(side / 2^r)) keeps the longer side >= `min_side` and whose size Pillow computes the
    same way: Pillow rounds the reduced size to nearest, and refuses a frame where that
    differs from openjpeg's, so such an r is passed over for a smaller one.
    """
    longer = max(rows, columns)
    for r in range(levels, 0, -1):
        if _reduced(longer, r) >= min_side and all(_pillow_agrees(side, r) for side in (rows, columns)):
            return r
    return 0


def reduced_size(rows: int, columns: int, r: int) -> tuple[int, int]:
    """(rows, columns) of the image with `r` resolution levels discarded."""
    return _reduced(rows, r), _reduced(columns, r)


def is_available(uid: str) -> bool:
    """pydicom's plugin contract: Pillow with openjpeg reads these transfer syntaxes."""
    return uid in REDUCIBLE and bool(features.check_codec("jpg_2000"))


def _decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """pydicom's plugin contract: one frame, decoded with `j2k_reduce` levels discarded.

    The caller sets `rows` and `columns` to the reduced size; a frame Pillow decodes to any
    other size is refused (ValueError) rather than mis-shaped. Values are turned back into the
    stored ones as pydicom's own Pillow plugin does: Pillow widens N-bit samples to 8 or 16
    bits and level-shifts signed ones.
    """
    precision = runner.get_option("j2k_precision", runner.bits_stored)
    if runner.samples_per_pixel != 1 and precision > 8:
        raise ValueError(f"Pillow cannot decode {precision}-bit multi-sample data correctly")
    if not 0 < precision <= 16:
        raise ValueError(f"J2K precision {precision} is outside 1 to 16 bits")
    image = Image.open(BytesIO(src), formats=("JPEG2000",))
    image.reduce = int(runner.get_option("j2k_reduce", 0))
    image.load()
    if image.size != (runner.columns, runner.rows):
        raise ValueError(f"reduced frame is {image.size}, expected {(runner.columns, runner.rows)}")
    runner.set_option("bits_allocated", 8 if precision <= 8 else 16)
    dtype = runner.pixel_dtype
    values = np.frombuffer(bytearray(image.tobytes()), dtype=f"u{dtype.itemsize}")
    signed = runner.pixel_representation
    if runner.get_option("apply_j2k_sign_correction", False):
        signed = runner.get_option("j2k_is_signed", signed)
    if signed and runner.pixel_representation == 1:
        values = values.view(dtype)
        values -= np.int32(2 ** (runner.bits_allocated - 1))
    if shift := runner.bits_allocated - precision:
        np.right_shift(values, shift, out=values)
    if runner.photometric_interpretation in (PI.YBR_ICT, PI.YBR_RCT):
        runner.set_option("photometric_interpretation", PI.RGB)
    return values.tobytes()


def _reduced(side: int, r: int) -> int:
    return -(-side // (1 << r))


def _pillow_agrees(side: int, r: int) -> bool:
    """Whether Pillow's reduced side, int((side + 2^(r-1)) / 2^r), is openjpeg's ceiling."""
    return (side + ((1 << r) >> 1)) >> r == _reduced(side, r)


def register() -> None:
    """Add the plugin to pydicom's JPEG 2000 decoders, after theirs (idempotent)."""
    for uid in sorted(REDUCIBLE):
        decoder = get_decoder(UID(uid))
        if PLUGIN not in decoder.available_plugins:
            decoder.add_plugin(PLUGIN, (__name__, "_decode_frame"))


register()
