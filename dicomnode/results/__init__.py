"""The results room: predictions for one study become a DICOM SR and a Secondary Capture.

`write_results` is the room's only door. It checks that its inputs describe one study
consistently, decides each finding for the study (highest probability over the images against
the finding's threshold), builds the SR (`sr.py`) and the SC (`sc.py`) in two new series of
the source study, and writes both files atomically. Nothing here knows about torch: the
engine's output arrives as plain `Prediction` values.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from dicomnode.durable import make_folder_durably, write_durably
from dicomnode.flow import Code, Finding, ModelIdentity, Prediction, ResultSet, Sample
from dicomnode.results.sc import build_secondary_capture
from dicomnode.results.sr import StudyFinding, build_report
from dicomnode.results.uids import derive_uid

__all__ = ["ResultsError", "StudyFinding", "write_results"]

# Series numbers of the two output series: high, so that they sort after the acquired series
# in a viewer's series list.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902

SERIES_DESCRIPTION = "dicomnode AI findings"


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
) -> ResultSet:
    """Write the study's SR and SC into `out_dir` and return their paths (SR first).

    `sources[i]`, `samples[i]` and `predictions[i]` describe the same instance, and the
    probabilities of each prediction follow the order of `findings`. Re-running with the same
    source instances and the same prompt set writes objects with the same UIDs, so a PACS
    replaces the earlier ones. Raises `ResultsError` naming the attribute or UID at fault.
    """
    _check_inputs(sources, samples, predictions, findings)
    sources = [_with_type2_patient_and_study(ds) for ds in sources]
    study_findings = _study_findings(findings, predictions)
    source_uids = [str(ds.SOPInstanceUID) for ds in sources]

    def uid(role: str) -> str:
        return derive_uid(
            source_sop_instance_uids=source_uids,
            prompt_set_sha256=model.prompt_set_sha256,
            role=role,
        )

    description = f"DEMO {SERIES_DESCRIPTION} - no clinical meaning" if model.demo else SERIES_DESCRIPTION
    report = build_report(
        sources=sources,
        findings=study_findings,
        procedure=procedure,
        model=model,
        series_instance_uid=uid("sr-series"),
        sop_instance_uid=uid("sr-instance"),
        series_number=SR_SERIES_NUMBER,
        series_description=description,
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
        series_description=f"{description} (image)",
    )

    make_folder_durably(out_dir)  # synced to its parent: journal rows will point into it
    sr_path = _save(report, out_dir / f"sr-{report.SOPInstanceUID}.dcm")
    sc_path = _save(capture, out_dir / f"sc-{capture.SOPInstanceUID}.dcm")
    return ResultSet(study_instance_uid=str(sources[0].StudyInstanceUID), paths=(sr_path, sc_path))


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
