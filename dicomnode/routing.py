"""Routing: which prompt set, if any, a study goes to, decided by ordered YAML rules.

Rules match on dataset attributes (any DICOM keyword) and on the calling AE title. Each
instance is routed on its own; the study goes to the prompt set of its first routed
instance, with all instances routed to that set. A study nobody routes is recorded as
ignored with the reasons, never dropped in silence.
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


@dataclass(frozen=True)
class Decision:
    """What routing decided for one instance, and why, in words for `dicomnode route`."""

    prompt_set: str | None
    rule: str | None
    reason: str


@dataclass(frozen=True)
class Ignored:
    """A study that no rule sent to a prompt set."""

    study_instance_uid: str
    reason: str


def _attribute_values(ds: pydicom.Dataset, keyword: str, calling_ae: str) -> list[str]:
    if keyword == "CallingAETitle":
        return [calling_ae.strip()] if calling_ae.strip() else []
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, pydicom.multival.MultiValue):
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def _condition_holds(cond: MatchCondition, found: list[str]) -> bool:
    if cond.regex is not None:
        pattern = re.compile(cond.regex)
        return any(pattern.search(v) for v in found)
    wanted = {v.strip().upper() for v in cond.values or ()}
    return any(v.upper() in wanted for v in found)


def _quotable(keyword: str, found: list[str]) -> bool:
    if keyword == "CallingAETitle":
        return True
    tag = tag_for_keyword(keyword)
    if tag is None or tag >> 16 in _PATIENT_GROUPS or dictionary_VR(tag) not in _QUOTABLE_VRS:
        return False
    # A UID is a code only when the standard defines it (SOP classes, transfer syntaxes);
    # study, series and instance UIDs identify a patient's images and stay out of reasons.
    return dictionary_VR(tag) != "UI" or all(v in UID_dictionary for v in found)


def _rule_mismatch(rule: RoutingRule, ds: pydicom.Dataset, calling_ae: str) -> str | None:
    """None when the rule matches, else the first condition that failed, in words."""
    for keyword, cond in rule.match.items():
        found = _attribute_values(ds, keyword, calling_ae)
        if not _condition_holds(cond, found):
            expected = f"/{cond.regex}/" if cond.regex is not None else "|".join(cond.values or ())
            if not found:
                got = "absent"
            elif _quotable(keyword, found):
                got = "|".join(found)
            else:
                got = "a value that does not match"
            return f"{keyword} is {got}, rule wants {expected}"
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
) -> StudyJob | Ignored:
    """Route a quiet study: a job for the first prompt set any instance routes to, or Ignored."""
    chosen: tuple[str, str] | None = None
    routed: list[StoredInstance] = []
    reasons: list[str] = []
    for instance in instances:
        try:
            decision = decide(routing, read_header(instance.path), instance.calling_ae)
        except (OSError, InvalidDicomError) as exc:
            reasons.append(f"unreadable instance: {exc.__class__.__name__}")
            continue
        if decision.prompt_set is None:
            reasons.append(decision.reason)
        elif chosen is None or decision.prompt_set == chosen[0]:
            chosen = chosen or (decision.prompt_set, decision.rule or "")
            routed.append(instance)
    if chosen is None:
        distinct = list(dict.fromkeys(reasons)) or ["study has no instances"]
        return Ignored(study_instance_uid, "; ".join(distinct))
    return StudyJob(
        study_instance_uid=study_instance_uid,
        prompt_set=chosen[0],
        rule=chosen[1],
        instances=tuple(routed),
    )
