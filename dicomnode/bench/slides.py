"""Synthetic whole slides for `dicomnode bench imaging` and the tests: no slide is downloaded.

`slide_image` draws a seeded slide: H&E-like pink and purple tissue blobs on a white glass
background, so a tissue mask has something to find and something to skip. `tiled_pyramid`
writes it as a VL Whole Slide Microscopy pyramid with pydicom, one instance per level, TILED_FULL
or TILED_SPARSE (Per-Frame Plane Position (Slide)), JPEG baseline frames encoded by Pillow: the
layout scanner converters write. highdicom has no constructor for this IOD.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage, generate_uid

#: Glass as a scanner sees it: near white, faintly grey.
GLASS = (242, 242, 240)
#: The colour space the frames are in (Optical Path module: required for colour images).
SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
#: Eosin-pink stroma and haematoxylin-purple nuclei-rich tissue.
TISSUE_COLOURS = ((222, 120, 170), (120, 60, 150))


def slide_image(size: int = 2048, blobs: int = 4, seed: int = 0) -> np.ndarray:
    """A square RGB uint8 slide: textured tissue blobs covering part of a white background.

    Built band by band in uint8, so a slide of 8192 pixels a side costs its own 200 MB and
    little more.
    """
    rng = np.random.default_rng(seed)
    shapes = []
    for _ in range(blobs):
        centre_row, centre_col = rng.integers(size // 5, size - size // 5, size=2)
        radius_row, radius_col = rng.integers(size // 12, size // 6, size=2)
        shapes.append((centre_row, centre_col, radius_row, radius_col))
    image = np.empty((size, size, 3), dtype=np.uint8)
    cols = np.arange(size)[np.newaxis, :]
    band = 512
    for top in range(0, size, band):
        rows = np.arange(top, min(top + band, size))[:, np.newaxis]
        block = np.empty((rows.shape[0], size, 3), dtype=np.int16)
        block[...] = GLASS
        for index, (centre_row, centre_col, radius_row, radius_col) in enumerate(shapes):
            inside = ((rows - centre_row) / radius_row) ** 2 + ((cols - centre_col) / radius_col) ** 2 <= 1.0
            block[inside] = TISSUE_COLOURS[index % len(TISSUE_COLOURS)]
        block += rng.normal(0.0, 6.0, size=block.shape).round().astype(np.int16)
        image[top : top + rows.shape[0]] = np.clip(block, 0, 255)
    return image


def tiled_pyramid(
    image: np.ndarray,
    folder: Path,
    *,
    levels: int = 3,
    tile: int = 256,
    spacing_mm: float = 0.0005,
    sparse: bool = False,
    study_instance_uid: str | None = None,
    skip_background: bool = False,
) -> list[Path]:
    """Write `image` as a VL WSI pyramid built with pydicom, one instance per level.

    Each level halves the one below it. TILED_FULL levels store every tile in raster order;
    TILED_SPARSE levels give each frame its Plane Position (Slide) and, with
    `skip_background`, leave out the tiles that are all glass, as scanners do.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or generate_uid()
    series_uid, frame_of_reference = generate_uid(), generate_uid()
    paths = []
    level_image = Image.fromarray(image)
    for level in range(levels):
        if level:
            level_image = level_image.reduce(2)
        pixels = np.asarray(level_image)
        ds = _level_dataset(
            pixels,
            tile=tile,
            spacing_mm=spacing_mm * 2**level,
            sparse=sparse,
            skip_background=skip_background,
            uids=(study_uid, series_uid, frame_of_reference),
            instance_number=level + 1,
            original=level == 0,
        )
        path = folder / f"level-{level}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _level_dataset(
    pixels: np.ndarray,
    *,
    tile: int,
    spacing_mm: float,
    sparse: bool,
    skip_background: bool,
    uids: tuple[str, str, str],
    instance_number: int,
    original: bool,
) -> Dataset:
    """One level as a VL Whole Slide Microscopy Image instance with JPEG baseline frames."""
    study_uid, series_uid, frame_of_reference = uids
    rows, cols = pixels.shape[:2]
    frames, positions = [], []
    for row in range(0, rows, tile):
        for col in range(0, cols, tile):
            block = np.full((tile, tile, 3), GLASS, dtype=np.uint8)
            part = pixels[row : row + tile, col : col + tile]
            block[: part.shape[0], : part.shape[1]] = part
            if sparse and skip_background and _all_glass(part):
                continue
            frames.append(_jpeg(block))
            positions.append((col + 1, row + 1))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Slide^Test", "P-WSI", "", ""
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20250101", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SM", 1, instance_number
    ds.Manufacturer, ds.ManufacturerModelName = "Synthetic Slides", "seeded blobs"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "0", "dicomnode.bench.slides"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    if not original:
        ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20250101", "120000", "20250101120000"
    ds.ContainerIdentifier = "SLIDE-1"
    ds.IssuerOfTheContainerIdentifierSequence = DicomSequence()
    ds.ContainerTypeCodeSequence = DicomSequence([_code("433466003", "SCT", "Microscope slide")])
    specimen = Dataset()
    specimen.SpecimenIdentifier, specimen.SpecimenUID = "SPECIMEN-1", generate_uid()
    specimen.IssuerOfTheSpecimenIdentifierSequence = DicomSequence()
    specimen.SpecimenPreparationSequence = DicomSequence()
    ds.SpecimenDescriptionSequence = DicomSequence([specimen])
    ds.SpecimenLabelInImage, ds.BurnedInAnnotation, ds.VolumetricProperties = "NO", "NO", "VOLUME"
    ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
    ds.DimensionOrganizationType = "TILED_SPARSE" if sparse else "TILED_FULL"
    _dimensions(ds)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.Rows = ds.Columns = tile
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ratio = len(frames) * tile * tile * 3 / max(1, sum(len(frame) for frame in frames))
    ds.LossyImageCompressionRatio = f"{ratio:.2f}"
    ds.NumberOfFrames = len(frames)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = cols, rows
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = cols * spacing_mm, rows * spacing_mm
    ds.ImagedVolumeDepth = 0.001
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
    ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    path = Dataset()
    path.OpticalPathIdentifier, path.OpticalPathDescription = "1", "Brightfield"
    path.IlluminationTypeCodeSequence = DicomSequence([_code("111744", "DCM", "Brightfield illumination")])
    path.IlluminationColorCodeSequence = DicomSequence([_code("414298005", "SCT", "Full Spectrum")])
    path.ICCProfile = SRGB_PROFILE
    ds.OpticalPathSequence = DicomSequence([path])
    ds.NumberOfOpticalPaths = 1
    ds.AcquisitionContextSequence = DicomSequence()
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [spacing_mm, spacing_mm]
    measures.SliceThickness = 0.001
    shared.PixelMeasuresSequence = DicomSequence([measures])
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    shared.OpticalPathIdentificationSequence = DicomSequence([optical])
    frame_type = Dataset()
    frame_type.FrameType = list(ds.ImageType)
    shared.WholeSlideMicroscopyImageFrameTypeSequence = DicomSequence([frame_type])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    if sparse:
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(
            [_plane_position(column, row, spacing_mm, tile) for column, row in positions]
        )
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return ds


def _dimensions(ds: Dataset) -> None:
    """Multi-frame Dimension module: frames indexed by their column and row in the matrix."""
    organization = generate_uid()
    item = Dataset()
    item.DimensionOrganizationUID = organization
    ds.DimensionOrganizationSequence = DicomSequence([item])
    indices = []
    for keyword in ("ColumnPositionInTotalImagePixelMatrix", "RowPositionInTotalImagePixelMatrix"):
        index = Dataset()
        index.DimensionOrganizationUID = organization
        index.DimensionIndexPointer = keyword
        index.FunctionalGroupPointer = "PlanePositionSlideSequence"
        indices.append(index)
    ds.DimensionIndexSequence = DicomSequence(indices)


def _plane_position(column: int, row: int, spacing_mm: float, tile: int) -> Dataset:
    """Per-frame Plane Position (Slide) and Frame Content of a frame whose top-left pixel is
    (column, row), 1-based; its dimension index values are its tile column and row, 1-based.
    """
    position = Dataset()
    position.ColumnPositionInTotalImagePixelMatrix = column
    position.RowPositionInTotalImagePixelMatrix = row
    position.XOffsetInSlideCoordinateSystem = 20.0 - (row - 1) * spacing_mm
    position.YOffsetInSlideCoordinateSystem = 40.0 - (column - 1) * spacing_mm
    position.ZOffsetInSlideCoordinateSystem = 0.0
    content = Dataset()
    content.DimensionIndexValues = [(column - 1) // tile + 1, (row - 1) // tile + 1]
    item = Dataset()
    item.FrameContentSequence = DicomSequence([content])
    item.PlanePositionSlideSequence = DicomSequence([position])
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _jpeg(block: np.ndarray) -> bytes:
    """A JPEG baseline frame with 4:2:2 chroma subsampling, as YBR_FULL_422 declares."""
    stream = io.BytesIO()
    Image.fromarray(block).save(stream, format="JPEG", quality=90, subsampling=1)
    return stream.getvalue()


def _all_glass(part: np.ndarray) -> bool:
    return bool(np.all(np.abs(part.astype(np.int16) - np.array(GLASS)) < 40))
