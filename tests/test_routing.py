"""Routing: ordered rules from routing.yaml decide, per instance and per study, which prompt
set a study goes to, or why it is ignored, without ever quoting free text about a patient.

The datasets are pydicom's real test files: RG1_UNCR (CR, CHEST), RG3_UNCR (CR, EXTREMITY)
and CT_small (CT, no BodyPartExamined); rules are real YAML files read by `load_routing`.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicomnode.config import RoutingConfig, load_routing
from dicomnode.flow import StoredInstance, StudyJob
from dicomnode.identity import NODE_MANUFACTURER
from dicomnode.routing import Decision, Ignored, decide, read_header, route_study

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


def test_standard_sop_class_uid_is_quoted_because_it_is_a_code(tmp_path):
    routing = routing_from(
        tmp_path, "rules: [{name: dx, match: {SOPClassUID: ['1.2.840.10008.5.1.4.1.1.1.1']}, prompt_set: x}]"
    )

    reason = decide(routing, header(CHEST)).reason

    assert "SOPClassUID is 1.2.840.10008.5.1.4.1.1.1, rule wants" in reason


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
  - {{name: listed, match: {{{keyword}: ['something else']}}, prompt_set: x}}
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


def test_study_goes_to_the_first_routed_prompt_set_with_only_its_instances(routing, tmp_path):
    extremity = stored(tmp_path, EXTREMITY)
    ct_one, chest, ct_two = stored(tmp_path, CT), stored(tmp_path, CHEST), stored(tmp_path, CT)

    job = route_study(routing, STUDY, [extremity, ct_one, chest, ct_two])

    assert job == StudyJob(study_instance_uid=STUDY, prompt_set="ct", rule="ct", instances=(ct_one, ct_two))


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

    job = route_study(routing, STUDY, [limb, chest])

    assert isinstance(job, StudyJob)
    assert (job.prompt_set, job.rule, job.instances) == ("cxr", "cr", (limb, chest))


def test_study_is_routed_with_each_instances_own_calling_ae(tmp_path):
    routing = routing_from(tmp_path, "rules: [{name: ward, match: {CallingAETitle: WARD}, prompt_set: cxr}]")
    from_er, from_ward = stored(tmp_path, CHEST, calling_ae="ER"), stored(tmp_path, CHEST, calling_ae="WARD")

    job = route_study(routing, STUDY, [from_er, from_ward])

    assert isinstance(job, StudyJob) and job.instances == (from_ward,)


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

    assert route_study(routing, STUDY, [unreadable, vanished, chest]).instances == (chest,)
    outcome = route_study(routing, STUDY, [unreadable, vanished])
    assert outcome == Ignored(
        STUDY, "unreadable instance: InvalidDicomError; unreadable instance: FileNotFoundError"
    )


def test_results_of_dicomnode_in_the_study_are_left_out_of_the_job(routing, tmp_path):
    chest = stored(tmp_path, CHEST)
    our_result = stored(tmp_path, CHEST, Manufacturer=NODE_MANUFACTURER)

    job = route_study(routing, STUDY, [our_result, chest])

    assert isinstance(job, StudyJob) and job.instances == (chest,)
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
