"""Imaging: real encoded files decode to the image a viewer shows, and become backbone input.

Every file comes from pydicom's own test files or the `pydicom-data` package (a test extra);
they are looked up with `download=False`, so the suite never reaches the network.
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    OphthalmicTomographyImageStorage,
    generate_uid,
)

from dicomnode import imaging
from dicomnode.flow import InputSpec
from dicomnode.imaging import common, cxr, j2k, oct
from dicomnode.imaging.common import ImagingError, display_pixels, to_sample
from dicomnode.privacy import uid_tag
from dicomnode.results import sc

CLIP_SPEC = InputSpec(
    image_size=224,
    mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711),
)
IDENTITY_SPEC = InputSpec(image_size=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
COUNT = 1 / 255  # one step of an 8-bit display


def shipped_file(name: str) -> Path:
    """Path of a shipped test file; fails, never downloads, if pydicom-data is missing."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} missing: install the test extra (pydicom-data)"
    return Path(path)


def read(name: str) -> Dataset:
    return pydicom.dcmread(shipped_file(name))


@cache
def shown(name: str) -> np.ndarray:
    """display_pixels of a shipped file, cached because the radiographs take a while."""
    return display_pixels(read(name))


def stored(name: str) -> np.ndarray:
    """The first frame's stored values, as pydicom decodes them, for hand computations."""
    ds = read(name)
    frames = ds.pixel_array.astype(np.float64)
    return frames[0] if int(ds.get("NumberOfFrames") or 1) > 1 else frames


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 written out piece by piece, output range [0, 1]."""
    below = x <= center - 0.5 - (width - 1) / 2
    above = x > center - 0.5 + (width - 1) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = (x - (center - 0.5)) / (width - 1) + 0.5
    return np.where(below, 0.0, np.where(above, 1.0, inside))


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path)
    return path


# (reference, encoded, what it proves): the encoded file must display exactly as the reference.
LOSSLESS_PAIRS = [
    ("MR_small.dcm", "MR_small_implicit.dcm", "Implicit VR Little Endian"),
    ("MR_small.dcm", "MR_small_bigendian.dcm", "Explicit VR Big Endian, signed 16-bit"),
    ("SC_rgb.dcm", "SC_rgb_expb.dcm", "Explicit VR Big Endian, RGB"),
    ("SC_rgb.dcm", "SC_rgb_16bit.dcm", "16-bit RGB scaled by Bits Stored"),
    ("SC_rgb.dcm", "SC_rgb_expb_32bit.dcm", "32-bit big-endian RGB scaled by Bits Stored"),
    ("MR_small.dcm", "MR_small_RLE.dcm", "RLE Lossless"),
    ("SC_rgb.dcm", "SC_rgb_rle.dcm", "RLE Lossless, RGB"),
    ("emri_small.dcm", "emri_small_RLE.dcm", "RLE Lossless, multi-frame"),
    ("SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm", "JPEG Lossless SV1, RGB"),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless"),
    ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless, multi-frame"),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm", "JPEG 2000 Lossless"),
    ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", "JPEG 2000 Lossless, multi-frame"),
    ("JPEG2000_UNC.dcm", "JPEG2000.dcm", "JPEG 2000, signed 16-bit NM"),
    ("MR2_UNCR.dcm", "MR2_J2KR.dcm", "JPEG 2000 Lossless with rescale"),
    ("693_UNCR.dcm", "693_J2KR.dcm", "JPEG 2000 Lossless, CT in HU"),
    ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "JPEG 2000 Lossless, CR chest MONOCHROME1"),
    ("RG3_UNCR.dcm", "RG3_J2KR.dcm", "JPEG 2000 Lossless, CR 10-bit MONOCHROME1"),
    ("US1_UNCR.dcm", "US1_J2KR.dcm", "JPEG 2000 Lossless, YBR_RCT to RGB"),
    ("SC_rgb_gdcm2k_uncompressed.dcm", "SC_rgb_gdcm_KY.dcm", "JPEG 2000, RGB"),
]

# (decoded reference, lossy original, tolerance): the references are the same lossy streams
# decompressed by another toolkit (the *_UNCI files, DCMTK's dcmdjpeg for the SC_rgb_dcmtk ones),
# so the only allowed difference is the decoders' rounding.
LOSSY_PAIRS = [
    ("RG1_UNCI.dcm", "RG1_J2KI.dcm", COUNT),
    ("RG3_UNCI.dcm", "RG3_J2KI.dcm", COUNT),
    ("MR2_UNCI.dcm", "MR2_J2KI.dcm", COUNT),
    ("693_UNCI.dcm", "693_J2KI.dcm", COUNT),
    ("US1_UNCI.dcm", "US1_J2KI.dcm", COUNT),  # JPEG 2000 irreversible, YBR_ICT
    ("SC_rgb_dcmtk_ebcr_dcmd.dcm", "SC_rgb_dcmtk_+eb+cr.dcm", 2 * COUNT),  # baseline, RGB
    ("SC_rgb_dcmtk_ebcyn1_dcmd.dcm", "SC_rgb_dcmtk_+eb+cy+n1.dcm", 2 * COUNT),  # YBR_FULL
    ("SC_rgb_dcmtk_ebcyn2_dcmd.dcm", "SC_rgb_dcmtk_+eb+cy+n2.dcm", 2 * COUNT),
    ("SC_rgb_dcmtk_ebcynp_dcmd.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", 2 * COUNT),  # YBR_FULL_422
    ("SC_rgb_dcmtk_ebcys2_dcmd.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm", 2 * COUNT),
    ("SC_rgb_dcmtk_ebcys4_dcmd.dcm", "SC_rgb_dcmtk_+eb+cy+s4.dcm", 2 * COUNT),
    ("SC_rgb.dcm", "SC_rgb_jls_lossy_line.dcm", 3 * COUNT),  # JPEG-LS near-lossless bound
    ("SC_rgb.dcm", "SC_rgb_jls_lossy_sample.dcm", 3 * COUNT),
]


@pytest.mark.parametrize(("reference", "encoded", "proves"), LOSSLESS_PAIRS)
def test_lossless_encodings_display_as_their_uncompressed_reference(
    reference: str, encoded: str, proves: str
) -> None:
    np.testing.assert_allclose(shown(encoded), shown(reference), atol=1e-6, err_msg=proves)


@pytest.mark.parametrize(("reference", "encoded", "tolerance"), LOSSY_PAIRS)
def test_lossy_encodings_display_as_another_toolkits_decode(
    reference: str, encoded: str, tolerance: float
) -> None:
    np.testing.assert_allclose(shown(encoded), shown(reference), atol=tolerance + 1e-6)


def test_deflated_file_displays_as_its_inflated_source(tmp_path: Path) -> None:
    ds = read("MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = pydicom.dcmread(save(ds, tmp_path / "deflated.dcm"))
    assert deflated.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    np.testing.assert_allclose(display_pixels(deflated), shown("MR_small.dcm"), atol=1e-6)


def test_third_party_deflated_file_decodes() -> None:
    display = shown("image_dfl.dcm")
    assert display.shape == (512, 512)
    assert display.min() == 0.0 and display.max() == 1.0


def test_jpeg_extended_12bit_decodes_pydicoms_reference_values() -> None:
    ds = read("JPGExtended.dcm")
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2048, 4096, "LINEAR_EXACT"
    values = display_pixels(ds).astype(np.float64) * 4096  # exact window: x / 4096
    assert values[420, 140] == pytest.approx(244, abs=1e-2)
    assert values[230, 120] == pytest.approx(95, abs=1e-2)


def test_multiframe_shows_the_first_frame_stretched_when_there_is_no_window() -> None:
    frame = stored("emri_small.dcm")
    expected = (frame - frame.min()) / (frame.max() - frame.min())
    np.testing.assert_allclose(shown("emri_small.dcm"), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["JPEG-lossy.dcm", "MR_truncated.dcm"])
def test_undecodable_pixel_data_is_an_imaging_error_naming_the_transfer_syntax(name: str) -> None:
    ds = read(name)
    with pytest.raises(ImagingError, match="cannot decode Pixel Data in transfer syntax") as err:
        display_pixels(ds)
    assert ds.file_meta.TransferSyntaxUID.name in str(err.value)


@pytest.mark.parametrize(("center", "width"), [(600, 1600), (1000.5, 1), (127.5, 2)])
def test_linear_window_follows_ps33_c11_2_1_2(center: float, width: float) -> None:
    ds = read("MR_small.dcm")
    ds.WindowCenter, ds.WindowWidth = center, width
    expected = linear_window(stored("MR_small.dcm"), center, width)
    np.testing.assert_allclose(display_pixels(ds), expected, atol=1e-6)


def test_first_of_several_windows_is_applied() -> None:
    ds = read("MR_small.dcm")
    ds.WindowCenter, ds.WindowWidth = [600, 40], [1600, 80]
    np.testing.assert_allclose(display_pixels(ds), shown("MR_small.dcm"), atol=1e-6)
    assert np.abs(shown("MR_small.dcm") - linear_window(stored("MR_small.dcm"), 40, 80)).max() > 0.5


def test_linear_exact_and_sigmoid_windows_follow_ps33() -> None:
    values, center, width = stored("MR_small.dcm"), 600.0, 1600.0
    expected = {
        "LINEAR_EXACT": np.clip((values - center) / width + 0.5, 0, 1),
        "SIGMOID": 1 / (1 + np.exp(-4 * (values - center) / width)),
    }
    for function, want in expected.items():
        ds = read("MR_small.dcm")
        ds.VOILUTFunction = function
        np.testing.assert_allclose(display_pixels(ds), want, atol=1e-6, err_msg=function)


def test_invalid_window_width_is_ignored_for_a_min_max_stretch() -> None:
    ds = read("MR_small.dcm")
    ds.WindowWidth = 0
    values = stored("MR_small.dcm")
    expected = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_allclose(display_pixels(ds), expected, atol=1e-6)


def test_rescale_slope_and_intercept_are_applied_before_the_window() -> None:
    ds = read("MR2_UNCR.dcm")
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    values = stored("MR2_UNCR.dcm")
    expected = linear_window(values * slope + intercept, 1000, 2000)
    np.testing.assert_allclose(shown("MR2_UNCR.dcm"), expected, atol=1e-6)
    assert np.abs(expected - linear_window(values, 1000, 2000)).max() > 0.5


def test_ct_window_is_in_hounsfield_units() -> None:
    expected = linear_window(stored("693_UNCR.dcm") - 1024, 40, 100)
    np.testing.assert_allclose(shown("693_UNCR.dcm"), expected, atol=1e-6)


def test_enhanced_multiframe_window_and_rescale_come_from_functional_groups() -> None:
    expected = linear_window(stored("eCT_Supplemental.dcm") - 1024, 49, 102)
    np.testing.assert_allclose(shown("eCT_Supplemental.dcm"), expected, atol=1e-6)


def test_modality_lut_sequence_is_applied() -> None:
    ds = read("mlut_18.dcm")
    modality = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    expected = (modality - modality.min()) / (modality.max() - modality.min())
    np.testing.assert_allclose(display_pixels(ds), expected, atol=1e-6)


def test_voi_lut_sequence_is_applied_in_preference_to_a_window() -> None:
    ds = read("vlut_04.dcm")
    ds.WindowCenter, ds.WindowWidth = 10, 20
    expected = apply_voi(ds.pixel_array, ds).astype(np.float64) / 65535
    np.testing.assert_allclose(display_pixels(ds), expected, atol=1e-6)


def test_voi_lut_declaring_16_bits_but_filling_12_is_scaled_by_the_bits_it_uses() -> None:
    ds = read("MR_small.dcm")
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = list(range(4096))
    ds.VOILUTSequence = [item]
    expected = np.clip(stored("MR_small.dcm"), 0, 4095) / 4095
    np.testing.assert_allclose(display_pixels(ds), expected, atol=1e-6)


def test_voi_lut_with_packed_8bit_entries() -> None:
    ds = read("MR_small.dcm")
    item = Dataset()
    item.LUTDescriptor = [256, 1000, 8]
    item.LUTData = bytes(range(256))
    ds.VOILUTSequence = [item]
    expected = np.clip(stored("MR_small.dcm") - 1000, 0, 255) / 255
    np.testing.assert_allclose(display_pixels(ds), expected, atol=1e-6)


def test_real_monochrome1_radiograph_is_inverted_after_its_window() -> None:
    expected = 1 - linear_window(stored("RG1_UNCR.dcm"), 15000, 30000)
    np.testing.assert_allclose(shown("RG1_UNCR.dcm"), expected, atol=1e-6)


def test_monochrome1_is_the_inverse_of_the_same_pixels_as_monochrome2() -> None:
    ds = read("MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(display_pixels(ds), 1 - shown("MR_small.dcm"), atol=1e-6)


def test_palette_colour_maps_through_the_16bit_luts() -> None:
    ds = read("OBXXXX1A.dcm")
    index = ds.pixel_array
    luts = [
        np.frombuffer(ds[f"{colour}PaletteColorLookupTableData"].value, dtype="<u2")
        for colour in ("Red", "Green", "Blue")
    ]
    expected = np.stack([lut[index] for lut in luts], axis=-1) / 65535
    display = shown("OBXXXX1A.dcm")
    assert display.shape == (600, 800, 3)
    np.testing.assert_allclose(display, expected, atol=1e-6)


@pytest.mark.parametrize("encoded", ["OBXXXX1A_expb.dcm", "OBXXXX1A_rle.dcm"])
def test_palette_colour_is_independent_of_byte_order_and_compression(encoded: str) -> None:
    np.testing.assert_allclose(shown(encoded), shown("OBXXXX1A.dcm"), atol=1e-6)


def test_segmented_palette_colour_is_expanded() -> None:
    ds = read("gdcm-US-ALOKA-16.dcm")
    expected = apply_color_lut(ds.pixel_array, ds)[..., :3] / 65535
    np.testing.assert_allclose(shown("gdcm-US-ALOKA-16.dcm"), expected, atol=1e-6)
    np.testing.assert_allclose(shown("gdcm-US-ALOKA-16_big.dcm"), expected, atol=1e-6)


YBR_UNCOMPRESSED = ["SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm"]


@pytest.mark.parametrize("name", YBR_UNCOMPRESSED)
def test_ybr_is_converted_to_rgb(name: str) -> None:
    # The YBR files are SC_rgb.dcm converted with 8-bit rounding, both ways.
    assert shown(name).shape == (100, 100, 3)
    np.testing.assert_allclose(shown(name), shown("SC_rgb.dcm"), atol=7 * COUNT)


def test_display_without_pixel_data_names_the_object() -> None:
    with pytest.raises(ImagingError, match=r"RT Plan Storage has no Pixel Data \(7FE0,0010\)"):
        display_pixels(read("rtplan.dcm"))


def test_display_without_transfer_syntax_names_the_attribute() -> None:
    ds = read("MR_small.dcm")
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(ImagingError, match=r"Transfer Syntax UID \(0002,0010\)"):
        display_pixels(ds)


def test_unsupported_photometric_and_missing_palette_are_imaging_errors() -> None:
    hsv = read("SC_rgb.dcm")
    hsv.PhotometricInterpretation = "HSV"
    with pytest.raises(ImagingError, match="Photometric Interpretation .* 'HSV'"):
        display_pixels(hsv)
    palette = read("OBXXXX1A.dcm")
    del palette.RedPaletteColorLookupTableDescriptor
    with pytest.raises(ImagingError, match="Palette Color Lookup Table Descriptor"):
        display_pixels(palette)


def test_errors_name_the_hashed_uid_never_patient_data() -> None:
    ds = read("CT_small.dcm")
    with pytest.raises(ImagingError) as err:
        cxr.prepare(shipped_file("CT_small.dcm"), CLIP_SPEC)
    message = str(err.value)
    assert uid_tag(str(ds.SOPInstanceUID)) in message
    for secret in (str(ds.SOPInstanceUID), str(ds.PatientName), str(ds.PatientID)):
        assert secret not in message


def test_sample_is_normalised_float32_and_display_is_uint8() -> None:
    display = shown("RG1_UNCR.dcm")
    sample = to_sample("1.2.3", display, CLIP_SPEC)
    assert sample.sop_instance_uid == "1.2.3"
    assert sample.pixels.shape == (3, 224, 224) and sample.pixels.dtype == np.float32
    assert sample.display.shape == display.shape and sample.display.dtype == np.uint8
    np.testing.assert_array_equal(sample.display, np.rint(display * 255).astype(np.uint8))
    mean = np.asarray(CLIP_SPEC.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(CLIP_SPEC.std, dtype=np.float32)[:, None, None]
    restored = sample.pixels * std + mean
    assert restored.min() >= -1e-5 and restored.max() <= 1 + 1e-5
    np.testing.assert_allclose(restored[0], restored[1], atol=1e-5)  # grayscale replicated
    np.testing.assert_allclose(restored[0], restored[2], atol=1e-5)


@pytest.mark.parametrize(("rows", "cols"), [(100, 50), (50, 100)])
def test_sample_keeps_the_whole_image_and_pads_with_black(rows: int, cols: int) -> None:
    sample = to_sample("1.2.3", np.ones((rows, cols), dtype=np.float32), IDENTITY_SPEC)
    content = sample.pixels[0] > 0.5
    assert content.sum(axis=0).max() == 64 * rows // max(rows, cols)
    assert content.sum(axis=1).max() == 64 * cols // max(rows, cols)
    band = slice(16, 48)  # the 32-pixel short side is centred in 64
    inside = content[:, band] if rows > cols else content[band, :]
    assert inside.all()
    assert content.sum() == 64 * 32
    assert sample.pixels[:, 0, 0].tolist() == [0.0, 0.0, 0.0]


def test_colour_sample_keeps_channels_and_its_display_is_luminance() -> None:
    display = shown("SC_rgb.dcm")
    sample = to_sample("1.2.3", display, IDENTITY_SPEC)
    assert not np.allclose(sample.pixels[0], sample.pixels[1])
    pillow_gray = np.asarray(Image.fromarray(np.rint(display * 255).astype(np.uint8)).convert("L"))
    assert np.abs(sample.display.astype(int) - pillow_gray).max() <= 1


def test_sample_refuses_an_image_that_is_neither_gray_nor_rgb() -> None:
    with pytest.raises(ImagingError, match="shape"):
        to_sample("1.2.3", np.zeros((4, 4, 4), dtype=np.float32), IDENTITY_SPEC)


def test_prepare_real_cr_chest_radiograph() -> None:
    path = shipped_file("RG1_UNCR.dcm")
    sample = cxr.prepare(path, CLIP_SPEC)
    assert sample.sop_instance_uid == pydicom.dcmread(path).SOPInstanceUID
    assert sample.pixels.shape == (3, 224, 224) and sample.pixels.dtype == np.float32
    assert sample.display.shape == (1955, 1841) and sample.display.dtype == np.uint8


def test_prepare_gives_the_same_sample_from_jpeg2000_and_uncompressed() -> None:
    uncompressed = cxr.prepare(shipped_file("RG1_UNCR.dcm"), CLIP_SPEC)
    lossless = cxr.prepare(shipped_file("RG1_J2KR.dcm"), CLIP_SPEC)
    np.testing.assert_allclose(lossless.pixels, uncompressed.pixels, atol=1e-5)
    np.testing.assert_array_equal(lossless.display, uncompressed.display)


def test_registry_prepares_by_prompt_set_domain() -> None:
    sample = imaging.prepare("cxr", shipped_file("RG3_J2KR.dcm"), CLIP_SPEC)
    assert sample.pixels.shape == (3, 224, 224)
    with pytest.raises(ImagingError, match="no imaging preparer for domain 'ultrasound'"):
        imaging.prepare("ultrasound", shipped_file("RG3_J2KR.dcm"), CLIP_SPEC)
    with pytest.raises(ImagingError, match="not Ophthalmic Tomography"):
        imaging.prepare("oct", shipped_file("RG3_J2KR.dcm"), CLIP_SPEC)


def _without_pixel_data(ds: Dataset) -> Dataset:
    del ds.PixelData
    return ds


def _without_sop_instance_uid(ds: Dataset) -> Dataset:
    del ds.SOPInstanceUID
    return ds


def _as_dx(ds: Dataset) -> Dataset:
    ds.Modality = "DX"
    return ds


REFUSALS = [
    ("rtplan.dcm", None, r"RT Plan Storage has no Pixel Data \(7FE0,0010\)"),
    ("RG1_UNCR.dcm", _without_pixel_data, "Computed Radiography Image Storage has no Pixel Data"),
    ("RG3_UNCR.dcm", _without_sop_instance_uid, r"no SOP Instance UID \(0008,0018\)"),
    ("CT_small.dcm", None, r"Modality \(0008,0060\) 'CT' is not a projection radiograph"),
    ("SC_rgb.dcm", None, r"Photometric Interpretation \(0028,0004\) 'RGB' is not grayscale"),
    ("emri_small.dcm", _as_dx, r"Number of Frames \(0028,0008\) is 10, expected 1"),
]


@pytest.mark.parametrize(("name", "change", "message"), REFUSALS)
def test_prepare_refuses_what_is_not_a_single_grayscale_radiograph(
    tmp_path: Path, name: str, change: Callable[[Dataset], Dataset] | None, message: str
) -> None:
    path = shipped_file(name) if change is None else save(change(read(name)), tmp_path / name)
    with pytest.raises(ImagingError, match=message):
        cxr.prepare(path, CLIP_SPEC)


def test_prepare_refuses_a_file_that_is_not_dicom_without_quoting_its_path(tmp_path: Path) -> None:
    path = tmp_path / "1.2.826.0.1.3680043.8.498.5.dcm"
    path.write_text("not an image")
    with pytest.raises(ImagingError, match="not a DICOM file") as raised:
        cxr.prepare(path, CLIP_SPEC)
    assert "1.2.826.0.1.3680043.8.498.5" not in str(raised.value)


def test_imaging_does_not_import_torch() -> None:
    code = "import sys, dicomnode.imaging; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# Reduced-resolution JPEG 2000: (file, the need passed as min_side, reduced rows x columns, and
# the largest mean difference from the full decode, both fitted to 224, as a share of the display
# range). Radiographs stay within 1%; the 4x reduced MR and CT and the ultrasound's burned-in
# text, sharp-edged fine detail, alias a little differently through the wavelet's low band than
# through Pillow's filter.
REDUCED_J2K = [
    ("RG1_J2KR.dcm", 224, (978, 921), 0.01),  # r=2 would suit, Pillow cannot size 1841 / 4
    ("RG1_J2KI.dcm", 224, (978, 921), 0.01),  # irreversible, MONOCHROME1
    ("RG3_J2KR.dcm", 224, (440, 440), 0.01),  # 10-bit MONOCHROME1; 1760 / 8 = 220 is too small
    ("MR2_J2KR.dcm", 224, (256, 256), 0.02),  # rescale slope and intercept
    ("693_J2KR.dcm", 224, (256, 256), 0.02),  # signed CT in HU
    ("JPEG2000.dcm", 224, (256, 64), 0.01),  # signed NM, irreversible, no window (min-max)
    ("US1_J2KR.dcm", 224, (240, 320, 3), 0.02),  # YBR_RCT colour as RGB, burned-in text
]


def fitted(display: np.ndarray, size: int = 224) -> np.ndarray:
    """A display image as the backbone sees it (fit, pad), as luminance."""
    gray = display @ common.LUMA_WEIGHTS if display.ndim == 3 else display
    return common._fit_and_pad(gray[..., np.newaxis], size)[..., 0]


@pytest.mark.parametrize(("name", "min_side", "size", "tolerance"), REDUCED_J2K)
def test_reduced_jpeg2000_shows_the_full_decode_downsampled(
    name: str, min_side: int, size: tuple[int, int], tolerance: float
) -> None:
    reduced = display_pixels(read(name), min_side=min_side)
    assert reduced.shape == size and reduced.dtype == np.float32
    # Same window, same MONOCHROME1 inversion, same sign: only the resolution may differ.
    assert np.abs(fitted(reduced) - fitted(shown(name))).mean() < tolerance
    assert to_sample("1.2.3", reduced, CLIP_SPEC).pixels.shape == (3, 224, 224)


@pytest.mark.parametrize(("name", "min_side", "size", "tolerance"), REDUCED_J2K)
def test_reduced_jpeg2000_keeps_the_stored_values_type_and_level(
    name: str, min_side: int, size: tuple[int, int], tolerance: float
) -> None:
    ds = read(name)
    full, full_meta = common._decode_frame(ds, 0)
    reduced, reduced_meta = common._decode_frame(ds, 0, min_side)
    assert reduced.shape == size and reduced.dtype == full.dtype
    assert reduced_meta["photometric_interpretation"] == full_meta["photometric_interpretation"]
    assert reduced_meta["bits_stored"] == full_meta["bits_stored"]
    # The wavelet's low band keeps the mean: a lost sign or a bit shift moves it by half the range.
    value_range = float(full.max()) - float(full.min())
    assert abs(float(reduced.mean()) - float(full.mean())) < 0.01 * value_range


@pytest.mark.parametrize(
    ("rows", "columns", "levels", "min_side", "expected"),
    [
        (1955, 1841, 5, 1024, 0),  # the pydicom-data chest CR is needed whole for the capture
        (1955, 1841, 5, 224, 1),  # r=2 suits, but Pillow rounds 1841 / 4 down where openjpeg rounds up
        (3000, 2500, 5, 1024, 1),
        (4096, 4096, 5, 1024, 2),
        (4096, 4096, 5, 224, 4),  # 256 >= 224; r=5 would give 128
        (4096, 4096, 2, 224, 2),  # no more than the codestream's levels
        (2048, 2048, 0, 224, 0),
        (200, 200, 5, 224, 0),  # already smaller than needed
        (2049, 1000, 5, 1024, 1),  # 1025 >= 1024: openjpeg rounds up
    ],
)
def test_reduction_keeps_the_longer_side_at_least_the_need(
    rows: int, columns: int, levels: int, min_side: int, expected: int
) -> None:
    assert j2k.reduction(rows, columns, levels, min_side) == expected


def test_the_need_is_the_larger_of_the_backbone_input_and_the_capture() -> None:
    assert j2k.DISPLAY_SIDE == sc.IMAGE_SIDE
    assert common.needed_side(CLIP_SPEC) == sc.IMAGE_SIDE
    assert common.needed_side(InputSpec(image_size=1536, mean=(0, 0, 0), std=(1, 1, 1))) == 1536


def j2k_radiograph(
    *frames: np.ndarray, resolutions: int, sop_class: str = ComputedRadiographyImageStorage
) -> Dataset:
    """A CR (or other `sop_class`) of 16-bit `frames`, each encoded by Pillow as lossless JPEG 2000."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.Modality = "OPT" if sop_class == OphthalmicTomographyImageStorage else "CR"
    ds.Rows, ds.Columns = frames[0].shape
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    streams = []
    for frame in frames:
        stream = io.BytesIO()
        Image.fromarray(frame).save(stream, format="JPEG2000", no_jp2=True, num_resolutions=resolutions)
        streams.append(stream.getvalue())
    ds.PixelData = encapsulate(streams)
    return ds


def smooth_image(rows: int, columns: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:columns]
    return (2000 + 1000 * np.sin(x / 90) * np.cos(y / 70) + (x + y) / 4).astype(np.uint16)


def test_codestream_with_fewer_levels_is_reduced_only_as_far_as_it_allows() -> None:
    ds = j2k_radiograph(smooth_image(512, 512), resolutions=2)
    assert j2k.decomposition_levels(get_frame(ds.PixelData, 0, number_of_frames=1)) == 1
    assert display_pixels(ds, min_side=64).shape == (256, 256)
    flat = j2k_radiograph(smooth_image(512, 512), resolutions=1)
    assert display_pixels(flat, min_side=64).shape == (512, 512)


def test_reduced_decode_that_fails_falls_back_to_the_full_decode(monkeypatch) -> None:
    # A header that promises more levels than the tiles hold (tile-part COD markers may): openjpeg
    # refuses, and the frame is decoded in full rather than lost.
    ds = j2k_radiograph(smooth_image(512, 512), resolutions=2)
    monkeypatch.setattr(j2k, "decomposition_levels", lambda codestream: 5)
    full = display_pixels(j2k_radiograph(smooth_image(512, 512), resolutions=2))
    np.testing.assert_array_equal(display_pixels(ds, min_side=64), full)


def test_codestream_whose_sign_contradicts_pixel_representation_is_decoded_in_full() -> None:
    # Its coarse levels average uncorrected values; pydicom's per-value sign fix cannot apply.
    ds = read("J2K_pixelrep_mismatch.dcm")
    np.testing.assert_array_equal(display_pixels(ds, min_side=224), shown("J2K_pixelrep_mismatch.dcm"))


def test_multiframe_jpeg2000_frames_are_each_reduced_only_when_larger_than_needed() -> None:
    ds = read("emri_small_jpeg_2k_lossless.dcm")  # 10 frames of 64 x 64
    full = list(common.display_frames(ds))
    reduced = list(common.display_frames(ds, min_side=32))
    assert len(reduced) == len(full) == 10
    assert all(small.shape == (32, 32) for small in reduced)
    # Each reduced frame is its own full frame downsampled, nearer to it than to any other frame.
    halved = [fitted(whole, 32) for whole in full]
    for index, small in enumerate(reduced):
        distances = [np.abs(small - other).mean() for other in halved]
        assert int(np.argmin(distances)) == index
    unneeded = list(common.display_frames(ds, min_side=64))
    for same, whole in zip(unneeded, full, strict=True):
        np.testing.assert_array_equal(same, whole)


def test_chest_preparer_decodes_a_large_jpeg2000_radiograph_at_the_capture_size(tmp_path: Path) -> None:
    path = tmp_path / "cr.dcm"
    j2k_radiograph(smooth_image(2100, 2300), resolutions=6).save_as(path, enforce_file_format=True)
    sample = cxr.prepare(path, CLIP_SPEC)
    assert sample.display.shape == (1050, 1150)  # 2300 / 2 >= 1024 > 2300 / 4
    whole = to_sample("1.2.3", display_pixels(pydicom.dcmread(path)), CLIP_SPEC)
    assert np.abs(sample.pixels - whole.pixels).mean() < 0.01 * float(np.ptp(whole.pixels))


def test_oct_preparer_reduces_wide_jpeg2000_b_scans_to_the_capture_size(tmp_path: Path) -> None:
    path = tmp_path / "oct.dcm"
    scans = (smooth_image(1100, 2300), smooth_image(1100, 2300)[::-1].copy())
    volume = j2k_radiograph(*scans, resolutions=6, sop_class=OphthalmicTomographyImageStorage)
    volume.save_as(path, enforce_file_format=True)
    samples = oct.prepare([path], CLIP_SPEC, {})
    assert [sample.frame for sample in samples] == [1, 2]
    assert all(sample.display.shape == (550, 1150) for sample in samples)


def test_truncated_codestream_header_falls_back_to_the_full_decode_and_its_error() -> None:
    ds = j2k_radiograph(smooth_image(512, 512), resolutions=3)
    codestream = get_frame(ds.PixelData, 0, number_of_frames=1)
    cod = codestream.index(b"\xff\x52")
    with pytest.raises((ValueError, IndexError)):
        j2k.decomposition_levels(codestream[: cod + 8])
    ds.PixelData = encapsulate([codestream[: cod + 8]])
    with pytest.raises(ImagingError, match="cannot decode Pixel Data in transfer syntax JPEG 2000"):
        display_pixels(ds, min_side=64)
