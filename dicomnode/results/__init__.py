"""The results room: predictions for one study become a DICOM SR and a Secondary Capture.

`write_results` is the room's only door. It checks that its inputs describe one study
consistently, decides each finding for the study (highest probability over the images against
the finding's threshold), builds the SR (`sr.py`) and the SC (`sc.py`) in two new series of
the source study, and writes both files atomically. Nothing here knows about torch: the
engine's output arrives as plain `Prediction` values.

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
from pathlib import Path

import numpy as np
import pydicom

from dicomnode.durable import write_durably
from dicomnode.flow import (
    Code,
    Finding,
    ModelIdentity,
    ObjectReference,
    Prediction,
    ReportVersion,
    ResultSet,
    Sample,
)
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
    latest: ReportVersion | None = None,
) -> ResultSet:
    """Write the study's SR and SC into `out_dir` and return their paths (SR first) and version.

    `sources[i]`, `samples[i]` and `predictions[i]` describe the same instance, and the
    probabilities of each prediction follow the order of `findings`. `latest` is the study's
    latest report version the journal remembers, None if it has none: the same content writes
    that version again, byte for byte the same UIDs, so a PACS replaces rather than duplicates;
    other content writes the next version, which supersedes `latest`. Raises `ResultsError`
    naming the attribute or UID at fault.
    """
    _check_inputs(sources, samples, predictions, findings)
    sources = [_with_type2_patient_and_study(ds) for ds in sources]
    study_findings = _study_findings(findings, predictions)
    study_instance_uid = str(sources[0].StudyInstanceUID)
    content = content_key(source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in sources], model=model)
    if latest is not None and latest.study_instance_uid != study_instance_uid:
        raise ResultsError(
            f"the latest report version given belongs to StudyInstanceUID {latest.study_instance_uid}, "
            f"the sources to {study_instance_uid}"
        )
    if latest is not None and latest.content_key == content:
        number, replaces = latest.number, latest.replaces
    else:
        number, replaces = (1, None) if latest is None else (latest.number + 1, latest.sr)

    def uid(role: str) -> str:
        return derive_uid(
            content=content, role=role, replaces=None if replaces is None else replaces.sop_instance_uid
        )

    report = build_report(
        sources=sources,
        findings=study_findings,
        procedure=procedure,
        model=model,
        series_instance_uid=uid("sr-series"),
        sop_instance_uid=uid("sr-instance"),
        series_number=SR_SERIES_NUMBER,
        series_description=series_description(SERIES_DESCRIPTION, number, demo=model.demo),
        replaces=None if replaces is None else _predecessor(replaces, study_instance_uid),
    )
    shown = _most_salient_image(predictions)
    capture = build_secondary_capture(
        source=sources[shown],
        display=samples[shown].display,
        findings=study_findings,
        model=model,
        image_count=len(sources),
        series_instance_uid=uid("sc-series"),
        sop_instance_uid=uid("sc-instance"),
        series_number=SC_SERIES_NUMBER,
        series_description=series_description(IMAGE_DESCRIPTION, number, demo=model.demo),
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    sr_path = _save(report, out_dir / f"sr-{report.SOPInstanceUID}.dcm")
    sc_path = _save(capture, out_dir / f"sc-{capture.SOPInstanceUID}.dcm")
    version = ReportVersion(
        study_instance_uid=study_instance_uid,
        number=number,
        content_key=content,
        sr=_reference(report),
        sc=_reference(capture),
        replaces=replaces,
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
        raise ResultsError(f"sources belong to several studies: StudyInstanceUID {sorted(study_uids)}")
    seen: set[str] = set()
    for ds, sample, prediction in zip(sources, samples, predictions, strict=True):
        _check_instance(ds, sample, prediction, len(findings), seen)


def _check_instance(
    source: pydicom.Dataset,
    sample: Sample,
    prediction: Prediction,
    finding_count: int,
    seen: set[str],
) -> None:
    """One instance: same SOP Instance UID everywhere, not seen before, usable values."""
    uid = str(source.SOPInstanceUID)
    if uid in seen:
        raise ResultsError(f"SOPInstanceUID {uid} appears twice among the sources")
    seen.add(uid)
    if sample.sop_instance_uid != uid or prediction.sop_instance_uid != uid:
        raise ResultsError(
            f"SOPInstanceUID {uid} of the source does not match sample {sample.sop_instance_uid} "
            f"and prediction {prediction.sop_instance_uid}"
        )
    if len(prediction.probabilities) != finding_count:
        raise ResultsError(
            f"prediction for SOPInstanceUID {uid} has {len(prediction.probabilities)} "
            f"probabilities for {finding_count} findings"
        )
    if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in prediction.probabilities):
        raise ResultsError(f"prediction for SOPInstanceUID {uid} has a probability outside [0, 1]")
    display = np.asarray(sample.display)
    if display.ndim != 2 or display.dtype != np.uint8 or 0 in display.shape:
        raise ResultsError(
            f"sample display for SOPInstanceUID {uid} is {display.dtype} {display.shape}, "
            "expected a non-empty uint8 rows x columns image"
        )


def _study_findings(findings: Sequence[Finding], predictions: Sequence[Prediction]) -> list[StudyFinding]:
    """Each finding with its highest probability over the study's images.

    The maximum, because a finding seen on any one view of the study is a finding of the study.
    """
    return [
        StudyFinding(finding=finding, probability=max(p.probabilities[index] for p in predictions))
        for index, finding in enumerate(findings)
    ]


def _most_salient_image(predictions: Sequence[Prediction]) -> int:
    """Index of the image holding the study's single highest probability: the one to show."""
    return max(range(len(predictions)), key=lambda index: max(predictions[index].probabilities))


def _save(dataset: pydicom.Dataset, path: Path) -> Path:
    """Write `dataset` as a DICOM file so that a reader never sees a partial file."""
    return write_durably(path, lambda stream: dataset.save_as(stream, enforce_file_format=True))
