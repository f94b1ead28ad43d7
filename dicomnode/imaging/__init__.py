"""Imaging: decode stored instances and prepare them for the engine, one module per domain.

A prompt set's domain names its entry in `DOMAINS`: how the study's instances are grouped into
units prepared together (one instance for radiographs and OCT; a pyramid's instances for a
slide), how a unit becomes samples, and which `imaging:` options of the prompt set it reads.
Adding a domain is one module and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicomnode.flow import InputSpec, Sample
from dicomnode.imaging import cxr, oct, pathology
from dicomnode.imaging.common import ImagingError

__all__ = ["DOMAINS", "Domain", "ImagingError", "prepare", "prepare_unit", "units"]


def each_instance(paths: Sequence[Path]) -> list[list[Path]]:
    """The default grouping: every instance is prepared on its own."""
    return [[path] for path in paths]


@dataclass(frozen=True)
class Domain:
    """How one domain's instances become samples."""

    prepare: Callable[[Sequence[Path], InputSpec, Mapping[str, object]], list[Sample]]
    group: Callable[[Sequence[Path]], list[list[Path]]] = each_instance
    options: frozenset[str] = frozenset()


DOMAINS: dict[str, Domain] = {
    "cxr": Domain(cxr.prepare_each),
    "oct": Domain(oct.prepare, options=oct.OPTIONS),
    "pathology": Domain(pathology.prepare, group=pathology.group_by_series, options=pathology.OPTIONS),
}


def domain(name: str) -> Domain:
    """The domain called `name`, or ImagingError listing the known ones."""
    found = DOMAINS.get(name)
    if found is None:
        raise ImagingError(f"no imaging preparer for domain {name!r} (known: {sorted(DOMAINS)})")
    return found


def units(domain_name: str, paths: Sequence[Path]) -> list[list[Path]]:
    """The study's files grouped as the domain prepares them."""
    return domain(domain_name).group(paths)


def prepare_unit(
    domain_name: str, paths: Sequence[Path], spec: InputSpec, options: Mapping[str, object] | None = None
) -> list[Sample]:
    """Samples of one unit (see `units`) with the preparer of the prompt set's domain."""
    return domain(domain_name).prepare(paths, spec, options or {})


def prepare(domain_name: str, path: Path, spec: InputSpec) -> Sample:
    """The one sample of a single-image file (training and evaluation read images this way).

    Raises ImagingError when the file gives several samples (a volume): a labelled image is one
    sample.
    """
    samples = prepare_unit(domain_name, [path], spec)
    if len(samples) != 1:
        raise ImagingError(f"the file gives {len(samples)} samples (frames or tiles); expected one image")
    return samples[0]
