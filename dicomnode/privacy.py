"""What may appear in logs: never patient data, and UIDs only as short one-way tags.

Every room logs through these helpers so a log line, an audit entry, a journal reason and an
imaging error name the same instance the same way, and so third-party warnings (pydicom and
highdicom quote attribute values in theirs) never carry a value into a log.
"""

from __future__ import annotations

import hashlib
import logging
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
