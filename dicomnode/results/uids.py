"""Deterministic UIDs for the objects the node writes back to the PACS.

A PACS keys what it stores by SOP Instance UID. If re-processing a study (a restart, a late
instance that re-opened it, an operator re-running it) minted fresh UIDs, the PACS would keep
every version side by side and a radiologist would see several contradictory reports. Deriving
the UIDs from what the result depends on, the source instances and the prompt set that judged
them, makes a re-run replace the earlier objects instead; a new prompt set yields new objects.

The UIDs are `2.25.` UIDs (PS3.5 B.2) made from name-based UUIDs (ISO/IEC 9834-8, version 5),
so they need no registered root. Not `pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`:
with no prefix pydicom ignores the entropy and returns a random UUID.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "dicomnode")


def name_based_uid(*parts: str) -> str:
    """A `2.25.` UID that is the same for the same parts, in the same order, and only for them."""
    name = "\n".join(parts)
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


def derive_uid(*, source_sop_instance_uids: Iterable[str], prompt_set_sha256: str, role: str) -> str:
    """A UID fixed by the set of source instances, the prompt set and the role.

    `role` names which UID of the output this is ("sr-series", "sr-instance", ...), so the
    series and instance UIDs of one run differ from one another. The order of the sources does
    not matter: they are sorted first.
    """
    return name_based_uid(role, prompt_set_sha256, *sorted(source_sop_instance_uids))
