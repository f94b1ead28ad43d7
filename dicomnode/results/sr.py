"""The study's findings as a DICOM Structured Report (TID 1500 Measurement Report).

One measurement group per finding of the prompt set, each with the algorithm that produced it
(TID 4019), the finding as a coded Present/Absent evaluation, the study-level probability as a
numeric measurement, and references to the source images. A PACS or viewer that understands
TID 1500 (or a script reading it back with highdicom) finds every finding by its code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes

from dicomnode.flow import Code, Finding, ModelIdentity
from dicomnode.identity import NODE_MANUFACTURER
from dicomnode.results.uids import name_based_uid

DEMO_NOTICE = "DEMO model, random weights, no clinical meaning"

# The probability is written as (111012, DCM, "Certainty of Finding") in percent: it is the
# concept PS3.16 uses for exactly this in the Chest CAD SR (TID 4104 row 12, NUM, units
# (%, UCUM, "Percent"), 0-100) and it is listed in CID 6048 "CAD Operating Point Axis Label",
# so a reader that knows CAD SR needs no private code to interpret it.
CERTAINTY_OF_FINDING = codes.DCM.CertaintyOfFinding
PERCENT = codes.UCUM.Percent

# (SCT 131184002, "Area of defined region"), CID 7470 "Area Measurement": of a slide, the tissue
# area a class covers, in square millimetres.
AREA = codes.SCT.AreaOfDefinedRegion
SQUARE_MILLIMETRE = CodedConcept(value="mm2", scheme_designator="UCUM", meaning="square millimeter")

# CID 241 "Present-Absent Only".
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent


@dataclass(frozen=True)
class StudyFinding:
    """One finding decided for the whole study from its highest probability over the images."""

    finding: Finding
    probability: float
    #: The samples that drove the finding, strongest first: (SOP Instance UID, frame or None).
    evidence: tuple[tuple[str, int | None], ...] = ()
    #: Of a slide: the tissue area of the tiles whose most probable class this is, in mm2.
    area_mm2: float | None = None

    @property
    def present(self) -> bool:
        """True when the probability reaches the finding's calibrated threshold."""
        return self.probability >= self.finding.threshold

    @property
    def code(self) -> CodedConcept:
        """The finding's code as the prompt set declares it."""
        return CodedConcept(
            value=self.finding.code.value,
            scheme_designator=self.finding.code.scheme,
            meaning=self.finding.code.meaning,
        )


def build_report(
    *,
    sources: Sequence[pydicom.Dataset],
    findings: Sequence[StudyFinding],
    procedure: Code,
    model: ModelIdentity,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str,
    replaces: pydicom.Dataset | None = None,
    regions: Sequence[PlanarROIMeasurementsAndQualitativeEvaluations] = (),
) -> ComprehensiveSR:
    """A Comprehensive SR holding the TID 1500 report of `findings` on `sources`.

    Comprehensive SR rather than Comprehensive 3D SR: the report has no 3-D coordinates, and
    more PACS and viewers accept the older SOP class. `replaces` (study, series, SOP class and
    instance UIDs of an earlier SR of the study) goes into the Predecessor Documents Sequence.
    `regions` (TID 1410 groups, e.g. a slide's strongest tiles) follow the findings' groups.
    """
    report = MeasurementReport(
        observation_context=_observation_context(model),
        # TID 1500 row 4, "Procedure reported": the prompt set's own code for its domain.
        procedure_reported=CodedConcept(
            value=procedure.value, scheme_designator=procedure.scheme, meaning=procedure.meaning
        ),
        imaging_measurements=[
            *(_measurement_group(study_finding, sources, model) for study_finding in findings),
            *regions,
        ],
    )
    return ComprehensiveSR(
        evidence=sources,
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=NODE_MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description,
        manufacturer_model_name=model.algorithm_name[:64],
        software_versions=model.algorithm_version[:64],
        previous_versions=None if replaces is None else [replaces],
    )


def _observation_context(model: ModelIdentity) -> ObservationContext:
    """The observer is the algorithm running in the node (TID 1004 device observer)."""
    device = DeviceObserverIdentifyingAttributes(
        uid=name_based_uid(NODE_MANUFACTURER, model.algorithm_name, model.algorithm_version),
        name=NODE_MANUFACTURER,
        manufacturer_name=NODE_MANUFACTURER,
        model_name=_algorithm_name(model),
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


def _measurement_group(
    study_finding: StudyFinding,
    sources: Sequence[pydicom.Dataset],
    model: ModelIdentity,
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: finding, algorithm, Present/Absent, probability, source images."""
    code = study_finding.code
    # The tracking UID names the finding of this prompt set in this study, so that a re-run's
    # group, and the same group in a later version of the report, is the same tracked finding.
    tracking_uid = name_based_uid(
        "sr-tracking", str(sources[0].StudyInstanceUID), model.prompt_set, study_finding.finding.name
    )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=study_finding.finding.name),
        finding_type=code,
        algorithm_id=algorithm_identification(model),
        qualitative_evaluations=[
            QualitativeEvaluation(name=code, value=PRESENT if study_finding.present else ABSENT)
        ],
        measurements=[
            Measurement(
                name=CERTAINTY_OF_FINDING,
                value=round(100.0 * study_finding.probability, 4),
                unit=PERCENT,
            ),
            *_area(study_finding),
        ],
        source_images=_source_images(study_finding, sources),
    )


def _source_images(
    study_finding: StudyFinding, sources: Sequence[pydicom.Dataset]
) -> list[SourceImageForMeasurementGroup]:
    """The images a finding was taken from: every single image, and of each volume the frames
    that drove it (by frame number), so the reader can go straight to those B-scans.
    """
    references = []
    for ds in sources:
        if "NumberOfFrames" not in ds:
            references.append(SourceImageForMeasurementGroup.from_source_image(ds))
            continue
        uid = str(ds.SOPInstanceUID)
        # Strongest first, as the evidence is ranked: the first frame named is the one to open.
        frames = list(dict.fromkeys(f for sop, f in study_finding.evidence if sop == uid and f is not None))
        if frames:
            references.append(SourceImageForMeasurementGroup.from_source_image(ds, frames))
    return references


def _area(study_finding: StudyFinding) -> list[Measurement]:
    """A slide's tissue area for the class, as (SCT 131184002, "Area of defined region") in mm2."""
    if study_finding.area_mm2 is None:
        return []
    return [Measurement(name=AREA, value=round(study_finding.area_mm2, 6), unit=SQUARE_MILLIMETRE)]


def algorithm_identification(model: ModelIdentity) -> AlgorithmIdentification:
    """TID 4019: name, version and the prompt set and backbone it ran with."""
    return AlgorithmIdentification(
        name=_algorithm_name(model),
        version=model.algorithm_version,
        parameters=[model.parameters],
    )


def _algorithm_name(model: ModelIdentity) -> str:
    """The algorithm's name; a demo model says so in the name every reader displays."""
    if model.demo:
        return f"{model.algorithm_name} ({DEMO_NOTICE})"
    return model.algorithm_name
