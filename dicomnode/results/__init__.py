"""The results room: predictions for one study become a DICOM SR and a Secondary Capture.

`write_results` is the room's only door. It checks that its inputs describe one study
consistently, decides each finding for the study (the samples' probabilities aggregated as the
prompt set says, against the finding's threshold), builds the SR (`sr.py`) and the SC (`sc.py`)
in two new series of the source study, and writes both files atomically. A sample is an image,
a frame of a volume or a tile of a slide; the results name the frames that drove each finding.
Of a slide (`slide.py`) they also give each class's tissue area, outline the strongest tiles of
the first class in the SR, and show the tiles' scores as a heat map on the slide in the SC.
Nothing here knows about torch: the engine's output arrives as plain `Prediction` values.

Versions: the caller passes the study's latest report version from the journal. Results made
from the same content as that version are written again identically (same UIDs, same
predecessor); results from other content are the next version: new UIDs (`uids.py`), an SR
whose Predecessor Documents Sequence (PS3.3 C.17.2) references the SR it replaces, and series
descriptions that say so ("v2, replaces v1"), so a radiologist never sees two reports of one
study standing side by side unexplained.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from dicomnode.durable import make_folder_durably, write_durably
from dicomnode.flow import (
    Aggregation,
    Code,
    Finding,
    ModelIdentity,
    ObjectReference,
    Prediction,
    ReportVersion,
    ResultSet,
    Sample,
)
from dicomnode.privacy import uid_tag
from dicomnode.results import slide
from dicomnode.results.sc import build_secondary_capture
from dicomnode.results.sr import StudyFinding, build_report
from dicomnode.results.uids import content_key, derive_uid

__all__ = ["ResultsError", "StudyFinding", "write_results"]

# Series numbers of the two output series: high, so that they sort after the acquired series
# in a viewer's series list.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902

SERIES_DESCRIPTION = "dicomnode AI findings"
IMAGE_DESCRIPTION = "dicomnode AI image"
DEMO_SUFFIX = " - no clinical meaning"


class ResultsError(ValueError):
    """The inputs of `write_results` do not describe one study consistently."""


def write_results(
    *,
    out_dir: Path,
    sources: Sequence[pydicom.Dataset],
    samples: Sequence[Sample],
    predictions: Sequence[Prediction],
    findings: Sequence[Finding],
    procedure: Code,
    model: ModelIdentity,
    aggregation: Aggregation | None = None,
    latest: ReportVersion | None = None,
) -> ResultSet:
    """Write the study's SR and SC into `out_dir` and return their paths (SR first) and version.

    `sources[i]`, `samples[i]` and `predictions[i]` describe the same sample (the header of its
    instance, repeated for each frame or tile), and the probabilities of each prediction follow
    the order of `findings`; `aggregation` (default: the maximum) makes one per finding.
    `latest` is the study's latest report version the journal remembers, None if it has none:
    the same content writes that version again, byte for byte the same UIDs, so a PACS replaces
    rather than duplicates; other content writes the next version, which supersedes `latest`.
    Raises `ResultsError` naming the attribute or UID at fault.
    """
    _check_inputs(sources, samples, predictions, findings)
    instances = [_with_type2_patient_and_study(ds) for ds in _distinct(sources)]
    aggregation = aggregation or Aggregation()
    study_findings = _study_findings(findings, predictions, aggregation)
    study_instance_uid = str(instances[0].StudyInstanceUID)
    content = content_key(source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in instances], model=model)
    if latest is not None and latest.study_instance_uid != study_instance_uid:
        raise ResultsError(
            f"the latest report version given belongs to study {uid_tag(latest.study_instance_uid)}, "
            f"the sources to {uid_tag(study_instance_uid)}"
        )
    if latest is not None and latest.content_key == content:
        number, replaces = latest.number, latest.replaces
    else:
        number, replaces = (1, None) if latest is None else (latest.number + 1, latest.sr)

    def uid(role: str) -> str:
        return derive_uid(
            content=content, role=role, replaces=None if replaces is None else replaces.sop_instance_uid
        )

    regions = []
    if slide.is_slide(samples):
        tissue = slide.composition(samples, predictions, sources)
        areas = tissue.areas_mm2
        study_findings = [replace(f, area_mm2=a) for f, a in zip(study_findings, areas, strict=True)]
        regions = slide.tile_regions(
            samples=samples, predictions=predictions, sources=sources, finding=findings[0], model=model
        )
    report = build_report(
        sources=instances,
        findings=study_findings,
        procedure=procedure,
        model=model,
        series_instance_uid=uid("sr-series"),
        sop_instance_uid=uid("sr-instance"),
        series_number=SR_SERIES_NUMBER,
        series_description=series_description(SERIES_DESCRIPTION, number, demo=model.demo),
        replaces=None if replaces is None else _predecessor(replaces, study_instance_uid),
        regions=regions,
    )
    if slide.is_slide(samples):
        display, shown, basis = _slide_capture(samples, predictions, sources, findings, aggregation)
    else:
        shown = _shown_samples(study_findings, samples)
        display = _side_by_side([samples[i] for i in shown])
        kind = "frames" if samples[shown[0]].frame is not None else "images"
        basis = f"{aggregation.describe()} over {len(samples)} {kind}"
    frames = [samples[i].frame for i in shown if samples[i].frame is not None]
    capture = build_secondary_capture(
        source=next(ds for ds in instances if ds.SOPInstanceUID == samples[shown[0]].sop_instance_uid),
        display=display,
        findings=study_findings,
        model=model,
        basis=basis,
        frames=frames,
        series_instance_uid=uid("sc-series"),
        sop_instance_uid=uid("sc-instance"),
        series_number=SC_SERIES_NUMBER,
        series_description=series_description(IMAGE_DESCRIPTION, number, demo=model.demo),
    )

    make_folder_durably(out_dir)  # synced to its parent: journal rows will point into it
    sr_path = _save(report, out_dir / f"sr-{report.SOPInstanceUID}.dcm")
    sc_path = _save(capture, out_dir / f"sc-{capture.SOPInstanceUID}.dcm")
    version = ReportVersion(
        study_instance_uid=study_instance_uid,
        number=number,
        content_key=content,
        sr=_reference(report),
        sc=_reference(capture),
        replaces=replaces,
        prompt_set=model.prompt_set,
    )
    return ResultSet(study_instance_uid=study_instance_uid, paths=(sr_path, sc_path), version=version)


def series_description(kind: str, number: int, *, demo: bool) -> str:
    """What a viewer's series list shows for one output of report version `number`.

    "dicomnode AI findings" for the first version, "dicomnode AI findings v2, replaces v1" for
    a later one; a DEMO model's outputs start with DEMO and say they have no clinical meaning
    when that fits the 64 characters of a Long String (DEMO always fits).
    """
    description = kind if number == 1 else f"{kind} v{number}, replaces v{number - 1}"
    if not demo:
        return description
    marked = f"DEMO {description}{DEMO_SUFFIX}"
    return marked if len(marked) <= 64 else f"DEMO {description}"


def _predecessor(replaces: ObjectReference, study_instance_uid: str) -> pydicom.Dataset:
    """The earlier SR as the Predecessor Documents Sequence needs it: study, series, SOP."""
    earlier = pydicom.Dataset()
    earlier.StudyInstanceUID = study_instance_uid
    earlier.SeriesInstanceUID = replaces.series_instance_uid
    earlier.SOPInstanceUID = replaces.sop_instance_uid
    earlier.SOPClassUID = replaces.sop_class_uid
    return earlier


def _reference(dataset: pydicom.Dataset) -> ObjectReference:
    return ObjectReference(
        series_instance_uid=str(dataset.SeriesInstanceUID),
        sop_instance_uid=str(dataset.SOPInstanceUID),
        sop_class_uid=str(dataset.SOPClassUID),
    )


#: Type 2 attributes of the Patient and General Study modules that the results copy from the
#: source. A modality may leave them out (they are required, but may be empty): the results
#: then carry them empty, as the standard allows, instead of failing the study.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _with_type2_patient_and_study(source: pydicom.Dataset) -> pydicom.Dataset:
    """The source header, with the Type 2 attributes it lacks present and empty (a copy)."""
    missing = [keyword for keyword in _TYPE2_COPIED if keyword not in source]
    if not missing:
        return source
    completed = copy.deepcopy(source)
    for keyword in missing:
        setattr(completed, keyword, "")
    return completed


def _check_inputs(
    sources: Sequence[pydicom.Dataset],
    samples: Sequence[Sample],
    predictions: Sequence[Prediction],
    findings: Sequence[Finding],
) -> None:
    """Raise ResultsError unless the inputs line up instance by instance, in one study."""
    if not sources:
        raise ResultsError("no source instances: a result needs at least one image")
    if not findings:
        raise ResultsError("no findings: the prompt set declares no classes")
    if not len(sources) == len(samples) == len(predictions):
        raise ResultsError(
            f"{len(sources)} sources, {len(samples)} samples and {len(predictions)} predictions: "
            "expected one of each per instance"
        )
    for attribute in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        for index, ds in enumerate(sources):
            if not ds.get(attribute):
                raise ResultsError(f"source {index} has no {attribute}")
    study_uids = {str(ds.StudyInstanceUID) for ds in sources}
    if len(study_uids) > 1:
        raise ResultsError(f"sources belong to several studies: {sorted(map(uid_tag, study_uids))}")
    seen: set[tuple] = set()
    for ds, sample, prediction in zip(sources, samples, predictions, strict=True):
        _check_sample(ds, sample, prediction, len(findings), seen)


def _check_sample(
    source: pydicom.Dataset,
    sample: Sample,
    prediction: Prediction,
    finding_count: int,
    seen: set[tuple],
) -> None:
    """One sample: same SOP Instance UID and frame everywhere, not seen before, usable values."""
    uid = str(source.SOPInstanceUID)
    key = (uid, sample.frame, sample.region)
    # Messages reach the log and `dicomnode status`: UIDs as tags only.
    where = uid_tag(uid) if sample.frame is None else f"{uid_tag(uid)} frame {sample.frame}"
    if key in seen:
        raise ResultsError(f"instance {where} appears twice among the samples")
    seen.add(key)
    if sample.sop_instance_uid != uid or prediction.sop_instance_uid != uid:
        raise ResultsError(
            f"instance {uid_tag(uid)} of the source does not match sample "
            f"{uid_tag(sample.sop_instance_uid)} and prediction {uid_tag(prediction.sop_instance_uid)}"
        )
    if prediction.frame != sample.frame:
        raise ResultsError(f"prediction for instance {where} is for frame {prediction.frame}")
    if len(prediction.probabilities) != finding_count:
        raise ResultsError(
            f"prediction for instance {where} has {len(prediction.probabilities)} "
            f"probabilities for {finding_count} findings"
        )
    if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in prediction.probabilities):
        raise ResultsError(f"prediction for instance {where} has a probability outside [0, 1]")
    display = np.asarray(sample.display)
    if display.ndim != 2 or display.dtype != np.uint8 or 0 in display.shape:
        raise ResultsError(
            f"sample display for instance {where} is {display.dtype} {display.shape}, "
            "expected a non-empty uint8 rows x columns image"
        )


def _distinct(sources: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Each instance once, in the order of its first sample."""
    return list({str(ds.SOPInstanceUID): ds for ds in reversed(sources)}.values())[::-1]


#: How many of the highest-scoring samples the results name as a finding's evidence.
EVIDENCE_SAMPLES = 3


def _study_findings(
    findings: Sequence[Finding], predictions: Sequence[Prediction], aggregation: Aggregation
) -> list[StudyFinding]:
    """Each finding with its study probability and the samples that drove it, strongest first."""
    decided = []
    for index, finding in enumerate(findings):
        values = [p.probabilities[index] for p in predictions]
        ranked = sorted(range(len(values)), key=lambda i: -values[i])[: max(EVIDENCE_SAMPLES, aggregation.k)]
        evidence = tuple((predictions[i].sop_instance_uid, predictions[i].frame) for i in ranked)
        decided.append(StudyFinding(finding, aggregation.combine(values), evidence))
    return decided


def _shown_samples(findings: Sequence[StudyFinding], samples: Sequence[Sample]) -> list[int]:
    """Which samples the capture shows: the evidence of the leading finding.

    The leading finding is the most probable present one, else the most probable. Of single
    images the capture shows the strongest; of a volume, its strongest frames side by side.
    """
    lead = max(findings, key=lambda f: (f.present, f.probability))
    index = {(s.sop_instance_uid, s.frame): i for i, s in enumerate(samples)}
    shown = [index[key] for key in lead.evidence if key in index]
    if samples[shown[0]].frame is None:
        return shown[:1]
    return [i for i in shown if samples[i].frame is not None][:EVIDENCE_SAMPLES]


def _slide_capture(
    samples: Sequence[Sample],
    predictions: Sequence[Prediction],
    sources: Sequence[pydicom.Dataset],
    findings: Sequence[Finding],
    aggregation: Aggregation,
) -> tuple[np.ndarray, list[int], str]:
    """A slide's heat map, the tile it centres on (the strongest of the first class) and its basis.

    Of a study with several slides, the capture shows the slide holding that tile.
    """
    first = slide.strongest(predictions)[0]
    kept = slide.slide_samples(samples, sources, first)
    display = slide.heat_map(
        samples=[samples[i] for i in kept],
        predictions=[predictions[i] for i in kept],
        sources=[sources[i] for i in kept],
        findings=findings,
        shares=slide.composition(
            [samples[i] for i in kept], [predictions[i] for i in kept], [sources[i] for i in kept]
        ),
    )
    return display, [first], f"{aggregation.describe()} over {len(samples)} tissue tiles"


def _side_by_side(samples: Sequence[Sample]) -> np.ndarray:
    """The samples' display images in a row, each scaled to the height of the first."""
    if len(samples) == 1:
        return samples[0].display
    height = samples[0].display.shape[0]
    gap = np.zeros((height, max(4, height // 64)), dtype=np.uint8)
    parts = []
    for sample in samples:
        rows, columns = sample.display.shape
        width = max(1, round(columns * height / rows))
        resized = Image.fromarray(sample.display).resize((width, height), Image.Resampling.LANCZOS)
        parts += [np.asarray(resized, dtype=np.uint8), gap]
    return np.hstack(parts[:-1])


def _save(dataset: pydicom.Dataset, path: Path) -> Path:
    """Write `dataset` as a DICOM file so that a reader never sees a partial file."""
    return write_durably(path, lambda stream: dataset.save_as(stream, enforce_file_format=True))
