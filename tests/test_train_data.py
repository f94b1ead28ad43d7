"""Training data: each layout is read with its labels and patient-wise splits, bad data is
refused by file and line, and the tensors are exactly what serving prepares.

Datasets are written by tests/synthetic.py as real PNG, JPEG and DICOM files.
"""

from __future__ import annotations

import csv
import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from dicomnode import imaging
from dicomnode.flow import InputSpec
from dicomnode.imaging.common import to_sample
from dicomnode.train.data import (
    DataError,
    LabelledData,
    LabelledImage,
    TrainingImages,
    data_fingerprint,
    few_shot,
    read_dataset,
)
from tests import synthetic

# The ChestX-ray14 findings in the cxr prompt set's order and spelling.
CXR14 = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
OCT = ("CNV", "DME", "DRUSEN", "NORMAL")
# CLIP's statistics at a size other than the synthetic images', so resizing is exercised.
SPEC = InputSpec(
    image_size=56, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)
)


@pytest.fixture(scope="module")
def chestxray14(tmp_path_factory) -> Path:
    return synthetic.chestxray14(tmp_path_factory.mktemp("chestxray14"))


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory) -> Path:
    return synthetic.dicom_labels(tmp_path_factory.mktemp("dicom"), patients=20)


@pytest.fixture(scope="module")
def oct_folder(tmp_path_factory) -> Path:
    return synthetic.oct_folder(tmp_path_factory.mktemp("oct"))


def copy_of(folder: Path, tmp_path: Path) -> Path:
    """A private copy of a shared dataset, for a test that damages it."""
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def table_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def rewrite_cell(table: Path, line: int, column: str, value: str) -> None:
    """Set one cell of a CSV; `line` counts the header as line 1."""
    with table.open(newline="") as stream:
        rows = list(csv.reader(stream))
    rows[line - 1][rows[0].index(column)] = value
    with table.open("w", newline="") as stream:
        csv.writer(stream).writerows(rows)


def patients_by_split(data: LabelledData) -> dict[str, set[str]]:
    return {split: {image.patient for image in data.split(split)} for split in ("train", "val", "test")}


def assert_no_patient_in_two_splits(data: LabelledData) -> None:
    by_split = patients_by_split(data)
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]


# Layouts ----------------------------------------------------------------------------------


def test_chestxray14_is_read_with_its_labels_and_official_test_split(chestxray14: Path) -> None:
    data = read_dataset(chestxray14, CXR14)
    rows = table_rows(chestxray14 / "Data_Entry_2017.csv")
    test_names = set((chestxray14 / "test_list.txt").read_text().split())
    assert data.layout == "chestxray14"
    assert data.classes == ("Effusion", "Nodule", "Pneumothorax")  # the prompt set's order
    assert len(data.images) == len(rows) == 80
    for image, row in zip(data.images, rows, strict=True):
        assert image.path.name == row["Image Index"] and image.path.is_file()
        written = set(row["Finding Labels"].split("|")) - {"No Finding"}
        assert image.labels == tuple(name for name in CXR14 if name in written)
        assert (image.split == "test") == (image.path.name in test_names)
        assert image.patient == row["Patient ID"]
    assert any(not image.labels for image in data.images)


def test_chestxray14_validation_is_carved_by_patient_and_reproducible(chestxray14: Path) -> None:
    data = read_dataset(chestxray14, CXR14, val_fraction=0.2, seed=3)
    assert_no_patient_in_two_splits(data)
    train_val_names = set((chestxray14 / "train_val_list.txt").read_text().split())
    assert {image.path.name for image in data.split("val")} <= train_val_names
    by_split = patients_by_split(data)
    assert len(by_split["val"]) == round(0.2 * (len(by_split["train"]) + len(by_split["val"])))
    assert read_dataset(chestxray14, CXR14, val_fraction=0.2, seed=3) == data
    other = read_dataset(chestxray14, CXR14, val_fraction=0.2, seed=4)
    assert patients_by_split(other)["val"] != by_split["val"]
    assert patients_by_split(other)["test"] == by_split["test"]  # the official split stays


def test_class_names_match_ignoring_case_spaces_and_underscores(tmp_path: Path) -> None:
    folder = synthetic.chestxray14(tmp_path, classes=("Pleural_Thickening", "Effusion"), patients=8)
    data = read_dataset(folder, ["pleural thickening", "EFFUSION"])
    assert data.classes == ("pleural thickening", "EFFUSION")
    assert {label for image in data.images for label in image.labels} == set(data.classes)


def test_no_finding_is_a_label_only_if_the_prompt_set_knows_it(chestxray14: Path) -> None:
    without = read_dataset(chestxray14, CXR14)
    with_it = read_dataset(chestxray14, ("No Finding", *CXR14))
    for plain, labelled in zip(without.images, with_it.images, strict=True):
        assert labelled.labels == (plain.labels or ("No Finding",))
    assert with_it.classes[0] == "No Finding"


def test_dicom_folder_takes_patients_from_the_header_and_carves_splits_by_patient(
    dicom_folder: Path,
) -> None:
    data = read_dataset(dicom_folder, CXR14, val_fraction=0.1, seed=0)
    rows = table_rows(dicom_folder / "labels.csv")
    assert data.layout == "dicom-labels"
    for image, row in zip(data.images, rows, strict=True):
        assert image.path == dicom_folder / row["path"]
        assert image.labels == tuple(name for name in CXR14 if name in row["labels"].split("|"))
        assert image.patient == pydicom.dcmread(image.path).PatientID
    assert_no_patient_in_two_splits(data)
    assert {split: len(patients) for split, patients in patients_by_split(data).items()} == {
        "train": 16,
        "val": 2,
        "test": 2,
    }


def test_dicom_folder_honours_given_patients_and_splits_and_refuses_an_unknown_split(
    dicom_folder: Path, tmp_path: Path
) -> None:
    folder = copy_of(dicom_folder, tmp_path)
    rows = table_rows(folder / "labels.csv")
    given = [
        dict(row, patient=f"p{index % 3}", split=("train", "val", "test")[index % 3])
        for index, row in enumerate(rows)
    ]
    with (folder / "labels.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, ["path", "labels", "patient", "split"])
        writer.writeheader()
        writer.writerows(given)
    data = read_dataset(folder, CXR14)
    assert [(image.patient, image.split) for image in data.images] == [
        (row["patient"], row["split"]) for row in given
    ]
    rewrite_cell(folder / "labels.csv", 4, "split", "holdout")
    with pytest.raises(DataError, match=r"labels\.csv:4: split 'holdout'"):
        read_dataset(folder, CXR14)


def test_image_folders_are_labelled_by_folder_with_validation_carved_by_patient(oct_folder: Path) -> None:
    data = read_dataset(oct_folder, OCT, val_fraction=0.25, seed=1)
    assert data.layout == "image-folder"
    assert data.classes == OCT
    for image in data.images:
        assert image.labels == (image.path.parent.name,)
        part = image.path.parent.parent.name
        assert image.split == part if part == "test" else image.split in ("train", "val")
        assert image.patient == image.path.stem.split("-")[1]  # CNV-1016042-1: patient 1016042
    assert Counter(image.split for image in data.images)["test"] == len(list(oct_folder.glob("test/*/*")))
    assert data.split("val")
    assert_no_patient_in_two_splits(data)


def test_image_folder_named_after_no_known_class_is_refused(oct_folder: Path) -> None:
    with pytest.raises(DataError, match=r"train/NORMAL: label 'NORMAL' is not a class"):
        read_dataset(oct_folder, ("CNV", "DME", "DRUSEN"))


def test_tile_table_gives_one_label_per_tile(tmp_path: Path) -> None:
    folder = synthetic.tiles(tmp_path)
    data = read_dataset(folder, ("Adipose", "Simple_Stroma", "Tumour_Epithelium", "Debris"))
    assert data.layout == "tile-csv"
    assert data.classes == ("Adipose", "Simple_Stroma", "Tumour_Epithelium")
    written = {folder / row["path"]: row["label"] for row in table_rows(folder / "tiles.csv")}
    for image in data.images:
        assert image.labels[0].replace("_", " ").lower() == written[image.path]
    assert_no_patient_in_two_splits(data)


def test_folder_of_no_known_layout_is_refused_listing_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError) as refused:
        read_dataset(tmp_path, CXR14)
    for marker in ("Data_Entry_2017.csv", "labels.csv", "tiles.csv", "train/ and test/"):
        assert marker in str(refused.value)


# Bad data ---------------------------------------------------------------------------------


def test_unknown_label_is_refused_naming_it_and_its_line(chestxray14: Path, tmp_path: Path) -> None:
    folder = copy_of(chestxray14, tmp_path)
    rewrite_cell(folder / "Data_Entry_2017.csv", 5, "Finding Labels", "Effusion|Mystery")
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv:5: label 'Mystery' is not a class"):
        read_dataset(folder, CXR14)


def test_listed_image_missing_on_disk_is_refused_naming_it(chestxray14: Path, tmp_path: Path) -> None:
    folder = copy_of(chestxray14, tmp_path)
    victim = next(folder.glob("images_002/images/*.png"))
    victim.unlink()
    with pytest.raises(DataError, match=rf"image {victim.name} is not on disk"):
        read_dataset(folder, CXR14)


@pytest.mark.parametrize("split_list", ["train_val_list.txt", "test_list.txt"])
def test_missing_split_list_is_refused_naming_it(chestxray14: Path, tmp_path: Path, split_list: str) -> None:
    folder = copy_of(chestxray14, tmp_path)
    (folder / split_list).unlink()
    with pytest.raises(DataError, match=rf"official split list\(s\) {split_list}$"):
        read_dataset(folder, CXR14)


def test_patient_is_never_shown_in_an_images_repr(dicom_folder: Path) -> None:
    image = read_dataset(dicom_folder, CXR14).images[0]
    assert image.patient.startswith("SYN") and image.patient not in repr(image)


# Selection and identity -------------------------------------------------------------------


def test_few_shot_draws_k_images_per_class_by_seed(oct_folder: Path, chestxray14: Path) -> None:
    train = read_dataset(oct_folder, OCT).split("train")
    drawn = few_shot(train, OCT, shots=3, seed=0)
    assert Counter(label for image in drawn for label in image.labels) == dict.fromkeys(OCT, 3)
    assert few_shot(train, OCT, shots=3, seed=0) == drawn
    assert few_shot(train, OCT, shots=3, seed=1) != drawn
    with pytest.raises(DataError, match="class 'CNV' has"):
        few_shot(train, OCT, shots=100, seed=0)
    multi = read_dataset(chestxray14, CXR14)
    drawn = few_shot(multi.split("train"), multi.classes, shots=4, seed=0)
    assert all(sum(name in image.labels for image in drawn) >= 4 for name in multi.classes)
    assert len(drawn) <= 4 * len(multi.classes)


def test_fingerprint_names_the_labels_splits_and_files_not_the_mount(
    chestxray14: Path, tmp_path: Path
) -> None:
    data = read_dataset(chestxray14, CXR14)
    fingerprint = data_fingerprint(data)
    assert data_fingerprint(read_dataset(copy_of(chestxray14, tmp_path), CXR14)) == fingerprint
    first = data.images[0]
    relabelled = dataclasses.replace(first, labels=() if first.labels else ("Effusion",))
    changed = dataclasses.replace(data, images=(relabelled, *data.images[1:]))
    assert data_fingerprint(changed) != fingerprint
    moved = dataclasses.replace(first, split="val" if first.split != "val" else "train")
    assert data_fingerprint(dataclasses.replace(data, images=(moved, *data.images[1:]))) != fingerprint


# Pixels -----------------------------------------------------------------------------------


def test_dicom_pixels_are_exactly_what_serving_prepares(dicom_folder: Path) -> None:
    data = read_dataset(dicom_folder, CXR14)
    dataset = TrainingImages(data.images, data.classes, "cxr", SPEC)
    for index in (0, 1):  # the synthetic files alternate 8-bit and 16-bit
        pixels, target = dataset[index]
        image = data.images[index]
        assert pydicom.dcmread(image.path).BitsAllocated == (8, 16)[index]
        assert pixels.dtype == torch.float32 and pixels.shape == (3, 56, 56)
        assert np.array_equal(pixels.numpy(), imaging.prepare("cxr", image.path, SPEC).pixels)
        assert target.tolist() == [float(name in image.labels) for name in data.classes]


def test_png_pixels_are_exactly_what_to_sample_makes_of_the_picture(chestxray14: Path) -> None:
    data = read_dataset(chestxray14, CXR14)
    dataset = TrainingImages(data.images, data.classes, "cxr", SPEC)
    for index, image in enumerate(data.images[:4]):
        display = np.asarray(Image.open(image.path), dtype=np.float32) / 255
        pixels, target = dataset[index]
        assert np.array_equal(pixels.numpy(), to_sample("any", display, SPEC).pixels)
        assert target.dtype == torch.float32
        assert target.tolist() == [float(name in image.labels) for name in data.classes]


@pytest.mark.parametrize("layout", ["png", "dicom"])
def test_augmentation_changes_pixels_keeps_their_shape_and_is_reproducible(
    layout: str, chestxray14: Path, dicom_folder: Path
) -> None:
    data = read_dataset(chestxray14 if layout == "png" else dicom_folder, CXR14)
    train = data.split("train")[:3]
    plain = TrainingImages(train, data.classes, "cxr", SPEC)
    augmented = TrainingImages(train, data.classes, "cxr", SPEC, augment=True, seed=7)
    again = TrainingImages(train, data.classes, "cxr", SPEC, augment=True, seed=7)
    reseeded = TrainingImages(train, data.classes, "cxr", SPEC, augment=True, seed=8)
    for index in range(len(train)):
        pixels, target = augmented[index]
        assert pixels.shape == plain[index][0].shape and pixels.dtype == torch.float32
        assert not torch.allclose(pixels, plain[index][0], atol=0.05)
        assert torch.equal(pixels, again[index][0])
        assert not torch.equal(pixels, reseeded[index][0])
        assert torch.equal(target, plain[index][1])
    assert not torch.equal(augmented[0][0], augmented[1][0])


def test_augmentation_is_a_rotation_brightness_shift_and_noise_of_the_stated_sizes(tmp_path: Path) -> None:
    """On a flat grey picture: the centre moves by the brightness shift plus sigma 0.02 noise,
    and the corners the rotation uncovers turn black."""
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((64, 64), 128, dtype=np.uint8)).save(path)
    flat = [LabelledImage(path, (), "p", "train")]
    display_units = InputSpec(image_size=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    shifts, dark_corners = [], 0
    for seed in range(8):
        pixels = TrainingImages(flat, (), "cxr", display_units, augment=True, seed=seed)[0][0].numpy()
        centre = pixels[0, 24:40, 24:40]
        shifts.append(float(centre.mean()) - 128 / 255)
        assert 0.015 < centre.std() < 0.025
        dark_corners += bool(pixels[0, :2, :2].mean() < 0.25)
    assert all(abs(shift) < 0.1 + 0.01 for shift in shifts) and np.ptp(shifts) > 0.05
    assert dark_corners >= 4


def test_augmentation_is_refused_outside_the_train_split(chestxray14: Path) -> None:
    data = read_dataset(chestxray14, CXR14)
    with pytest.raises(ValueError, match="'test'"):
        TrainingImages(data.split("test"), data.classes, "cxr", SPEC, augment=True)


def test_image_that_cannot_be_prepared_is_refused_naming_its_file(dicom_folder: Path, tmp_path: Path) -> None:
    folder = copy_of(dicom_folder, tmp_path)
    data = read_dataset(folder, CXR14)
    data.images[2].path.write_bytes(b"not a DICOM file")
    with pytest.raises(DataError, match=rf"{data.images[2].path}: cannot be prepared"):
        TrainingImages(data.images, data.classes, "cxr", SPEC)[2]


# The synthetic data itself ----------------------------------------------------------------

# Where each sign of synthetic.chestxray14 can fall at 64 px, jitter included; the regions
# do not overlap, so a bright region means that finding and no other.
SIGN_REGIONS = {
    "Effusion": (slice(43, 64), slice(0, 64)),
    "Pneumothorax": (slice(0, 28), slice(0, 28)),
    "Nodule": (slice(20, 44), slice(30, 56)),
}


def test_synthetic_images_show_exactly_their_labelled_findings(chestxray14: Path) -> None:
    for image in read_dataset(chestxray14, CXR14).images:
        pixels = np.asarray(Image.open(image.path), dtype=np.float32) / 255
        for name, region in SIGN_REGIONS.items():
            assert ((pixels[region] > 0.8).sum() > 50) == (name in image.labels), (image.path.name, name)


def test_each_epoch_draws_its_own_augmentation_and_the_same_epoch_the_same(tmp_path):
    root = synthetic.chestxray14(tmp_path / "cxr", patients=4, seed=3)
    data = read_dataset(root, ("Effusion", "Pneumothorax", "Nodule"))
    spec = InputSpec(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = TrainingImages(data.split("train"), data.classes, "cxr", spec, augment=True, seed=1)

    first = images[0][0]
    images.set_epoch(1)
    second = images[0][0]
    images.set_epoch(0)

    assert not torch.equal(first, second)
    assert torch.equal(images[0][0], first)
