"""Routing: ordered rules from routing.yaml decide, per instance and per study, which prompt
set a study goes to, or why it is ignored, without ever quoting free text about a patient.

The datasets are pydicom's real test files: RG1_UNCR (CR, CHEST), RG3_UNCR (CR, EXTREMITY)
and CT_small (CT, no BodyPartExamined); rules are real YAML files read by `load_routing`.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    OphthalmicPhotography8BitImageStorage,
    OphthalmicTomographyImageStorage,
    SecondaryCaptureImageStorage,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)

from dicomnode.config import ConfigError, RoutingConfig, load_config, load_routing
from dicomnode.engine import Engine
from dicomnode.flow import StoredInstance, StudyJob
from dicomnode.identity import NODE_MANUFACTURER
from dicomnode.model.backbone import Backbone
from dicomnode.model.library import PromptSetLibrary
from dicomnode.node import StudyWorker
from dicomnode.routing import Decision, Ignored, Routed, decide, read_header, route_study
from dicomnode.spool import Spool
from tests.conftest import REPO, dcmtk, free_port, tiny_backbone, wait_until, write_node_config
from tests.prompt_sets import spec, write_prompt_set
from tests.synthetic import oct_volume
from tests.test_cli import cli
from tests.test_end_to_end import _results_in, _sr_text
from tests.wsi import slide_image, tiled_pyramid

CHEST = "RG1_UNCR.dcm"
EXTREMITY = "RG3_UNCR.dcm"
CT = "CT_small.dcm"

RULES = """
rules:
  - name: chest-radiograph
    match:
      Modality: [CR, DX]
      BodyPartExamined: [CHEST]
    prompt_set: cxr
  - name: ct
    match:
      Modality: CT
    prompt_set: ct
  - name: extremity
    match:
      BodyPartExamined: [EXTREMITY]
    ignore: extremities have no prompt set yet
"""


def shipped_file(name: str) -> Path:
    """Path of a shipped test file; fails, never downloads, if pydicom-data is missing."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} missing: install the test extra (pydicom-data)"
    return Path(path)


@cache
def _header(name: str) -> pydicom.Dataset:
    return read_header(shipped_file(name))


def header(name: str) -> pydicom.Dataset:
    """A fresh copy of the header of a shipped file, safe to modify in a test."""
    return copy.deepcopy(_header(name))


def routing_from(tmp_path: Path, text: str) -> RoutingConfig:
    path = tmp_path / "routing.yaml"
    path.write_text(text)
    return load_routing(path)


@pytest.fixture
def routing(tmp_path) -> RoutingConfig:
    return routing_from(tmp_path, RULES)


# -- one instance --------------------------------------------------------------------------------


def test_chest_radiograph_goes_to_the_cxr_prompt_set(routing):
    decision = decide(routing, header(CHEST))

    assert decision == Decision("cxr", "chest-radiograph", "rule 'chest-radiograph' matched")


def test_first_matching_rule_wins_over_a_later_one(tmp_path):
    routing = routing_from(
        tmp_path,
        """
rules:
  - {name: any-cr, match: {Modality: CR}, prompt_set: first}
  - {name: chest-cr, match: {Modality: CR, BodyPartExamined: CHEST}, prompt_set: second}
""",
    )

    assert decide(routing, header(CHEST)).prompt_set == "first"


def test_a_later_rule_decides_when_the_earlier_ones_do_not_match(routing):
    decision = decide(routing, header(CT))

    assert (decision.prompt_set, decision.rule) == ("ct", "ct")


def test_every_condition_of_a_rule_must_hold(tmp_path):
    routing = routing_from(
        tmp_path, "rules: [{name: cr-hand, match: {Modality: CR, BodyPartExamined: HAND}, prompt_set: x}]"
    )

    assert decide(routing, header(CHEST)).prompt_set is None


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower case is invalid, yet sent
def test_list_values_match_case_insensitively_in_both_directions(tmp_path):
    routing = routing_from(
        tmp_path,
        "rules: [{name: chest, match: {Modality: [cr], BodyPartExamined: [Chest]}, prompt_set: cxr}]",
    )
    lower = header(CHEST)
    lower.BodyPartExamined = "chest"

    assert decide(routing, header(CHEST)).prompt_set == "cxr"
    assert decide(routing, lower).prompt_set == "cxr"


def test_any_value_of_a_multi_valued_attribute_can_match(tmp_path):
    routing = routing_from(tmp_path, "rules: [{name: derived, match: {ImageType: [PRIMARY]}, prompt_set: x}]")

    assert list(header(CHEST).ImageType) == ["DERIVED", "PRIMARY"]
    assert decide(routing, header(CHEST)).prompt_set == "x"


def test_regex_searches_the_attribute_value(tmp_path):
    routing = routing_from(
        tmp_path, "rules: [{name: pa, match: {SeriesDescription: {regex: '\\bPA\\b'}}, prompt_set: cxr}]"
    )
    pa, lateral = header(CHEST), header(CHEST)
    pa.SeriesDescription = "Thorax PA standing"
    lateral.SeriesDescription = "Thorax LAT"

    assert decide(routing, pa).prompt_set == "cxr"
    assert decide(routing, lateral).prompt_set is None


def test_regex_is_case_sensitive_unless_it_asks_otherwise(tmp_path):
    routing = routing_from(
        tmp_path,
        """
rules:
  - {name: exact, match: {SeriesDescription: {regex: thorax}}, prompt_set: exact}
  - {name: folded, match: {SeriesDescription: {regex: '(?i)thorax'}}, prompt_set: folded}
""",
    )
    ds = header(CHEST)
    ds.SeriesDescription = "THORAX PA"

    assert decide(routing, ds).prompt_set == "folded"


def test_calling_ae_title_is_matched_like_an_attribute(tmp_path):
    routing = routing_from(
        tmp_path, "rules: [{name: ward, match: {CallingAETitle: [WARD_CR]}, prompt_set: cxr}]"
    )

    assert decide(routing, header(EXTREMITY), calling_ae="ward_cr ").prompt_set == "cxr"
    other = decide(routing, header(EXTREMITY), calling_ae="ER_DX")
    assert other.prompt_set is None
    assert "CallingAETitle is ER_DX, rule wants WARD_CR" in other.reason


def test_ignore_rule_gives_its_name_and_reason(routing):
    decision = decide(routing, header(EXTREMITY))

    assert decision == Decision(None, "extremity", "rule 'extremity': extremities have no prompt set yet")


def test_no_match_reason_names_each_rule_and_its_failing_attribute(tmp_path):
    routing = routing_from(
        tmp_path,
        """
rules:
  - {name: chest, match: {Modality: CR, BodyPartExamined: CHEST}, prompt_set: cxr}
  - {name: ct, match: {Modality: CT}, prompt_set: ct}
""",
    )

    decision = decide(routing, header(EXTREMITY))

    assert decision.prompt_set is None and decision.rule is None
    assert decision.reason == (
        "no rule matched (chest: BodyPartExamined is EXTREMITY, rule wants CHEST; "
        "ct: Modality is CR, rule wants CT)"
    )


def test_no_match_reason_says_when_the_attribute_is_absent(routing):
    chest_only = routing.model_copy(update={"rules": routing.rules[:1]})
    no_body_part = header(CHEST)
    del no_body_part.BodyPartExamined

    decision = decide(chest_only, no_body_part)

    assert (
        decision.reason == "no rule matched (chest-radiograph: BodyPartExamined is absent, rule wants CHEST)"
    )


def test_no_match_reason_shows_a_regex_as_the_rule_wants_it(tmp_path):
    routing = routing_from(
        tmp_path, "rules: [{name: r, match: {Modality: {regex: '^(DX|MG)$'}}, prompt_set: x}]"
    )

    assert "Modality is CR, rule wants /^(DX|MG)$/" in decide(routing, header(CHEST)).reason


def test_standard_sop_class_uid_is_quoted_because_it_is_a_code_by_its_keyword(tmp_path):
    routing = routing_from(
        tmp_path, "rules: [{name: dx, match: {SOPClassUID: ['1.2.840.10008.5.1.4.1.1.1.1']}, prompt_set: x}]"
    )

    reason = decide(routing, header(CHEST)).reason

    assert (
        "SOPClassUID is ComputedRadiographyImageStorage, rule wants DigitalXRayImageStorageForPresentation"
        in (reason)
    )


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientName", "Doe^Jane"),
        ("PatientID", "MRN-884422"),
        ("SeriesDescription", "Doe Jane follow-up"),
        ("StudyDescription", "Jane Doe chest"),
        ("InstitutionName", "St. Example Hospital"),
        ("AccessionNumber", "ACC884422"),
        ("PatientBirthDate", "19631107"),
        ("PatientAge", "061Y"),
        ("StudyInstanceUID", "1.2.826.0.1.3680043.8.498.884422"),
        # Codes and numbers, but about the patient (CS and DS).
        ("PatientSex", "F"),
        ("PatientWeight", "71.5"),
        ("PatientSize", "1.68"),
    ],
)
def test_values_that_are_not_codes_are_never_quoted_in_a_reason(tmp_path, keyword, value):
    routing = routing_from(
        tmp_path,
        f"""
rules:
  - {{name: listed, match: {{{keyword}: ['9.9.9']}}, prompt_set: x}}
  - {{name: pattern, match: {{{keyword}: {{regex: '^nothing$'}}}}, prompt_set: y}}
""",
    )
    ds = header(CHEST)
    setattr(ds, keyword, value)

    reason = decide(routing, ds).reason

    assert value not in reason
    assert f"listed: {keyword} is a value that does not match" in reason
    assert f"pattern: {keyword} is a value that does not match" in reason


def test_result_produced_by_dicomnode_is_never_routed_even_when_a_rule_matches(tmp_path):
    routing = routing_from(
        tmp_path, "rules: [{name: anything-cr, match: {Modality: [CR, SR, OT]}, prompt_set: x}]"
    )
    ds = header(CHEST)
    ds.Manufacturer = NODE_MANUFACTURER

    decision = decide(routing, ds)

    assert decision == Decision(None, None, "a result dicomnode produced itself")


def test_other_manufacturers_are_routed_normally(routing):
    ds = header(CHEST)
    ds.Manufacturer = "dicomnode-compatible scanners inc."

    assert decide(routing, ds).prompt_set == "cxr"


# -- one study -----------------------------------------------------------------------------------


@cache
def _dataset(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(shipped_file(name))


def stored(folder: Path, name: str, calling_ae: str = "MODALITY", **changes: str) -> StoredInstance:
    """A copy of a shipped file on disk with a new SOP Instance UID, as the spool holds it."""
    ds = copy.deepcopy(_dataset(name))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return StoredInstance(
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        path=path,
        calling_ae=calling_ae,
    )


STUDY = "1.2.826.0.1.3680043.8.498.1"


def test_study_goes_to_each_routed_prompt_set_with_its_own_instances(routing, tmp_path):
    extremity = stored(tmp_path, EXTREMITY)
    ct_one, chest, ct_two = stored(tmp_path, CT), stored(tmp_path, CHEST), stored(tmp_path, CT)

    routed = route_study(routing, STUDY, [extremity, ct_one, chest, ct_two])

    assert routed == Routed(
        STUDY,
        (
            StudyJob(study_instance_uid=STUDY, prompt_set="ct", rule="ct", instances=(ct_one, ct_two)),
            StudyJob(study_instance_uid=STUDY, prompt_set="cxr", rule="chest-radiograph", instances=(chest,)),
        ),
        left_out="rule 'extremity': extremities have no prompt set yet",
    )


def test_study_whose_every_instance_is_routed_leaves_nothing_out(routing, tmp_path):
    routed = route_study(routing, STUDY, [stored(tmp_path, CHEST), stored(tmp_path, CHEST)])

    assert isinstance(routed, Routed) and routed.left_out is None
    assert [len(job.instances) for job in routed.jobs] == [2]


def test_study_routed_with_the_rule_of_its_first_routed_instance(tmp_path):
    routing = routing_from(
        tmp_path,
        """
rules:
  - {name: chest, match: {BodyPartExamined: CHEST}, prompt_set: cxr}
  - {name: cr, match: {Modality: CR}, prompt_set: cxr}
""",
    )
    limb, chest = stored(tmp_path, EXTREMITY), stored(tmp_path, CHEST)

    (job,) = route_study(routing, STUDY, [limb, chest]).jobs

    assert (job.prompt_set, job.rule, job.instances) == ("cxr", "cr", (limb, chest))


def test_study_is_routed_with_each_instances_own_calling_ae(tmp_path):
    routing = routing_from(tmp_path, "rules: [{name: ward, match: {CallingAETitle: WARD}, prompt_set: cxr}]")
    from_er, from_ward = stored(tmp_path, CHEST, calling_ae="ER"), stored(tmp_path, CHEST, calling_ae="WARD")

    (job,) = route_study(routing, STUDY, [from_er, from_ward]).jobs

    assert job.instances == (from_ward,)


def test_study_that_no_rule_routes_is_ignored_with_its_distinct_reasons(routing, tmp_path):
    without_ct = routing.model_copy(update={"rules": (routing.rules[0], routing.rules[2])})
    instances = [stored(tmp_path, EXTREMITY), stored(tmp_path, CT), stored(tmp_path, EXTREMITY)]

    outcome = route_study(without_ct, STUDY, instances)

    assert outcome == Ignored(
        STUDY,
        "rule 'extremity': extremities have no prompt set yet; "
        "no rule matched (chest-radiograph: Modality is CT, rule wants CR|DX; "
        "extremity: BodyPartExamined is absent, rule wants EXTREMITY)",
    )


def test_study_without_instances_is_ignored_saying_so(routing):
    assert route_study(routing, STUDY, []) == Ignored(STUDY, "study has no instances")


def test_unreadable_instance_is_a_reason_and_does_not_stop_the_others(routing, tmp_path):
    chest = stored(tmp_path, CHEST)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not a DICOM file at all")
    unreadable = StoredInstance("1.2.3.4", chest.sop_class_uid, STUDY, "1.2.3.5", garbage, "MODALITY")
    vanished = StoredInstance("1.2.3.6", chest.sop_class_uid, STUDY, "1.2.3.5", tmp_path / "gone.dcm", "M")

    routed = route_study(routing, STUDY, [unreadable, vanished, chest])
    assert [job.instances for job in routed.jobs] == [(chest,)]
    assert routed.left_out == "unreadable instance: InvalidDicomError; unreadable instance: FileNotFoundError"
    outcome = route_study(routing, STUDY, [unreadable, vanished])
    assert outcome == Ignored(
        STUDY, "unreadable instance: InvalidDicomError; unreadable instance: FileNotFoundError"
    )


def test_results_of_dicomnode_in_the_study_are_left_out_of_the_job(routing, tmp_path):
    chest = stored(tmp_path, CHEST)
    our_result = stored(tmp_path, CHEST, Manufacturer=NODE_MANUFACTURER)

    (job,) = route_study(routing, STUDY, [our_result, chest]).jobs

    assert job.instances == (chest,)
    assert route_study(routing, STUDY, [our_result]) == Ignored(STUDY, "a result dicomnode produced itself")


def test_ignore_reasons_never_quote_free_text_of_the_study(tmp_path):
    routing = routing_from(
        tmp_path, "rules: [{name: pa, match: {SeriesDescription: {regex: '^PA$'}}, prompt_set: cxr}]"
    )
    instance = stored(tmp_path, CHEST, SeriesDescription="Jane Doe bedside", PatientName="Doe^Jane")

    outcome = route_study(routing, STUDY, [instance])

    assert isinstance(outcome, Ignored)
    assert "Jane" not in outcome.reason and "Doe" not in outcome.reason
    assert "SeriesDescription is a value that does not match" in outcome.reason


# -- conditions beyond values: presence, codes, SOP classes by keyword ----------------------------


def code_item(scheme: str, value: str, meaning: str) -> pydicom.Dataset:
    """One item of a code sequence, as a modality writes it."""
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def written(
    folder: Path, sop_class: str, *, frames: int = 1, calling_ae: str = "MODALITY", **attributes
) -> StoredInstance:
    """A small real instance of `sop_class` in STUDY, on disk as the spool holds it.

    8x8 MONOCHROME2 pixels, `frames` of them; `attributes` are set as given (a list of
    datasets becomes a sequence, a list of strings a multi-valued attribute).
    """
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, generate_uid()
    ds.PatientName, ds.PatientID = "Doe^Jane", "MRN-884422"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = bytes(8 * 8 * frames)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return on_disk(ds, folder, calling_ae)


def on_disk(ds: pydicom.Dataset, folder: Path, calling_ae: str = "MODALITY") -> StoredInstance:
    """`ds` saved into `folder` as a file, and the spool's record of it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return StoredInstance(
        ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, path, calling_ae
    )


def decided(routing: RoutingConfig, instance: StoredInstance) -> Decision:
    """The decision on the instance's header as the node reads it from disk."""
    return decide(routing, read_header(instance.path), instance.calling_ae)


def test_presence_and_absence_of_an_attribute_are_conditions(tmp_path):
    routing = routing_from(
        tmp_path,
        """
rules:
  - {name: unviewed, match: {ViewPosition: {present: false}}, prompt_set: absent}
  - {name: viewed, match: {ViewPosition: {present: true}}, prompt_set: present}
""",
    )
    pa = written(tmp_path, ComputedRadiographyImageStorage, ViewPosition="PA")
    empty = written(tmp_path, ComputedRadiographyImageStorage, ViewPosition="")
    missing = written(tmp_path, ComputedRadiographyImageStorage)

    assert [decided(routing, i).prompt_set for i in (pa, empty, missing)] == ["present", "absent", "absent"]


def test_presence_mismatch_says_which_way_it_failed(tmp_path):
    routing = routing_from(
        tmp_path, "rules: [{name: bare, match: {ViewPosition: {present: false}}, ignore: x}]"
    )
    wanted_present = routing_from(
        tmp_path, "rules: [{name: coded, match: {ViewCodeSequence: {present: true}}, ignore: x}]"
    )
    pa = written(tmp_path, ComputedRadiographyImageStorage, ViewPosition="PA")

    assert decided(routing, pa).reason == "no rule matched (bare: ViewPosition is PA, rule wants it absent)"
    assert decided(wanted_present, pa).reason == (
        "no rule matched (coded: ViewCodeSequence is absent, rule wants it present)"
    )


def test_a_code_in_any_item_of_a_code_sequence_matches_by_scheme_and_value(tmp_path):
    # Unquoted SNOMED CT codes are YAML integers: they must still match the code strings.
    routing = routing_from(
        tmp_path,
        "rules: [{name: pa, match: {ViewCodeSequence: {codes: {SCT: [272479007], srt: [R-10214]}}}, "
        "prompt_set: cxr}]",
    )
    sct = written(
        tmp_path,
        DigitalXRayImageStorageForPresentation,
        ViewCodeSequence=[code_item("SCT", "272479007", "PA")],
    )
    legacy = written(
        tmp_path,
        DigitalXRayImageStorageForPresentation,
        ViewCodeSequence=[code_item("99LOCAL", "X", "x"), code_item("SRT", "R-10214", "postero-anterior")],
    )
    other_scheme = written(
        tmp_path,
        DigitalXRayImageStorageForPresentation,
        ViewCodeSequence=[code_item("SRT", "272479007", "?")],
    )

    assert decided(routing, sct).prompt_set == "cxr"
    assert decided(routing, legacy).prompt_set == "cxr"
    assert decided(routing, other_scheme).reason == (
        "no rule matched (pa: ViewCodeSequence is SRT:272479007, rule wants SCT:272479007|SRT:R-10214)"
    )


def test_sop_class_given_by_its_keyword_matches_its_uid(tmp_path):
    routing = routing_from(
        tmp_path,
        "rules: [{name: oct, match: {SOPClassUID: OphthalmicTomographyImageStorage}, prompt_set: oct}]",
    )
    volume = written(tmp_path, OphthalmicTomographyImageStorage, frames=3, Modality="OPT")
    photo = written(tmp_path, OphthalmicPhotography8BitImageStorage, Modality="OP")

    assert routing.rules[0].match["SOPClassUID"].values == (OphthalmicTomographyImageStorage,)
    assert decided(routing, volume).prompt_set == "oct"
    assert decided(routing, photo).reason == (
        "no rule matched (oct: SOPClassUID is OphthalmicPhotography8BitImageStorage, "
        "rule wants OphthalmicTomographyImageStorage)"
    )


@pytest.mark.parametrize(
    ("condition", "complaint"),
    [
        ("{SOPClassUID: OphthalmicTomography}", "'OphthalmicTomography' is neither a UID nor the keyword"),
        ("{Modality: {codes: {SCT: [1]}}}", "{codes: ...} needs a code sequence (such as ViewCodeSequence)"),
        ("{ViewCodeSequence: [PA]}", "sequences cannot be matched by value"),
        ("{ViewCodeSequence: {codes: {SCT: []}}}", "no codes given"),
        ("{ViewPosition: {present: 'no'}}", "valid boolean"),
        ("{ViewPosition: {present: true, values: [PA]}}", "give one of"),
    ],
)
def test_a_condition_that_cannot_work_is_refused_naming_file_rule_and_key(tmp_path, condition, complaint):
    path = tmp_path / "routing.yaml"
    path.write_text(
        f"rules:\n  - {{name: chest, match: {{Modality: CR}}, prompt_set: cxr}}\n"
        f"  - {{name: broken, match: {condition}, prompt_set: x}}\n"
    )
    key = condition[1 : condition.index(":")]

    with pytest.raises(ConfigError) as caught:
        load_routing(path)

    line = str(caught.value).splitlines()[0]
    assert line.startswith(f"{path}: rules.1.match.{key}"), line
    assert "in 'broken': " in line and complaint in line


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("PatientSex", "F"), ("PatientSize", "1.62"), ("PatientWeight", "58"), ("PregnancyStatus", 4)],
)
def test_patient_attributes_are_never_quoted_even_when_coded_or_numeric(tmp_path, keyword, value):
    routing = routing_from(
        tmp_path,
        f"""
rules:
  - {{name: listed, match: {{{keyword}: ['9']}}, prompt_set: x}}
  - {{name: bare, match: {{{keyword}: {{present: false}}}}, prompt_set: y}}
""",
    )
    ds = header(CHEST)
    setattr(ds, keyword, value)

    assert decide(routing, ds).reason == (
        f"no rule matched (listed: {keyword} is a value that does not match, rule wants 9; "
        f"bare: {keyword} is present, rule wants it absent)"
    )


def test_codes_of_a_sequence_about_the_patient_are_not_quoted(tmp_path):
    routing = routing_from(
        tmp_path,
        "rules: [{name: dx, match: {AdmittingDiagnosesCodeSequence: {codes: {SCT: ['1']}}}, ignore: x}]",
    )
    ds = header(CHEST)
    ds.AdmittingDiagnosesCodeSequence = [code_item("SCT", "254637007", "lung cancer")]

    reason = decide(routing, ds).reason

    assert "254637007" not in reason
    assert "AdmittingDiagnosesCodeSequence is a value that does not match" in reason


# -- the shipped rules: what a real PACS sends ------------------------------------------------------

EMBEDDED_CONFIG = REPO / "conf" / "dicomnode.yaml"
SHIPPED = load_routing(REPO / "conf" / "routing.yaml")
FRONTAL = "rule 'chest-frontal' matched"
LATERAL = "rule 'chest-lateral': lateral chest view; the cxr prompt set is for frontal (PA/AP) views"


@pytest.mark.parametrize(
    ("sop_class", "attributes", "prompt_set", "reason"),
    [
        (ComputedRadiographyImageStorage, {"ViewPosition": "PA"}, "cxr", FRONTAL),
        (DigitalXRayImageStorageForPresentation, {"ViewPosition": "AP"}, "cxr", FRONTAL),
        (ComputedRadiographyImageStorage, {"ViewPosition": "LL"}, None, LATERAL),
        (DigitalXRayImageStorageForPresentation, {"ViewPosition": "RL"}, None, LATERAL),
        (
            DigitalXRayImageStorageForPresentation,
            {"ViewCodeSequence": [code_item("SCT", "399348003", "antero-posterior")]},
            "cxr",
            "rule 'chest-frontal-coded' matched",
        ),
        (
            DigitalXRayImageStorageForPresentation,
            {"ViewCodeSequence": [code_item("SRT", "R-10214", "postero-anterior")]},
            "cxr",
            "rule 'chest-frontal-coded' matched",
        ),
        (
            DigitalXRayImageStorageForPresentation,
            {"ViewCodeSequence": [code_item("SCT", "399173006", "left lateral")]},
            None,
            "rule 'chest-lateral-coded': lateral chest view; the cxr prompt set is for frontal (PA/AP) views",
        ),
        (
            DigitalXRayImageStorageForPresentation,
            {"ViewPosition": "LL", "ViewCodeSequence": [code_item("SCT", "272479007", "postero-anterior")]},
            None,
            LATERAL,
        ),
        (ComputedRadiographyImageStorage, {}, None, "rule 'chest-other-view': chest view neither PA, AP nor"),
        (ComputedRadiographyImageStorage, {"ViewPosition": "RLD"}, None, "rule 'chest-other-view'"),
        (
            DigitalXRayImageStorageForProcessing,
            {"ViewPosition": "PA", "PresentationIntentType": "FOR PROCESSING"},
            None,
            "rule 'for-processing': raw detector image (FOR PROCESSING)",
        ),
    ],
    ids=[
        "cr-pa",
        "dx-ap",
        "cr-left-lateral",
        "dx-right-lateral",
        "dx-sct-ap-code",
        "dx-legacy-pa-code",
        "dx-lateral-code",
        "view-position-wins-over-code",
        "cr-no-view",
        "cr-decubitus",
        "dx-for-processing",
    ],
)
def test_shipped_rules_send_only_frontal_chest_radiographs_to_cxr(
    tmp_path, sop_class, attributes, prompt_set, reason
):
    modality = "CR" if sop_class == ComputedRadiographyImageStorage else "DX"
    instance = written(tmp_path, sop_class, Modality=modality, BodyPartExamined="CHEST", **attributes)

    decision = decided(SHIPPED, instance)

    assert decision.prompt_set == prompt_set
    assert decision.reason.startswith(reason), decision.reason


def test_shipped_rules_accept_thorax_as_the_chest(tmp_path):
    instance = written(
        tmp_path, ComputedRadiographyImageStorage, Modality="CR", BodyPartExamined="THORAX", ViewPosition="PA"
    )

    assert decided(SHIPPED, instance).prompt_set == "cxr"


@pytest.mark.parametrize(
    ("sop_class", "frames", "colour", "rule"),
    [
        (OphthalmicTomographyImageStorage, 5, False, "oct-volume"),
        (SecondaryCaptureImageStorage, 1, False, "oct-secondary-capture"),
        (MultiFrameGrayscaleByteSecondaryCaptureImageStorage, 5, False, "oct-secondary-capture"),
        (MultiFrameTrueColorSecondaryCaptureImageStorage, 3, True, "oct-secondary-capture"),
    ],
    ids=["opt-volume", "sc-export", "multi-frame-sc-export", "colour-sc-export"],
)
def test_shipped_rules_send_oct_volumes_and_their_secondary_capture_exports_to_oct(
    tmp_path, sop_class, frames, colour, rule
):
    volume = on_disk(oct_volume(frames, sop_class=sop_class, colour=colour), tmp_path)

    assert decided(SHIPPED, volume) == Decision("oct", rule, f"rule {rule!r} matched")


@pytest.mark.parametrize(
    ("sop_class", "frames", "attributes", "prompt_set", "reason"),
    [
        (SecondaryCaptureImageStorage, 1, {"Modality": "OT"}, None, "no rule matched ("),
        (
            VLWholeSlideMicroscopyImageStorage,
            4,
            {"Modality": "SM", "ImageType": ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]},
            "pathology",
            "rule 'whole-slide' matched",
        ),
        (
            VLWholeSlideMicroscopyImageStorage,
            1,
            {"Modality": "SM", "ImageType": ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]},
            None,
            "rule 'slide-label-or-overview': slide label or overview photograph",
        ),
        (
            VLWholeSlideMicroscopyImageStorage,
            1,
            {"Modality": "SM", "ImageType": ["ORIGINAL", "PRIMARY", "OVERVIEW", "NONE"]},
            None,
            "rule 'slide-label-or-overview'",
        ),
        (CTImageStorage, 1, {"Modality": "CT", "BodyPartExamined": "CHEST"}, None, "no rule matched ("),
    ],
    ids=[
        "sc-screenshot",
        "slide-volume",
        "slide-label",
        "slide-overview",
        "chest-ct",
    ],
)
def test_shipped_rules_send_whole_slides_to_pathology_and_leave_other_images_out(
    tmp_path, sop_class, frames, attributes, prompt_set, reason
):
    instance = written(tmp_path, sop_class, frames=frames, **attributes)

    decision = decided(SHIPPED, instance)

    assert decision.prompt_set == prompt_set
    assert decision.reason.startswith(reason), decision.reason


def test_shipped_rules_name_every_rule_when_nothing_matches_a_screenshot(tmp_path):
    screenshot = written(tmp_path, SecondaryCaptureImageStorage, Modality="OT")

    reason = decided(SHIPPED, screenshot).reason

    for rule in SHIPPED.rules:
        assert f"{rule.name}: " in reason
    assert "oct-secondary-capture: Modality is OT, rule wants OPT" in reason
    assert "Doe" not in reason and "MRN" not in reason


def test_a_study_with_a_chest_radiograph_and_an_oct_gives_a_job_for_each(tmp_path):
    pa = written(
        tmp_path, ComputedRadiographyImageStorage, Modality="CR", BodyPartExamined="CHEST", ViewPosition="PA"
    )
    lateral = written(
        tmp_path, ComputedRadiographyImageStorage, Modality="CR", BodyPartExamined="CHEST", ViewPosition="LL"
    )
    volume = on_disk(oct_volume(3, study_uid=STUDY), tmp_path)

    routed = route_study(SHIPPED, STUDY, [pa, lateral, volume])

    assert routed == Routed(
        STUDY,
        (
            StudyJob(STUDY, "cxr", "chest-frontal", (pa,)),
            StudyJob(STUDY, "oct", "oct-volume", (volume,)),
        ),
        left_out=LATERAL,
    )


# -- a study of several prompt sets, processed by the node's study worker ---------------------------

TWO_SETS = """
rules:
  - {name: ward, match: {CallingAETitle: WARD}, prompt_set: first}
  - {name: emergency, match: {CallingAETitle: ER}, prompt_set: second}
"""


def two_sets(folder: Path, backbone: Backbone) -> dict[str, str]:
    """Zero-shot sets `first` and `second` and TWO_SETS written into `folder`, as config keys."""
    for name in ("first", "second"):
        write_prompt_set(folder / "prompts" / name, spec(name, "zeroshot", backbone), backbone)
    (folder / "routing.yaml").write_text(TWO_SETS)
    return {"prompts_dir": str(folder / "prompts"), "routing": str(folder / "routing.yaml")}


@pytest.fixture
def worker(tmp_path, tiny_architecture) -> Iterator[StudyWorker]:
    """A study worker on the tiny backbone serving the two sets of `two_sets`."""
    backbone = tiny_backbone(tiny_architecture)
    config = write_node_config(
        tmp_path,
        tiny_architecture,
        scp_port=free_port(),
        destinations=[{"name": "pacs", "host": "127.0.0.1", "port": free_port(), "ae_title": "PACS"}],
        **two_sets(tmp_path, backbone),
    )
    cfg = load_config(config)
    engine = Engine(backbone)
    spool = Spool(cfg.state_dir)
    prompt_sets = PromptSetLibrary(cfg.prompts_dir, ["first", "second"], check=engine.prepare)
    yield StudyWorker(cfg, spool, load_routing(cfg.routing), prompt_sets, engine, threading.Event())
    engine.stop()
    spool.close()


def receive(spool: Spool, path: Path, calling_ae: str) -> None:
    """Store a file in the spool as the SCP does for an instance `calling_ae` sent."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    spool.store(
        path.read_bytes(),
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        calling_ae=calling_ae,
    )


def queued_reports(spool: Spool) -> dict[str, pydicom.Dataset]:
    """Each SR queued for delivery to `pacs`, by the prompt set it names; taken off the queue."""
    reports = {}
    while (delivery := spool.next_delivery("pacs")) is not None:
        ds = pydicom.dcmread(delivery.path)
        if ds.Modality == "SR":
            (name,) = set(re.findall(r"prompt set (\w+) sha256", _sr_text(ds)))
            reports[name] = ds
        spool.delivery_sent(delivery)
    return reports


def test_a_study_of_two_prompt_sets_gets_the_results_of_each_and_is_done_once(worker, tmp_path):
    receive(worker.spool, stored(tmp_path / "in", CHEST).path, "WARD")
    receive(worker.spool, stored(tmp_path / "in", CHEST).path, "ER")
    receive(worker.spool, stored(tmp_path / "in", CHEST).path, "OTHER")
    study = worker.spool.claim_quiet_study(0.0, now=float("inf"))

    worker.process(study)

    record = worker.spool.study(study.study_instance_uid)
    assert (record.state, record.prompt_set) == ("done", "first,second")
    assert record.reason == (
        "left out: no rule matched (ward: CallingAETitle is OTHER, rule wants WARD; "
        "emergency: CallingAETitle is OTHER, rule wants ER)"
    )
    assert sorted(queued_reports(worker.spool)) == ["first", "second"]


def test_a_late_instance_supersedes_only_the_report_of_the_prompt_set_it_went_to(worker, tmp_path):
    receive(worker.spool, stored(tmp_path / "in", CHEST).path, "WARD")
    receive(worker.spool, stored(tmp_path / "in", CHEST).path, "ER")
    worker.process(worker.spool.claim_quiet_study(0.0, now=float("inf")))
    first = queued_reports(worker.spool)
    receive(worker.spool, stored(tmp_path / "in", CHEST).path, "WARD")

    worker.process(worker.spool.claim_quiet_study(0.0, now=float("inf")))

    again = queued_reports(worker.spool)
    (predecessor,) = again["first"].PredecessorDocumentsSequence[0].ReferencedSeriesSequence
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first["first"].SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in again["second"]
    assert again["second"].SOPInstanceUID == first["second"].SOPInstanceUID, "same content, same report"


def test_a_set_that_fails_does_not_hold_back_the_results_of_the_set_that_succeeded(worker, tmp_path):
    receive(worker.spool, stored(tmp_path / "in", CHEST).path, "WARD")
    no_pixels = stored(tmp_path / "in", CHEST)
    ds = pydicom.dcmread(no_pixels.path)
    del ds.PixelData
    ds.save_as(no_pixels.path, enforce_file_format=True)
    receive(worker.spool, no_pixels.path, "ER")
    study = worker.spool.claim_quiet_study(0.0, now=float("inf"))

    worker.process(study)

    record = worker.spool.study(study.study_instance_uid)
    assert (record.state, record.prompt_set) == ("failed", "first,second")
    assert record.reason.startswith("prompt set second failed: StudyFailed: no image could be prepared: ")
    assert "first" not in record.reason
    assert sorted(queued_reports(worker.spool)) == ["first"]


def test_dicomnode_route_shows_each_files_decision_under_the_shipped_rules(tmp_path):
    pa = written(
        tmp_path, ComputedRadiographyImageStorage, Modality="CR", BodyPartExamined="CHEST", ViewPosition="PA"
    )
    lateral = written(
        tmp_path, ComputedRadiographyImageStorage, Modality="CR", BodyPartExamined="CHEST", ViewPosition="LL"
    )
    volume = written(tmp_path, OphthalmicTomographyImageStorage, frames=3, Modality="OPT")
    slide = written(
        tmp_path,
        VLWholeSlideMicroscopyImageStorage,
        Modality="SM",
        ImageType=["ORIGINAL", "PRIMARY", "VOLUME"],
    )

    outcome = cli("route", pa.path, lateral.path, volume.path, slide.path, "--config", EMBEDDED_CONFIG)

    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.stdout.splitlines() == [
        f"{pa.path}: cxr: {FRONTAL}",
        f"{lateral.path}: (ignored): {LATERAL}",
        f"{volume.path}: oct: rule 'oct-volume' matched",
        f"{slide.path}: pathology: rule 'whole-slide' matched",
    ]


def test_a_study_sent_by_storescu_from_two_senders_comes_back_with_a_report_per_prompt_set(
    tmp_path, orthanc, node_factory, tiny_architecture
):
    node = node_factory(
        destinations=[orthanc.destination(backoff_s=0.5)],
        **two_sets(tmp_path, tiny_backbone(tiny_architecture)),
    )
    for sender in ("WARD", "ER"):
        path = stored(tmp_path / sender, CHEST).path
        sent = dcmtk("storescu", "-aet", sender, "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(path))
        assert sent.returncode == 0, sent.stderr

    results = _results_in(orthanc, count=4)

    reports = [ds for ds in results if ds.Modality == "SR"]
    named = sorted(tuple(sorted(set(re.findall(r"prompt set (\w+) sha256", _sr_text(ds))))) for ds in reports)
    assert named == [("first",), ("second",)]
    assert {ds.StudyInstanceUID for ds in results} == {header(CHEST).StudyInstanceUID}
    status = wait_until(lambda: "done=1" in (out := node.cli("status").stdout) and out, 60, what="done")
    assert "failed" not in status


def test_a_chest_radiograph_and_an_oct_of_one_study_come_back_with_a_report_from_each_shipped_set(
    tmp_path, orthanc, node_factory
):
    node = node_factory(destinations=[orthanc.destination(backoff_s=0.5)])
    pa, lateral = stored(tmp_path / "in", CHEST), stored(tmp_path / "in", CHEST, ViewPosition="LL")
    volume = on_disk(oct_volume(6, lesion_frames=[2], study_uid=pa.study_instance_uid), tmp_path / "in")

    sent = dcmtk(
        "storescu",
        "-aec",
        "DICOMNODE",
        "127.0.0.1",
        str(node.port),
        str(pa.path),
        str(lateral.path),
        str(volume.path),
    )
    assert sent.returncode == 0, sent.stderr

    results = _results_in(orthanc, count=4)
    reports = [ds for ds in results if ds.Modality == "SR"]
    named = sorted(tuple(sorted(set(re.findall(r"prompt set (\w+) sha256", _sr_text(ds))))) for ds in reports)
    assert named == [("cxr",), ("oct",)]
    assert {ds.StudyInstanceUID for ds in results} == {pa.study_instance_uid}
    wait_until(lambda: "done=1" in node.cli("status").stdout, 60, what="study done")
    spool = Spool(node.config.parent / "var")
    record = spool.study(pa.study_instance_uid)
    spool.close()
    assert (record.prompt_set, record.reason) == ("cxr,oct", f"left out: {LATERAL}")


def test_a_slide_pyramid_goes_to_pathology_without_its_label(tmp_path):
    levels = tiled_pyramid(slide_image(512, seed=3), tmp_path / "slide", levels=2, study_instance_uid=STUDY)
    label = pydicom.dcmread(levels[-1])
    label.SOPInstanceUID = label.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    label.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
    instances = [on_disk(pydicom.dcmread(path), tmp_path / "in") for path in levels]
    instances.append(on_disk(label, tmp_path / "in"))

    routed = route_study(SHIPPED, STUDY, instances)

    assert routed == Routed(
        STUDY,
        (StudyJob(STUDY, "pathology", "whole-slide", tuple(instances[:-1])),),
        left_out="rule 'slide-label-or-overview': slide label or overview photograph, no tissue at "
        "magnification",
    )
