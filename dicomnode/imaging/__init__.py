"""Imaging: decode stored instances and prepare them for the engine, one module per domain.

A prompt set's domain names its preparer here; adding a domain (oct, pathology) is one module
and one entry in `PREPARERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dicomnode.flow import InputSpec, Sample
from dicomnode.imaging import cxr
from dicomnode.imaging.common import ImagingError

PREPARERS: dict[str, Callable[[Path, InputSpec], Sample]] = {"cxr": cxr.prepare}

__all__ = ["PREPARERS", "ImagingError", "prepare"]


def prepare(prompt_set_domain: str, path: Path, spec: InputSpec) -> Sample:
    """Prepare one stored instance with the preparer of the prompt set's domain."""
    preparer = PREPARERS.get(prompt_set_domain)
    if preparer is None:
        raise ImagingError(
            f"no imaging preparer for domain {prompt_set_domain!r} (known: {sorted(PREPARERS)})"
        )
    return preparer(path, spec)
