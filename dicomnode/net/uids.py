"""pynetdicom's UID conversion, remembered across associations.

Every A-ASSOCIATE-RQ names its abstract and transfer syntaxes, and pynetdicom turns each UID
into a pydicom UID (`pynetdicom.utils.set_uid`) several times as it decodes the request,
negotiates and encodes the answer, each time checking it with three regular expressions.
DCMTK's storescu proposes 128 presentation contexts of three transfer syntaxes each: a PACS
that forwards every instance on an association of its own (Orthanc's usual routing) paid
about a quarter of the node's CPU per association for those checks. The UIDs are the same
few hundred every time, so the outcome is remembered.

The remembered conversion gives what pynetdicom's gives: the same UID for the same input, and
the same ValueError (not remembered) for an invalid one. A non-conformant UID is logged by
pynetdicom the first time only. The memory is bounded, least recently used first out, so
that a peer naming ever new UIDs cannot grow it.
"""

from __future__ import annotations

import functools

import pynetdicom
from pydicom.uid import UID
from pynetdicom import ae, dimse_primitives, pdu_items, pdu_primitives, presentation, utils

#: pynetdicom versions whose set_uid was read, and whose modules that import it are these.
CHECKED_VERSIONS = frozenset({"3.0.4"})

#: Modules that bound pynetdicom's set_uid at import.
_USERS = (utils, ae, dimse_primitives, pdu_items, pdu_primitives, presentation)

#: Conversions remembered: a few hundred syntaxes, with room for the instance UIDs met between.
REMEMBERED = 4096


def remember_uids() -> None:
    """Have pynetdicom remember its UID conversions, process-wide (idempotent); on a version
    not checked, leave it as it is."""
    if pynetdicom.__version__ not in CHECKED_VERSIONS or getattr(utils.set_uid, "remembers", False):
        return
    convert = utils.set_uid
    # typed: a str, its bytes and a UID of the same value are remembered apart.
    converted = functools.lru_cache(maxsize=REMEMBERED, typed=True)(convert)

    @functools.wraps(convert)
    def set_uid(value, name, allow_empty=True, allow_none=True, validate=True):
        if not isinstance(value, (str, bytes)):  # None, or what pynetdicom refuses with its TypeError
            return convert(value, name, allow_empty, allow_none, validate)
        uid = converted(value, name, allow_empty, allow_none, validate)
        # pynetdicom hands back a UID it was given as it is, with whatever pydicom set on it.
        return value if isinstance(value, UID) else uid

    set_uid.remembers = True
    set_uid.cache_info, set_uid.cache_clear = converted.cache_info, converted.cache_clear
    for module in _USERS:
        module.set_uid = set_uid
