"""Labelled training data: read a dataset folder into images, labels and patient-wise splits.

Four layouts are recognised by the files they hold (METHODS.md section 5): ChestX-ray14
(`Data_Entry_2017.csv`), a DICOM folder with `labels.csv`, the OCT2017 image folders
(`train/`, `test/`, one sub-folder per class) and a CSV of pathology tiles (`tiles.csv`).
Labels are matched to the prompt set's class names and returned in its spelling and order.
Splits carved here are carved by patient, never by image, so no patient's images are seen in
training and scored in validation. Every bad input raises `DataError` naming the file, the
line and what is wrong; nothing is skipped silently.

`TrainingImages` turns the labelled images into tensors through the very functions serving
uses, so a prompt set learns on exactly the pixels it is later shown.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError

from dicomnode.flow import InputSpec, Sample
from dicomnode.imaging import ImagingError, prepare
from dicomnode.imaging.common import display_pixels, to_sample

SPLITS = ("train", "val", "test")
PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})

CHESTXRAY14_TABLE = "Data_Entry_2017.csv"
CHESTXRAY14_SPLIT_LISTS = ("train_val_list.txt", "test_list.txt")
DICOM_LABELS_TABLE = "labels.csv"
TILES_TABLE = "tiles.csv"
LOOKED_FOR = (
    f"{CHESTXRAY14_TABLE} (ChestX-ray14)",
    f"{DICOM_LABELS_TABLE} (DICOM folder)",
    f"{TILES_TABLE} (pathology tiles)",
    "train/ and test/ class folders (image folders, as OCT2017)",
)
# ChestX-ray14 writes these for an image without findings; they are labels only if the prompt
# set has a class of that name.
NO_FINDING = frozenset({"nofinding", "normal"})
# Layouts without an official split hold out this share of patients for testing.
TEST_FRACTION = 0.1

# Augmentation of VPT training (METHODS.md section 1), in display units ([0, 1]).
ROTATION_DEGREES = 15.0
BRIGHTNESS = 0.1
NOISE_SIGMA = 0.02


class DataError(ValueError):
    """A dataset that cannot be read as labelled; the message names the file, line and fault."""


@dataclass(frozen=True)
class LabelledImage:
    """One training image: its file, the prompt set's classes it shows, its patient and split."""

    path: Path
    labels: tuple[str, ...]
    # Only for keeping a patient's images in one split: never printed, never logged.
    patient: str = field(repr=False)
    split: str


@dataclass(frozen=True)
class LabelledData:
    """A dataset as read: its layout, the classes present (prompt set order) and its images."""

    layout: str
    classes: tuple[str, ...]
    images: tuple[LabelledImage, ...]

    def split(self, name: str) -> tuple[LabelledImage, ...]:
        """The images of one split, "train", "val" or "test", in reading order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r} (expected one of {SPLITS})")
        return tuple(image for image in self.images if image.split == name)


def read_dataset(
    folder: Path, known_classes: Sequence[str], *, val_fraction: float = 0.1, seed: int = 0
) -> LabelledData:
    """Read a dataset folder in any known layout, labelled with the prompt set's classes.

    `known_classes` are the prompt set's class names; data labels match them ignoring case,
    spaces and underscores. Where the layout gives no validation split, `val_fraction` of the
    training patients are held out for validation, chosen by `seed`; the same folder, seed and
    fraction always give the same split. Raises DataError for anything that cannot be read.
    """
    folder = Path(folder)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    classes = _class_lookup(known_classes)
    layout = _detect_layout(folder)
    if layout == "chestxray14":
        images = _read_chestxray14(folder, classes, val_fraction, seed)
    elif layout == "dicom-labels":
        images = _read_dicom_labels(folder, classes, val_fraction, seed)
    elif layout == "tile-csv":
        images = _read_tiles(folder, classes, val_fraction, seed)
    else:
        images = _read_image_folders(folder, classes, val_fraction, seed)
    if not images:
        raise DataError(f"{folder}: {layout} layout without any image")
    present = {label for image in images for label in image.labels}
    return LabelledData(
        layout=layout,
        classes=tuple(name for name in classes.values() if name in present),
        images=tuple(images),
    )


def _detect_layout(folder: Path) -> str:
    """The one layout whose marker files the folder holds."""
    markers = {
        "chestxray14": (folder / CHESTXRAY14_TABLE).is_file(),
        "dicom-labels": (folder / DICOM_LABELS_TABLE).is_file(),
        "tile-csv": (folder / TILES_TABLE).is_file(),
        "image-folder": (folder / "train").is_dir() and (folder / "test").is_dir(),
    }
    found = [layout for layout, present in markers.items() if present]
    if not found:
        raise DataError(f"{folder}: no dataset layout recognised; looked for {', '.join(LOOKED_FOR)}")
    if len(found) > 1:
        raise DataError(f"{folder}: holds the markers of several layouts {found}; keep one per folder")
    return found[0]


# Class names ------------------------------------------------------------------------------


def _class_key(name: str) -> str:
    """How a class name is compared: "Pleural_Thickening" and "pleural thickening" are one."""
    return name.strip().lower().replace(" ", "").replace("_", "")


def _class_lookup(known_classes: Sequence[str]) -> dict[str, str]:
    """Comparison key -> the prompt set's spelling, in the prompt set's order."""
    lookup: dict[str, str] = {}
    for name in known_classes:
        key = _class_key(name)
        if key in lookup:
            raise DataError(f"prompt set classes {lookup[key]!r} and {name!r} are the same name")
        lookup[key] = name
    return lookup


def _labels(
    names: Iterable[str], classes: dict[str, str], where: str, no_finding: frozenset[str] = frozenset()
) -> tuple[str, ...]:
    """The prompt set's classes named by `names`, in its order; `no_finding` names mean none."""
    found = set()
    for raw in names:
        key = _class_key(raw)
        if not key or (key in no_finding and key not in classes):
            continue
        if key not in classes:
            raise DataError(
                f"{where}: label {raw.strip()!r} is not a class of the prompt set "
                f"(known: {', '.join(classes.values())})"
            )
        found.add(classes[key])
    return tuple(name for name in classes.values() if name in found)


# Layouts ----------------------------------------------------------------------------------


def _read_chestxray14(
    folder: Path, classes: dict[str, str], val_fraction: float, seed: int
) -> list[LabelledImage]:
    """NIH ChestX-ray14: the official train_val/test lists, validation carved by patient."""
    official = _official_split(folder)
    on_disk = _chestxray14_images(folder)
    table = folder / CHESTXRAY14_TABLE
    rows, listed = [], {}
    for line, row in _csv_rows(table, ("Image Index", "Finding Labels", "Patient ID")):
        where = f"{table}:{line}"
        name, patient = row["Image Index"], row["Patient ID"]
        if not name or not patient:
            raise DataError(f"{where}: empty Image Index or Patient ID")
        labels = _labels(row["Finding Labels"].split("|"), classes, where, NO_FINDING)
        if name not in on_disk:
            raise DataError(f"{where}: image {name} is not on disk under images/ or images_*/images/")
        if name not in official:
            raise DataError(f"{where}: image {name} is in neither {' nor '.join(CHESTXRAY14_SPLIT_LISTS)}")
        _list_once(listed, on_disk[name], line, where)
        rows.append((on_disk[name], labels, patient, official[name]))
    return _with_validation(rows, val_fraction, seed)


def _official_split(folder: Path) -> dict[str, str]:
    """Image name -> "train" (from train_val_list.txt) or "test" (from test_list.txt)."""
    missing = [name for name in CHESTXRAY14_SPLIT_LISTS if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{folder}: ChestX-ray14 layout without its official split list(s) {', '.join(missing)}"
        )
    split: dict[str, str] = {}
    for list_name, part in zip(CHESTXRAY14_SPLIT_LISTS, ("train", "test"), strict=True):
        path = folder / list_name
        try:
            names = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not a UTF-8 text file: {exc}") from exc
        for line, text in enumerate(names, start=1):
            name = text.strip()
            if name and split.setdefault(name, part) != part:
                raise DataError(f"{path}:{line}: image {name} is also in {CHESTXRAY14_SPLIT_LISTS[0]}")
    return split


def _chestxray14_images(folder: Path) -> dict[str, Path]:
    """Image name -> file, from images/ and every images_*/images/ (the archives' layout)."""
    image_dirs = [folder / "images", *sorted(part / "images" for part in folder.glob("images_*"))]
    found: dict[str, Path] = {}
    for image_dir in (path for path in image_dirs if path.is_dir()):
        for entry in os.scandir(image_dir):
            if entry.is_file() and not entry.name.startswith("."):
                if entry.name in found:
                    raise DataError(f"{entry.path}: image {entry.name} also at {found[entry.name]}")
                found[entry.name] = Path(entry.path)
    if not found:
        raise DataError(f"{folder}: ChestX-ray14 layout without images in images/ or images_*/images/")
    return found


def _read_dicom_labels(
    folder: Path, classes: dict[str, str], val_fraction: float, seed: int
) -> list[LabelledImage]:
    """DICOM files listed in labels.csv; the patient defaults to the file's Patient ID."""
    table = folder / DICOM_LABELS_TABLE
    rows, listed = [], {}
    for line, row in _csv_rows(table, ("path", "labels"), ("patient", "split")):
        where = f"{table}:{line}"
        path = _listed_file(folder, row["path"], where)
        _list_once(listed, path, line, where)
        labels = _labels(row["labels"].split("|"), classes, where)
        patient = row.get("patient") or _patient_id(path, where)
        rows.append((path, labels, patient, _given_split(row, where)))
    return _with_splits(rows, val_fraction, seed)


def _read_tiles(folder: Path, classes: dict[str, str], val_fraction: float, seed: int) -> list[LabelledImage]:
    """Pathology tiles listed in tiles.csv, one label each; without a patient, a tile is its own."""
    table = folder / TILES_TABLE
    rows, listed = [], {}
    for line, row in _csv_rows(table, ("path", "label"), ("patient", "split")):
        where = f"{table}:{line}"
        path = _listed_file(folder, row["path"], where)
        _list_once(listed, path, line, where)
        if not row["label"]:
            raise DataError(f"{where}: tile {row['path']} has an empty label")
        labels = _labels([row["label"]], classes, where)
        patient = row.get("patient") or row["path"]
        rows.append((path, labels, patient, _given_split(row, where)))
    return _with_splits(rows, val_fraction, seed)


def _read_image_folders(
    folder: Path, classes: dict[str, str], val_fraction: float, seed: int
) -> list[LabelledImage]:
    """train/, test/ (and val/) with one folder per class; validation carved by patient if absent."""
    parts = [part for part in SPLITS if (folder / part).is_dir()]
    rows = []
    for part in parts:
        for class_dir in _visible_entries(folder / part):
            if not class_dir.is_dir():
                raise DataError(f"{class_dir}: a file where a class folder was expected")
            labels = _labels([class_dir.name], classes, f"{class_dir}")
            for path in _visible_entries(class_dir):
                if not path.is_file() or path.suffix.lower() not in PICTURE_SUFFIXES:
                    raise DataError(f"{path}: not an image file ({', '.join(sorted(PICTURE_SUFFIXES))})")
                rows.append((path, labels, _oct_patient(path.stem, class_dir.name), part))
    if "val" in parts:
        return [LabelledImage(*row) for row in rows]
    return _with_validation(rows, val_fraction, seed)


def _with_validation(
    rows: list[tuple[Path, tuple[str, ...], str, str]], val_fraction: float, seed: int
) -> list[LabelledImage]:
    """Images in their given train or test split, with validation patients carved from train."""
    carved = _carve([patient for _, _, patient, part in rows if part == "train"], {"val": val_fraction}, seed)
    return [
        LabelledImage(path, labels, patient, carved[patient] if part == "train" else part)
        for path, labels, patient, part in rows
    ]


def _visible_entries(folder: Path) -> list[Path]:
    """A folder's entries in name order, without hidden files such as .DS_Store."""
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def _oct_patient(stem: str, class_name: str) -> str:
    """OCT2017 names a scan CLASS-PATIENT-N ("CNV-1016042-1"): the patient follows the class.

    A patient's scans appear under several classes, so the class prefix is dropped before the
    prefix up to the next '-' is taken; a name without the class prefix is PATIENT-N.
    """
    prefix = f"{class_name.lower()}-"
    rest = stem[len(prefix) :] if stem.lower().startswith(prefix) else stem
    return rest.split("-", 1)[0]


# Shared by the CSV layouts ------------------------------------------------------------------


def _csv_rows(
    table: Path, required: Sequence[str], optional: Sequence[str] = ()
) -> list[tuple[int, dict[str, str]]]:
    """(line number, stripped values of the wanted columns) for each row of a CSV with a header.

    Optional columns absent from the header are absent from the rows.
    """
    rows = []
    try:
        with table.open(newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            header = reader.fieldnames or []
            missing = [column for column in required if column not in header]
            if missing:
                raise DataError(f"{table}:1: missing column(s) {missing} (header: {header})")
            wanted = [column for column in (*required, *optional) if column in header]
            for row in reader:
                rows.append((reader.line_num, {column: (row[column] or "").strip() for column in wanted}))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{table}: not a readable UTF-8 CSV file: {exc}") from exc
    return rows


def _listed_file(folder: Path, relative: str, where: str) -> Path:
    """The existing file a table row names by a path relative to the dataset folder."""
    listed = Path(relative)
    if not relative or listed.is_absolute() or ".." in listed.parts:
        raise DataError(f"{where}: path {relative!r} is not a path inside the dataset folder")
    path = folder / listed
    if not path.is_file():
        raise DataError(f"{where}: file {relative} is not on disk")
    return path


def _patient_id(path: Path, where: str) -> str:
    """Patient ID (0010,0020) from the file's header; its value never goes into a message."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except (InvalidDicomError, OSError) as exc:
        raise DataError(f"{where}: {path} is not a readable DICOM file: {exc}") from exc
    patient = str(ds.get("PatientID") or "").strip()
    if not patient:
        raise DataError(f"{where}: {path} has no Patient ID (0010,0020); give a patient column")
    return patient


def _given_split(row: dict[str, str], where: str) -> str | None:
    """The row's split, if the table has a split column (then every row must name one)."""
    if "split" not in row:
        return None
    if row["split"] not in SPLITS:
        raise DataError(f"{where}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
    return row["split"]


def _with_splits(
    rows: list[tuple[Path, tuple[str, ...], str, str | None]], val_fraction: float, seed: int
) -> list[LabelledImage]:
    """Images with the table's splits, or with test and validation patients carved by `seed`."""
    carved = _carve([patient for *_, patient, _ in rows], {"test": TEST_FRACTION, "val": val_fraction}, seed)
    return [
        LabelledImage(path, labels, patient, split or carved[patient])
        for path, labels, patient, split in rows
    ]


def _list_once(listed: dict[Path, int], path: Path, line: int, where: str) -> None:
    """Refuse a second row for one image: it would be trained on twice, or in two splits."""
    if path in listed:
        raise DataError(f"{where}: image {path.name} is already listed on line {listed[path]}")
    listed[path] = line


def _carve(patients: Iterable[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Patient -> split: whole patients held out for each split in `fractions`, the rest "train".

    The patients are sorted before the seeded shuffle, so the carve depends on the set of
    patients and the seed only, not on the order files were listed in. A split asked for gets at
    least one patient, and training always keeps one.
    """
    ordered = sorted(set(patients))
    random.Random(seed).shuffle(ordered)
    assignment = dict.fromkeys(ordered, "train")
    start = 0
    for split, fraction in fractions.items():
        count = max(round(fraction * len(ordered)), 1) if fraction > 0 else 0
        count = max(min(count, len(ordered) - start - 1), 0)
        assignment.update(dict.fromkeys(ordered[start : start + count], split))
        start += count
    return assignment


# Selection and identity -----------------------------------------------------------------------


def few_shot(
    images: Sequence[LabelledImage], classes: Sequence[str], shots: int, seed: int
) -> tuple[LabelledImage, ...]:
    """`shots` images showing each class, drawn by `seed`, in the order of `images`.

    Classes are filled in the given order; an image drawn for one class counts for every class
    it shows, so with multi-label images a class may end up with more than `shots`. Raises
    DataError if a class has fewer than `shots` images.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    rng = random.Random(seed)
    chosen: set[Path] = set()
    for name in classes:
        showing = sorted({image.path for image in images if name in image.labels})
        have = sum(path in chosen for path in showing)
        candidates = [path for path in showing if path not in chosen]
        if len(showing) < shots:
            raise DataError(f"class {name!r} has {len(showing)} images, fewer than {shots} shots")
        chosen.update(rng.sample(candidates, max(shots - have, 0)))
    return tuple(image for image in images if image.path in chosen)


def data_fingerprint(data: LabelledData) -> str:
    """sha256 naming a dataset's content: every image's relative path, labels and split.

    Paths are taken relative to the images' common folder, so the same dataset gives the same
    fingerprint wherever it is mounted; pixels are not read, so it is cheap for 112K images.
    """
    root = os.path.commonpath([image.path.parent for image in data.images]) if data.images else "."
    records = sorted(
        (image.path.relative_to(root).as_posix(), list(image.labels), image.split) for image in data.images
    )
    return hashlib.sha256(json.dumps(records).encode("utf-8")).hexdigest()


# Pixels -----------------------------------------------------------------------------------------


def is_picture(path: Path) -> bool:
    """Whether a dataset file is a plain picture (PNG, JPEG, TIFF, BMP) rather than DICOM."""
    return path.suffix.lower() in PICTURE_SUFFIXES


def picture_display(path: Path) -> np.ndarray:
    """A picture as a display image, float32 in [0, 1]: (rows, cols) grayscale or (rows, cols, 3) RGB.

    16-bit grayscale is scaled by 65535, everything else by 255; colour with alpha or a palette
    is converted to RGB.
    """
    with Image.open(path) as picture:
        if picture.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.clip(np.asarray(picture, dtype=np.float64) / 65535, 0.0, 1.0).astype(np.float32)
        mode = "L" if picture.mode in ("1", "L", "LA") else "RGB"
        return (np.asarray(picture.convert(mode), dtype=np.float32) / 255).astype(np.float32)


def serving_sample(domain: str, path: Path, spec: InputSpec) -> Sample:
    """The Sample serving makes of a file: DICOM through the domain's preparer, pictures as they are."""
    if is_picture(path):
        return to_sample(path.stem, picture_display(path), spec)
    return prepare(domain, path, spec)


class TrainingImages(torch.utils.data.Dataset):
    """Labelled images as backbone input (3, S, S) float32 with multi-hot float32 targets.

    Without augmentation an item's pixels are exactly `serving_sample`'s. With augmentation
    (training images only) the display image is brightened by up to +-0.1 and rotated by up to
    +-15 degrees before `to_sample`, and Gaussian noise of sigma 0.02 (display units) is added
    after. An item's augmentation depends on (seed, epoch, index) only, so a run is
    reproducible and each epoch draws anew (`set_epoch`, before the loader starts its workers).
    Augmented DICOM is decoded with `display_pixels` directly, so
    the domain preparer's acceptance checks run on the un-augmented splits only.
    """

    def __init__(
        self,
        images: Sequence[LabelledImage],
        classes: Sequence[str],
        domain: str,
        spec: InputSpec,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.images = tuple(images)
        self.classes = tuple(classes)
        self.domain = domain
        self.spec = spec
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._index = {name: position for position, name in enumerate(self.classes)}
        for image in self.images:
            unknown = [label for label in image.labels if label not in self._index]
            if unknown:
                raise DataError(f"{image.path}: labels {unknown} are not among the classes {self.classes}")
            if augment and image.split != "train":
                raise ValueError(f"{image.path}: augmentation is for the train split, not {image.split!r}")

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentation of this epoch (loader workers copy the dataset when they start)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = range(len(self.images))[index]
        image = self.images[index]
        try:
            if self.augment:
                pixels = self._augmented(image.path, np.random.default_rng([self.seed, self.epoch, index]))
            else:
                pixels = serving_sample(self.domain, image.path, self.spec).pixels
        except (ImagingError, InvalidDicomError, UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{image.path}: cannot be prepared: {exc}") from exc
        target = np.zeros(len(self.classes), dtype=np.float32)
        target[[self._index[label] for label in image.labels]] = 1.0
        return torch.from_numpy(pixels), torch.from_numpy(target)

    def _augmented(self, path: Path, rng: np.random.Generator) -> np.ndarray:
        display = picture_display(path) if is_picture(path) else display_pixels(pydicom.dcmread(path))
        angle = rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES)
        shift = rng.uniform(-BRIGHTNESS, BRIGHTNESS)
        # Brighten before rotating so the corners the rotation uncovers stay black, as padding is.
        shown = _rotated(np.clip(display + shift, 0.0, 1.0), angle)
        pixels = to_sample(path.stem, shown, self.spec).pixels
        # One luminance field for every channel: a grayscale image stays gray, as in serving.
        noise = rng.normal(0.0, NOISE_SIGMA, size=pixels.shape[1:])
        std = np.asarray(self.spec.std, dtype=np.float64)[:, np.newaxis, np.newaxis]
        return (pixels + noise / std).astype(np.float32)


def _rotated(display: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate a (rows, cols[, 3]) float image about its centre, uncovered corners black."""
    planes = display[..., np.newaxis] if display.ndim == 2 else display
    rotated = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(planes[..., channel], dtype=np.float32)).rotate(
                degrees, resample=Image.Resampling.BILINEAR, fillcolor=0.0
            )
        )
        for channel in range(planes.shape[2])
    ]
    return rotated[0] if display.ndim == 2 else np.stack(rotated, axis=2)
