"""The values that travel between the rooms of the node, in the order of the flow.

spool -> StoredInstance -> routing -> StudyJob -> imaging -> Sample -> engine -> Prediction
-> results -> ResultSet -> outbox -> Delivery.

Each room reads only these values from its neighbours, never their internals, so a room can
be rewritten without touching the others. Nothing here imports torch or pynetdicom.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class StoredInstance:
    """One received instance, durable on disk and committed in the journal."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: Path
    calling_ae: str


@dataclass(frozen=True)
class StudyJob:
    """A quiet study that a routing rule assigned to a prompt set."""

    study_instance_uid: str
    prompt_set: str
    rule: str
    instances: tuple[StoredInstance, ...]


@dataclass(frozen=True)
class InputSpec:
    """What the backbone expects of an image: square side in pixels and channel statistics."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class Region:
    """A rectangle of a source image in pixels: top-left column and row, then its size.

    For a whole-slide image the coordinates are those of the level's Total Pixel Matrix
    (PS3.3 C.8.12.4.1.1), so a tile can be found again in any viewer.
    """

    column: int
    row: int
    columns: int
    rows: int


@dataclass(frozen=True)
class Sample:
    """One image ready for the backbone, with the instance (and frame, or region) it came from.

    `pixels` is float32, shape (3, image_size, image_size), already normalised with the
    backbone's mean and std. `display` is the same image as uint8 (rows, columns) after the
    viewer's transforms (modality LUT, VOI, MONOCHROME1 inversion), kept for the rendered
    Secondary Capture. A single-frame image gives one sample with `frame` None; a volume gives
    one per frame (`frame` is the 1-based frame number, PS3.3 C.7.6.6); a slide gives one per
    tissue tile, with its `region` and the frame it was read from where that is one frame.
    """

    sop_instance_uid: str
    pixels: np.ndarray
    display: np.ndarray
    frame: int | None = None
    region: Region | None = None


@dataclass(frozen=True)
class Code:
    """A coded concept as a prompt set declares it (value, coding scheme designator, meaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Finding:
    """One class of a prompt set as the results need it: name, code and decision threshold."""

    name: str
    code: Code
    threshold: float


@dataclass(frozen=True)
class Prediction:
    """Per-finding probabilities for one image, from one prompt set on one backbone."""

    sop_instance_uid: str
    probabilities: tuple[float, ...]
    frame: int | None = None


#: How a study's per-sample probabilities become one per finding (promptset.yaml `aggregate`).
AGGREGATIONS = ("max", "mean", "top-k")


@dataclass(frozen=True)
class Aggregation:
    """How the probabilities of a study's samples (images, B-scans, tiles) make one per finding.

    `max`: a finding seen on any one sample is a finding of the study (chest views). `mean`:
    the average over all samples. `top-k`: the mean of the `k` highest, which a single noisy
    B-scan cannot dominate and a lesion seen on a few scans of a volume still reaches.
    """

    method: str = "max"
    k: int = 1

    def combine(self, values: list[float]) -> float:
        """One value from the samples' probabilities of one finding."""
        if self.method == "mean":
            return sum(values) / len(values)
        if self.method == "top-k":
            top = sorted(values, reverse=True)[: self.k]
            return sum(top) / len(top)
        return max(values)

    def describe(self) -> str:
        """The rule in words, for the rendered capture."""
        return {"max": "highest", "mean": "mean", "top-k": f"mean of the {self.k} highest"}[self.method]


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a prediction: recorded in every result so a reader can trace it."""

    algorithm_name: str
    algorithm_version: str
    prompt_set: str
    prompt_set_sha256: str
    backbone: str
    backbone_sha256: str | None
    demo: bool
    backbone_seed: int | None = None

    @property
    def backbone_identity(self) -> str:
        """The backbone's architecture and weights: the checkpoint's sha256, or the DEMO seed."""
        if self.backbone_sha256:
            return f"{self.backbone} sha256 {self.backbone_sha256}"
        return f"{self.backbone} random weights, DEMO seed {self.backbone_seed}"

    @property
    def parameters(self) -> str:
        """The algorithm parameters as one line, for TID 4019's Algorithm Parameters."""
        return f"prompt set {self.prompt_set} sha256 {self.prompt_set_sha256}; {self.backbone_identity}"


@dataclass(frozen=True)
class ObjectReference:
    """A DICOM object the node wrote, as another object (or the journal) refers to it."""

    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class ReportVersion:
    """One version of a study's results, remembered in the journal so a later one can supersede it.

    `content_key` names what the results were made from (source instances, prompt set, backbone,
    algorithm version); `number` counts the study's versions from 1; `replaces` is the SR of
    the version this one supersedes, None for the first.
    """

    study_instance_uid: str
    number: int
    content_key: str
    sr: ObjectReference
    sc: ObjectReference
    replaces: ObjectReference | None


@dataclass(frozen=True)
class ResultSet:
    """The DICOM objects written for one study, on disk in the outbox folder."""

    study_instance_uid: str
    paths: tuple[Path, ...]
    version: ReportVersion | None = None


@dataclass(frozen=True)
class Delivery:
    """One file to send to one destination; a row of the outbox."""

    id: int
    destination: str
    path: Path
    attempts: int
    first_failed_at: float | None = None
