"""Small synthetic datasets, written as real files, whose findings have plain visual signs.

Each finding draws its own unmistakable sign on a dark noisy background (a bright lower band,
a bright upper-left square, a bright disc, ...), jittered in position, so a model that learns
anything learns it quickly and a training test can tell learning from chance. The files follow
the public layouts `dicomnode.train.data` reads (METHODS.md section 5). Everything is seeded.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    OphthalmicTomographyImageStorage,
    generate_uid,
)

#: How often each finding is present in an image, independently of the others.
PREVALENCE = 0.4

Sign = Callable[[np.ndarray, np.random.Generator], None]


def _jitter(rng: np.random.Generator, size: int) -> int:
    return int(rng.integers(-(size // 16), size // 16 + 1))


def _lower_band(image: np.ndarray, rng: np.random.Generator) -> None:
    size = image.shape[0]
    top = size * 3 // 4 + _jitter(rng, size)
    image[top : top + size // 8, size // 8 : size - size // 8] = 0.9


def _upper_left_square(image: np.ndarray, rng: np.random.Generator) -> None:
    size = image.shape[0]
    top, left = size // 8 + _jitter(rng, size), size // 8 + _jitter(rng, size)
    image[top : top + size // 5, left : left + size // 5] = 0.95


def _disc(image: np.ndarray, rng: np.random.Generator) -> None:
    size = image.shape[0]
    centre_row, centre_col = size // 2 + _jitter(rng, size), size * 2 // 3 + _jitter(rng, size)
    rows, cols = np.ogrid[:size, :size]
    image[(rows - centre_row) ** 2 + (cols - centre_col) ** 2 <= (size // 10) ** 2] = 1.0


def _right_bar(image: np.ndarray, rng: np.random.Generator) -> None:
    size = image.shape[0]
    left = size * 7 // 8 + _jitter(rng, size) // 2
    image[size // 8 : size // 2, left : left + size // 16 + 1] = 0.85


def _upper_right_cross(image: np.ndarray, rng: np.random.Generator) -> None:
    size = image.shape[0]
    row, col = size // 4 + _jitter(rng, size), size * 3 // 4 + _jitter(rng, size)
    arm, half = size // 8, max(size // 64, 1)
    image[row - arm : row + arm, col - half : col + half] = 0.9
    image[row - half : row + half, col - arm : col + arm] = 0.9


#: Signs of the findings the tests use, by name; other class names take the unused ones in turn.
SIGNS: dict[str, Sign] = {
    "effusion": _lower_band,
    "pneumothorax": _upper_left_square,
    "nodule": _disc,
    "cnv": _disc,
    "dme": _upper_left_square,
    "drusen": _lower_band,
}
SPARE_SIGNS: tuple[Sign, ...] = (_right_bar, _upper_right_cross, _disc, _upper_left_square, _lower_band)
#: Class names that are drawn without any sign.
SIGNLESS = frozenset({"normal", "nofinding"})


def signs_for(classes: Sequence[str]) -> dict[str, Sign | None]:
    """Each class's sign: the named one if it has one, else the next sign no other class uses."""
    keys = {name: name.lower().replace(" ", "").replace("_", "") for name in classes}
    used = {SIGNS[key] for key in keys.values() if key in SIGNS}
    spare = iter(sign for sign in SPARE_SIGNS if sign not in used)
    signs: dict[str, Sign | None] = {}
    for name, key in keys.items():
        if key in SIGNLESS:
            signs[name] = None
        elif key in SIGNS:
            signs[name] = SIGNS[key]
        else:
            signs[name] = next(spare, None)
            if signs[name] is None:
                raise ValueError(f"no visual sign left for class {name!r}")
    return signs


def draw(findings: Sequence[Sign | None], size: int, rng: np.random.Generator) -> np.ndarray:
    """A dark noisy square image in [0, 1] with each finding's sign drawn on it."""
    image = np.clip(0.15 + 0.05 * rng.standard_normal((size, size)), 0.0, 1.0)
    for sign in findings:
        if sign is not None:
            sign(image, rng)
    return image


def _draw_findings(
    classes: Sequence[str], size: int, rng: np.random.Generator
) -> tuple[tuple[str, ...], np.ndarray]:
    """Each class present with probability PREVALENCE, and the image showing exactly those."""
    signs = signs_for(classes)
    present = tuple(name for name in classes if rng.random() < PREVALENCE)
    return present, draw([signs[name] for name in present], size, rng)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _patient_parts(patients: int, rng: np.random.Generator) -> dict[int, str]:
    """Patient number -> "train" or "test", about a quarter of the patients for testing."""
    test = set(rng.choice(patients, size=max(round(patients / 4), 1), replace=False).tolist())
    return {patient: "test" if patient in test else "train" for patient in range(patients)}


def chestxray14(
    folder: Path,
    classes: Sequence[str] = ("Effusion", "Pneumothorax", "Nodule"),
    patients: int = 40,
    images_per_patient: int = 2,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a ChestX-ray14-layout dataset (grayscale PNGs) into `folder` and return it.

    Images go to images_001/images/ and images_002/images/ as in the NIH archives; the table
    has the NIH columns (Finding Labels "No Finding" when none) and the split lists put about a
    quarter of the patients in test_list.txt.
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    parts = _patient_parts(patients, rng)
    rows, lists = [], {"train": [], "test": []}
    for patient in range(patients):
        archive = folder / f"images_{1 + patient * 2 // patients:03d}" / "images"
        archive.mkdir(parents=True, exist_ok=True)
        for follow_up in range(images_per_patient):
            name = f"{patient + 1:08d}_{follow_up:03d}.png"
            present, image = _draw_findings(classes, size, rng)
            Image.fromarray(_to_uint8(image)).save(archive / name)
            labels = "|".join(present) or "No Finding"
            rows.append([name, labels, follow_up, patient + 1, 50, "M", "PA", size, size, 0.143, 0.143, ""])
            lists[parts[patient]].append(name)
    with (folder / "Data_Entry_2017.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        # The NIH header, commas inside the bracketed names and the trailing empty column included.
        writer.writerow(
            ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender"]
            + ["View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", ""]
        )
        writer.writerows(rows)
    (folder / "train_val_list.txt").write_text("".join(f"{name}\n" for name in lists["train"]))
    (folder / "test_list.txt").write_text("".join(f"{name}\n" for name in lists["test"]))
    return folder


def dicom_labels(
    folder: Path,
    classes: Sequence[str] = ("Effusion", "Pneumothorax", "Nodule"),
    patients: int = 40,
    images_per_patient: int = 2,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write chest radiographs as real CR DICOM files plus labels.csv into `folder`; return it.

    Images alternate between 8-bit and 16-bit (12 stored) MONOCHROME2; each patient has its own
    Patient ID and study. labels.csv has only the path and labels columns, so a reader takes the
    patient from the header and carves the splits itself.
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(patients):
        patient_id = f"SYN{patient:05d}"
        study_uid = generate_uid(entropy_srcs=[str(seed), patient_id, "study"])
        for number in range(images_per_patient):
            present, image = _draw_findings(classes, size, rng)
            relative = Path("dicom") / f"study{patient:03d}" / f"{number}.dcm"
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            bits = 8 if (patient * images_per_patient + number) % 2 == 0 else 16
            ds = _chest_radiograph(image, bits, patient_id, study_uid, f"{seed}/{patient_id}/{number}")
            ds.save_as(folder / relative, enforce_file_format=True)
            rows.append([relative.as_posix(), "|".join(present)])
    with (folder / "labels.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "labels"])
        writer.writerows(rows)
    return folder


def _new_instance(sop_class: str, key: str, study_uid: str) -> Dataset:
    """An empty instance of `sop_class` in `study_uid`, explicit VR little endian, UIDs from `key`."""
    sop_uid = generate_uid(entropy_srcs=[key, "instance"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[key, "series"])
    return ds


def _chest_radiograph(image: np.ndarray, bits: int, patient_id: str, study_uid: str, key: str) -> Dataset:
    """A PA chest CR instance holding `image` (values in [0, 1]) in 8 or 16 bits allocated."""
    ds = _new_instance(ComputedRadiographyImageStorage, key, study_uid)
    ds.PatientID = patient_id
    ds.PatientName = f"Synthetic^{patient_id}"
    ds.StudyDate = "20240101"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    if bits == 8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = _to_uint8(image).tobytes()
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelData = np.rint(np.clip(image, 0.0, 1.0) * 4095).astype("<u2").tobytes()
    return ds


def oct_folder(
    folder: Path,
    classes: Sequence[str] = ("CNV", "DME", "DRUSEN", "NORMAL"),
    per_class: int = 10,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write an OCT2017-layout image folder (grayscale JPEGs) into `folder` and return it.

    train/ holds `per_class` images per class, test/ half as many; files are named
    CLASS-PATIENT-N.jpeg, each patient having about two scans, and patients of test/ are not in
    train/. NORMAL is drawn without a sign; every other class with its own.
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    signs = signs_for(classes)
    next_patient = 1000000
    for part, count in (("train", per_class), ("test", max(per_class // 2, 1))):
        for name in classes:
            class_dir = folder / part / name
            class_dir.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                patient = next_patient + number // 2
                image = draw([signs[name]], size, rng)
                Image.fromarray(_to_uint8(image)).save(class_dir / f"{name}-{patient}-{number}.jpeg")
            next_patient += count
    return folder


def tiles(
    folder: Path,
    classes: Sequence[str] = ("tumour epithelium", "simple stroma", "adipose"),
    per_class: int = 6,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Write colour pathology tiles (RGB PNGs, one tint per class) and tiles.csv; return `folder`."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    (folder / "tiles").mkdir(parents=True, exist_ok=True)
    rows = []
    for index, name in enumerate(classes):
        tint = np.array([0.3 + 0.6 * ((index + channel) % 3 == 0) for channel in range(3)])
        for number in range(per_class):
            image = np.clip(tint + 0.05 * rng.standard_normal((size, size, 3)), 0.0, 1.0)
            relative = f"tiles/{index}-{number}.png"
            Image.fromarray(_to_uint8(image)).save(folder / relative)
            rows.append([relative, name])
    with (folder / "tiles.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return folder


def oct_volume(
    frames: int,
    *,
    lesion_frames: Sequence[int] = (),
    size: int = 64,
    key: str = "oct",
    study_uid: str | None = None,
    sop_class: str = OphthalmicTomographyImageStorage,
    colour: bool = False,
    seed: int = 0,
) -> Dataset:
    """An OCT volume of `frames` B-scans as a DICOM dataset ready to save (explicit VR LE).

    Frames listed in `lesion_frames` (0-based) carry a bright disc, the others only noise, so
    per-frame outputs differ where the lesion is. `sop_class` Ophthalmic Tomography gives an OPT
    object (Modality OPT); a Secondary Capture class gives the export of an older device, in
    RGB when `colour`. A single-frame Secondary Capture has no Number of Frames.
    """
    rng = np.random.default_rng(seed)
    lesions = set(lesion_frames)
    scans = np.stack([_to_uint8(draw([_disc if i in lesions else None], size, rng)) for i in range(frames)])
    ds = _new_instance(sop_class, key, study_uid or generate_uid(entropy_srcs=[key, "study"]))
    ds.PatientID = f"OCT-{key}"
    ds.PatientName = f"Synthetic^{key}"
    ds.StudyDate = "20240101"
    ds.Modality = "OPT"
    ds.Laterality = "R"
    ds.ImageLaterality = "R"
    ds.Rows = ds.Columns = size
    ds.PixelRepresentation = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    if frames != 1 or sop_class == OphthalmicTomographyImageStorage:
        ds.NumberOfFrames = frames
    if colour:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        scans = np.repeat(scans[..., np.newaxis], 3, axis=-1)
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = scans.tobytes()
    return ds
