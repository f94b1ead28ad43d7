"""Deterministic UIDs for the objects the node writes back to the PACS, one set per report version.

A PACS keys what it stores by SOP Instance UID, and many (Orthanc by default) keep the first
copy of a UID they already hold. So the UIDs follow two rules:

- Same content, same UIDs. A re-run of a study with the same source instances, prompt set,
  backbone weights and algorithm version (a restart, an idempotent re-send) writes the same
  objects again, and the PACS holds one copy.
- New content, new UIDs that say what they replace. When anything the result depends on
  changes (a late instance, a new prompt set, a real checkpoint instead of the DEMO weights),
  the new objects get UIDs derived from the new content and from the report they supersede,
  so they can never collide with an earlier version (not even when the content returns to an
  earlier state) and the new SR names its predecessor (see `results/__init__.py`).

`content_key` names the content; `derive_uid` gives each role ("sr-series", "sr-instance",
...) of one version its UID. The UIDs are `2.25.` UIDs (PS3.5 B.2) made from name-based UUIDs
(ISO/IEC 9834-8, version 5), so they need no registered root. Not
`pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`: with no prefix pydicom ignores the
entropy and returns a random UUID.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from dicomnode.flow import ModelIdentity

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "dicomnode")


def name_based_uid(*parts: str) -> str:
    """A `2.25.` UID that is the same for the same parts, in the same order, and only for them."""
    name = "\n".join(parts)
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


def content_key(*, source_sop_instance_uids: Iterable[str], model: ModelIdentity) -> str:
    """A key fixed by everything a study's result depends on, and only by that.

    The set of source instances (their order does not matter), the prompt set's hash, the
    backbone's architecture and weights (checkpoint sha256, or the seed of the DEMO weights)
    and the algorithm version, which the SR records as its software version.
    """
    return name_based_uid(
        "content",
        model.prompt_set_sha256,
        model.backbone_identity,
        model.algorithm_version,
        *sorted(source_sop_instance_uids),
    )


def derive_uid(*, content: str, role: str, replaces: str | None = None) -> str:
    """The UID of one `role` of the report version made from `content`.

    `replaces` is the SOP Instance UID of the SR this version supersedes: the same content
    written as a later version gets other UIDs than its first writing.
    """
    return name_based_uid(role, content, *(() if replaces is None else ("replaces", replaces)))
