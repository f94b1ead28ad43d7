"""The per-study pipeline that serve, infer, train and eval share: files -> samples -> predictions.

One function decides which pixels a prompt set sees and how they are scored, so the node,
`dicomnode infer` and the training and evaluation commands see identical pixels and make
identical decisions. Imaging (decode, LUTs, resize) runs in worker processes when a pool is
given, so the engine is never waiting on one CPU core to decode a large radiograph; this
module imports no torch, so those processes stay small.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from dicomnode import imaging
from dicomnode.flow import InputSpec, Prediction, Sample
from dicomnode.routing import read_header

if TYPE_CHECKING:
    from dicomnode.engine import Engine
    from dicomnode.model.promptset import PromptSet


@dataclass
class Classified:
    """What `classify` made of some files: per image its header, sample and prediction."""

    paths: list[Path] = field(default_factory=list)
    sources: list[pydicom.Dataset] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    problems: dict[Path, str] = field(default_factory=dict)


def imaging_pool(processes: int) -> Executor | None:
    """Worker processes for imaging (spawned: they never inherit the engine's threads or GPU)."""
    if processes <= 0:
        return None
    return ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"))


def prepare_one(domain: str, path: Path, spec: InputSpec) -> tuple[Sample, pydicom.Dataset] | str:
    """One file's sample and header, or the reason imaging refused it (runs in a worker)."""
    try:
        return imaging.prepare(domain, path, spec), read_header(path)
    except imaging.ImagingError as exc:
        return str(exc)


def prepare(domain: str, paths: Sequence[Path], spec: InputSpec, pool: Executor | None = None) -> Classified:
    """Samples and headers of the files a domain accepts; the others in `problems` with the reason."""
    prepared = Classified()
    if pool is None:
        outcomes = [prepare_one(domain, path, spec) for path in paths]
    else:
        outcomes = list(pool.map(prepare_one, [domain] * len(paths), paths, [spec] * len(paths)))
    for path, outcome in zip(paths, outcomes, strict=True):
        if isinstance(outcome, str):
            prepared.problems[path] = outcome
            continue
        sample, source = outcome
        prepared.paths.append(path)
        prepared.samples.append(sample)
        prepared.sources.append(source)
    return prepared


def classify(
    engine: Engine, prompt_set: PromptSet, paths: Sequence[Path], pool: Executor | None = None
) -> Classified:
    """Prepare each file for the prompt set's domain and run the engine on those that could be.

    A file imaging refuses is recorded in `problems` with the reason, never raised: one bad
    image must not cost the study its other images.
    """
    classified = prepare(prompt_set.domain, paths, engine.input_spec, pool)
    if classified.samples:
        classified.predictions = engine.predict(prompt_set, classified.samples)
    return classified
