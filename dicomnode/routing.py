"""Routing: which prompt sets, if any, a study goes to, decided by ordered YAML rules.

Rules match on dataset attributes (any DICOM keyword: values, a regex, presence or absence,
codes in a code sequence) and on the calling AE title. Each instance is routed on its own,
the first matching rule deciding; a study goes to every prompt set one of its instances is
routed to, one job per set. Instances nobody routes, and a study nobody routes, are recorded
with the reasons, never dropped in silence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID_dictionary

from dicomnode.config import MatchCondition, RoutingConfig, RoutingRule
from dicomnode.flow import StoredInstance, StudyJob
from dicomnode.identity import NODE_MANUFACTURER

#: Value representations whose values are codes or numbers, never free text about a person;
#: only these are quoted in routing reasons, which end up in logs and `dicomnode status`.
_QUOTABLE_VRS = frozenset({"AE", "CS", "DS", "IS", "SS", "US", "UI"})
#: Groups that describe the patient (0010: sex, weight, size, age ...) and the visit (0038):
#: codes and numbers there are patient data too, and never quoted, whatever their VR.
_PATIENT_GROUPS = frozenset({0x0010, 0x0038})

#: Code sequences that describe how an image was acquired, not the patient: their codes are
#: quoted in reasons. Codes of other sequences (admitting diagnoses, ...) are health data.
_ACQUISITION_CODE_SEQUENCES = frozenset(
    {
        "ViewCodeSequence",
        "ViewModifierCodeSequence",
        "AnatomicRegionSequence",
        "AnatomicRegionModifierSequence",
        "PrimaryAnatomicStructureSequence",
    }
)


@dataclass(frozen=True)
class Decision:
    """What routing decided for one instance, and why, in words for `dicomnode route`."""

    prompt_set: str | None
    rule: str | None
    reason: str


@dataclass(frozen=True)
class Routed:
    """A study routed to one or more prompt sets: one job per set, in the order first met.

    `left_out` gives the distinct reasons of the instances no job holds, None when every
    instance is in a job.
    """

    study_instance_uid: str
    jobs: tuple[StudyJob, ...]
    left_out: str | None


@dataclass(frozen=True)
class Ignored:
    """A study that no rule sent to a prompt set."""

    study_instance_uid: str
    reason: str


def _code(item: pydicom.Dataset) -> str:
    """`SCHEME:VALUE` of a code sequence item; empty when the item holds no code."""
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
    scheme = item.get("CodingSchemeDesignator")
    return f"{str(scheme).strip().upper()}:{str(value).strip()}" if value and scheme else ""


def _attribute_values(ds: pydicom.Dataset, keyword: str, calling_ae: str) -> list[str]:
    """The attribute's values as strings (a sequence's: one code per item); [] when absent or empty."""
    if keyword == "CallingAETitle":
        return [calling_ae.strip()] if calling_ae.strip() else []
    value = ds.get(keyword)
    if value is None:
        return []
    if isinstance(value, pydicom.sequence.Sequence):
        return [_code(item) for item in value]
    values = value if isinstance(value, pydicom.multival.MultiValue) else [value]
    return [text for v in values if (text := str(v).strip())]


def _condition_holds(cond: MatchCondition, found: list[str]) -> bool:
    if cond.present is not None:
        return bool(found) == cond.present
    if cond.regex is not None:
        pattern = re.compile(cond.regex)
        return any(pattern.search(v) for v in found)
    if cond.codes is not None:
        wanted = {f"{scheme}:{code}" for scheme, codes in cond.codes.items() for code in codes}
        return any(v in wanted for v in found)
    wanted = {v.strip().upper() for v in cond.values or ()}
    return any(v.upper() in wanted for v in found)


def _quotable(keyword: str, found: list[str]) -> bool:
    if keyword == "CallingAETitle":
        return True
    tag = tag_for_keyword(keyword)
    if tag is None or tag >> 16 in _PATIENT_GROUPS or keyword.startswith("Patient"):
        return False
    vr = dictionary_VR(tag)
    if vr == "SQ":
        return keyword in _ACQUISITION_CODE_SEQUENCES
    if vr not in _QUOTABLE_VRS:
        return False
    # A UID is a code only when the standard defines it (SOP classes, transfer syntaxes);
    # study, series and instance UIDs identify a patient's images and stay out of reasons.
    return vr != "UI" or all(v in UID_dictionary for v in found)


def _shown(value: str) -> str:
    """A value as a reason shows it: a standard UID by its keyword, anything else as is."""
    entry = UID_dictionary.get(value)
    return entry[4] if entry is not None and entry[4] else (value or "an item without a code")


def _wanted(cond: MatchCondition) -> str:
    if cond.present is not None:
        return "it present" if cond.present else "it absent"
    if cond.regex is not None:
        return f"/{cond.regex}/"
    if cond.codes is not None:
        return "|".join(f"{scheme}:{code}" for scheme, codes in cond.codes.items() for code in codes)
    return "|".join(_shown(v) for v in cond.values or ())


def _rule_mismatch(rule: RoutingRule, ds: pydicom.Dataset, calling_ae: str) -> str | None:
    """None when the rule matches, else the first condition that failed, in words."""
    for keyword, cond in rule.match.items():
        found = _attribute_values(ds, keyword, calling_ae)
        if not _condition_holds(cond, found):
            if not found:
                got = "absent"
            elif _quotable(keyword, found):
                got = "|".join(_shown(v) for v in found)
            elif cond.present is not None:
                got = "present"
            else:
                got = "a value that does not match"
            return f"{keyword} is {got}, rule wants {_wanted(cond)}"
    return None


def decide(routing: RoutingConfig, ds: pydicom.Dataset, calling_ae: str = "") -> Decision:
    """Route one dataset: the first matching rule wins; the reason says why in words."""
    # Our own results, forwarded back by a PACS, are never processed again.
    if str(ds.get("Manufacturer", "")).strip() == NODE_MANUFACTURER:
        return Decision(None, None, "a result dicomnode produced itself")
    misses = []
    for rule in routing.rules:
        mismatch = _rule_mismatch(rule, ds, calling_ae)
        if mismatch is None:
            if rule.ignore is not None:
                return Decision(None, rule.name, f"rule {rule.name!r}: {rule.ignore}")
            return Decision(rule.prompt_set, rule.name, f"rule {rule.name!r} matched")
        misses.append(f"{rule.name}: {mismatch}")
    return Decision(None, None, "no rule matched (" + "; ".join(misses) + ")")


def read_header(path: Path) -> pydicom.Dataset:
    """The dataset without pixel data: all routing needs, at a fraction of the read cost."""
    return pydicom.dcmread(path, stop_before_pixels=True)


def route_study(
    routing: RoutingConfig, study_instance_uid: str, instances: Sequence[StoredInstance]
) -> Routed | Ignored:
    """Route a quiet study: one job per prompt set its instances route to, or Ignored.

    Each job holds the instances routed to its set, in the study's order, and names the rule
    of the first of them. Instances routed nowhere are left out with their reasons.
    """
    routed: dict[str, list[StoredInstance]] = {}
    rules: dict[str, str] = {}
    reasons: list[str] = []
    for instance in instances:
        try:
            decision = decide(routing, read_header(instance.path), instance.calling_ae)
        except (OSError, InvalidDicomError) as exc:
            reasons.append(f"unreadable instance: {exc.__class__.__name__}")
            continue
        if decision.prompt_set is None:
            reasons.append(decision.reason)
            continue
        routed.setdefault(decision.prompt_set, []).append(instance)
        rules.setdefault(decision.prompt_set, decision.rule or "")
    distinct = "; ".join(dict.fromkeys(reasons))
    if not routed:
        return Ignored(study_instance_uid, distinct or "study has no instances")
    jobs = tuple(
        StudyJob(
            study_instance_uid=study_instance_uid,
            prompt_set=prompt_set,
            rule=rules[prompt_set],
            instances=tuple(members),
        )
        for prompt_set, members in routed.items()
    )
    return Routed(study_instance_uid, jobs, distinct or None)
