"""What may appear in logs: never patient data, and UIDs only as short one-way tags.

Every room logs through these helpers so a log line, an audit entry, a journal reason and an
imaging error name the same instance the same way, and so third-party warnings (pydicom and
highdicom quote attribute values in theirs) never carry a value into a log.
"""

from __future__ import annotations

import hashlib
import logging
import traceback
import warnings
from pathlib import Path

log = logging.getLogger("dicomnode.warnings")


def uid_tag(uid: str) -> str:
    """A short, stable, non-reversible tag for a UID, the only form UIDs take in logs."""
    return hashlib.sha256(str(uid).encode("ascii", "replace")).hexdigest()[:12]


def _log_warning_without_message(message, category, filename, lineno, file=None, line=None) -> None:
    log.warning(
        "%s from %s:%d (text withheld: library warnings can quote patient data)",
        category.__name__,
        Path(filename).name,
        lineno,
    )


def withhold_warning_texts() -> None:
    """Log library warnings (Python's default filters: once per place) by category and place only."""
    warnings.showwarning = _log_warning_without_message


def describe_error(exc: BaseException) -> str:
    """An exception in words fit for a log, the journal and `dicomnode status`.

    The node's own errors are written log-safe (UIDs as tags) and keep their text. An OS
    error keeps its number and meaning but not its file names, which in the spool and outbox
    are made of Study and SOP Instance UIDs. Any other library's text may quote a value of the
    dataset, so only its type is kept.
    """
    name = type(exc).__name__
    if type(exc).__module__.startswith("dicomnode"):
        return f"{name}: {exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{name}: [Errno {exc.errno}] {exc.strerror}"
    return name


def where_raised(exc: BaseException, frames: int = 3) -> str:
    """The innermost frames of the exception and of those it was raised from, without their texts.

    What `log.exception` would print for finding the fault, less the messages (chained OS
    errors name spool paths).
    """
    places = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        stack = traceback.extract_tb(current.__traceback__)[-frames:]
        trail = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack))
        places.append(f"{describe_error(current)} at {trail or 'unknown place'}")
        current = current.__cause__ or current.__context__
    return "; from ".join(places)
