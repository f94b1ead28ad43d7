"""The per-study pipeline that serve, infer, train and eval share: files -> samples -> predictions.

One function decides which pixels a prompt set sees and how they are scored, so the node,
`dicomnode infer` and the training and evaluation commands see identical pixels and make
identical decisions. Imaging (decode, LUTs, resize) runs in worker processes when a pool is
given, so the engine is never waiting on one CPU core to decode a large radiograph; this
module imports no torch, so those processes stay small.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Mapping, Sequence
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
    """What `classify` made of some files: per sample its file, header, sample and prediction.

    A single image gives one sample; a volume one per frame, a slide one per tile, each with
    its file and header repeated, so the lists stay aligned sample by sample.
    """

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


def prepare_unit(
    domain: str, paths: Sequence[Path], spec: InputSpec, options: Mapping[str, object]
) -> list[tuple[Path, pydicom.Dataset, Sample]] | str:
    """One unit's samples, each with its file and header, or why imaging refused it (in a worker)."""
    try:
        samples = imaging.prepare_unit(domain, paths, spec, options)
        headers = {}
        for path in paths:
            header = read_header(path)
            headers[str(header.SOPInstanceUID)] = path, header
    except imaging.ImagingError as exc:
        return str(exc)
    return [(*headers[sample.sop_instance_uid], sample) for sample in samples]


def prepare(
    domain: str,
    paths: Sequence[Path],
    spec: InputSpec,
    pool: Executor | None = None,
    options: Mapping[str, object] | None = None,
) -> Classified:
    """Samples and headers of the files a domain accepts; the others in `problems` with the reason.

    The domain groups the files into units (an instance, or a slide's pyramid) that are prepared
    together; a unit refused by imaging puts each of its files in `problems`.
    """
    prepared = Classified()
    groups = imaging.units(domain, paths)
    count = len(groups)
    options = options or {}
    if pool is None:
        outcomes = [prepare_unit(domain, unit, spec, options) for unit in groups]
    else:
        outcomes = list(pool.map(prepare_unit, [domain] * count, groups, [spec] * count, [options] * count))
    for unit, outcome in zip(groups, outcomes, strict=True):
        if isinstance(outcome, str):
            prepared.problems.update(dict.fromkeys(unit, outcome))
            continue
        for path, source, sample in outcome:
            prepared.paths.append(path)
            prepared.sources.append(source)
            prepared.samples.append(sample)
    return prepared


def classify(
    engine: Engine, prompt_set: PromptSet, paths: Sequence[Path], pool: Executor | None = None
) -> Classified:
    """Prepare each file for the prompt set's domain and run the engine on those that could be.

    A file imaging refuses is recorded in `problems` with the reason, never raised: one bad
    image must not cost the study its other images.
    """
    classified = prepare(prompt_set.domain, paths, engine.input_spec, pool, prompt_set.imaging)
    if classified.samples:
        classified.predictions = engine.predict(prompt_set, classified.samples)
    return classified
