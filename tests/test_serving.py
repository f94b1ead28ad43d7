"""Serving learned prompt sets: batching across studies and prompt sets, and hot reload under load.

The engine tests run the tiny seeded backbone in-process; the node test runs `dicomnode serve`
with DCMTK sending and Orthanc receiving, as tests/test_end_to_end.py does.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomnode.engine import Engine
from dicomnode.flow import Sample
from dicomnode.model.backbone import Backbone
from tests.conftest import dcmtk, routing_for, tiny_backbone, wait_until
from tests.prompt_sets import DPT, VPT_DEEP, spec, write_prompt_set
from tests.test_end_to_end import SR_CLASSES, _results_in, _sr_text


@pytest.fixture(scope="module")
def backbone(tiny_architecture) -> Backbone:
    return tiny_backbone(tiny_architecture)


def _samples(backbone: Backbone, count: int, seed: int) -> list[Sample]:
    size = backbone.input_spec.image_size
    pixels = np.random.default_rng(seed).standard_normal((count, 3, size, size)).astype(np.float32)
    return [Sample(f"1.2.{seed}.{i + 1}", pixels[i], np.zeros((4, 4), np.uint8)) for i in range(count)]


def _probabilities(predictions) -> np.ndarray:
    return np.array([p.probabilities for p in predictions])


def test_studies_of_two_prompt_sets_batched_together_get_what_they_get_alone(backbone, tmp_path):
    zero = write_prompt_set(tmp_path / "z", spec("z", "zeroshot", backbone), backbone)
    vpt = write_prompt_set(tmp_path / "v", spec("v", "vpt", backbone, section=VPT_DEEP), backbone)
    first, second = _samples(backbone, 3, seed=1), _samples(backbone, 2, seed=2)
    alone = Engine(backbone)
    expected = (_probabilities(alone.predict(zero, first)), _probabilities(alone.predict(vpt, second)))
    alone.stop()

    together = Engine(backbone, max_batch=64, max_wait_s=2.0)
    together.classifier(zero), together.classifier(vpt)
    futures = (together.submit(zero, first), together.submit(vpt, second))
    got = tuple(_probabilities(f.result(timeout=60)) for f in futures)
    together.stop()

    assert list(together.recent_batches) == [(2, 5, 2)], (
        "one batch: two requests, five images, two image passes"
    )
    for mine, theirs in zip(got, expected, strict=True):
        assert np.allclose(mine, theirs, atol=1e-5)


def test_sets_that_leave_the_image_tower_alone_share_one_image_pass(backbone, tmp_path):
    zero = write_prompt_set(tmp_path / "z", spec("z", "zeroshot", backbone), backbone)
    dpt = write_prompt_set(
        tmp_path / "d", spec("d", "dpt", backbone, section={**DPT, "vision_prompt": False}), backbone
    )
    engine = Engine(backbone, max_batch=64, max_wait_s=2.0)
    engine.classifier(zero), engine.classifier(dpt)

    futures = (engine.submit(zero, _samples(backbone, 2, 1)), engine.submit(dpt, _samples(backbone, 2, 2)))
    for future in futures:
        future.result(timeout=60)
    engine.stop()

    assert list(engine.recent_batches) == [(2, 4, 1)]


def test_many_batches_in_flight_each_get_their_own_predictions(backbone, tmp_path):
    """Staging runs ahead of the device: no batch may see another's pixels (buffers in rotation)."""
    zero = write_prompt_set(tmp_path / "z", spec("z", "zeroshot", backbone), backbone)
    requests = [_samples(backbone, 3, seed) for seed in range(12)]
    alone = Engine(backbone, max_batch=3, max_wait_s=0)
    expected = [_probabilities(alone.predict(zero, samples)) for samples in requests]
    alone.stop()

    engine = Engine(backbone, max_batch=3, max_wait_s=0)
    futures = [engine.submit(zero, samples) for samples in requests]
    got = [_probabilities(future.result(timeout=60)) for future in futures]
    engine.stop()

    for mine, theirs in zip(got, expected, strict=True):
        assert np.allclose(mine, theirs, atol=1e-6)


def test_a_batch_that_fails_fails_its_requests_and_serving_goes_on(backbone, tmp_path):
    zero = write_prompt_set(tmp_path / "z", spec("z", "zeroshot", backbone), backbone)
    engine = Engine(backbone, max_batch=4, max_wait_s=0)
    good = _samples(backbone, 2, seed=1)
    wrong_shape = [Sample("1.2.9.1", np.zeros((3, 5, 5), np.float32), np.zeros((1, 1), np.uint8))]
    with pytest.raises(RuntimeError):
        engine.predict(zero, wrong_shape)  # fails while staging
    classifier = engine.classifier(zero)
    classifier.image_features = lambda pixels: (_ for _ in ()).throw(RuntimeError("device fault"))
    with pytest.raises(RuntimeError, match="device fault"):
        engine.predict(zero, good)  # fails on the device side
    del classifier.image_features
    assert len(engine.predict(zero, good)) == 2
    workers = list(engine._workers)
    engine.stop()
    assert not any(worker.is_alive() or worker.stager.is_alive() for worker in workers)


def test_a_version_in_use_stays_cached_until_its_study_is_done(backbone, tmp_path):
    old = write_prompt_set(tmp_path / "a" / "s", spec("s", "dpt", backbone, section=DPT), backbone, seed=1)
    new = write_prompt_set(tmp_path / "b" / "s", spec("s", "dpt", backbone, section=DPT), backbone, seed=2)
    engine = Engine(backbone)
    engine.classifier(old)

    with engine.using(old):
        engine.classifier(new)
        engine.serve_only({new.sha256})
        assert engine.cached_versions() == {old.sha256, new.sha256}
        engine.predict(old, _samples(backbone, 1, 3))
    assert engine.cached_versions() == {new.sha256}
    engine.stop()


def _study_copy(source: Path, folder: Path, index: int) -> Path:
    """The chest CR as a new study of its own (new Study, Series and SOP Instance UIDs)."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / f"study{index}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _replace_prompt_set(served: Path, version: Path) -> None:
    """Put a new version in place the way an administrator's copy would: file by file, atomically."""
    for name in ("prompts.safetensors", "promptset.yaml"):
        staged = served / f".{name}.new"
        shutil.copyfile(version / name, staged)
        os.replace(staged, served / name)


def test_a_learned_set_is_served_and_a_hot_reload_under_load_loses_no_study(
    tmp_path, orthanc, node_factory, chest_cr, backbone
):
    prompts = tmp_path / "prompts"
    write_prompt_set(prompts / "cxr", spec("cxr", "vpt", backbone, section=VPT_DEEP), backbone)
    write_prompt_set(tmp_path / "next" / "cxr", spec("cxr", "dpt", backbone, section=DPT), backbone)
    node = node_factory(
        destinations=[orthanc.destination(backoff_s=0.5)],
        prompts_dir=str(prompts),
        routing=str(routing_for(tmp_path, "cxr")),
    )
    studies = 6
    (tmp_path / "studies").mkdir()
    for index in range(studies):
        if index == 3:
            # Swap once the first version has served a study, while the others are in flight.
            wait_until(lambda: re.search(r"done=[1-9]", node.cli("status").stdout), 60, what="a study done")
            _replace_prompt_set(prompts / "cxr", tmp_path / "next" / "cxr")
        path = _study_copy(chest_cr, tmp_path / "studies", index)
        sent = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(path))
        assert sent.returncode == 0, sent.stderr

    results = _results_in(orthanc, count=2 * studies)
    status = wait_until(
        lambda: f"done={studies}" in (s := node.cli("status").stdout) and s, 60, what="status"
    )
    assert "failed" not in status
    reports = [r for r in results if r.SOPClassUID in SR_CLASSES]
    assert len(reports) == studies, "one report per study, none lost, none twice"
    methods = [
        ("vpt" if "cxr vpt" in _sr_text(r) else "dpt" if "cxr dpt" in _sr_text(r) else "?") for r in reports
    ]
    assert "?" not in methods
    assert methods.count("vpt") >= 1 and methods.count("dpt") >= 1, methods
    log = node.log.read_text()
    assert "prompt set cxr reloaded" in log
