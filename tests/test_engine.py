"""The engine: cached text features, probabilities with the task's semantics, batch invariance.

It runs the tiny seeded backbone of conftest.py on random images; prompt sets are written by
the tests or taken from prompts/cxr.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from dicomnode.config import ModelConfig
from dicomnode.engine import Engine, EngineError
from dicomnode.flow import Sample
from dicomnode.model.backbone import Backbone, load_backbone
from dicomnode.model.promptset import PROMPTSET_FILE, PromptSet, load_prompt_set
from tests.conftest import REPO

CODE = {"value": "1", "scheme": "99TEST", "meaning": "Test finding"}


class CountingEngine(Engine):
    """An Engine that counts the texts it sends through the text tower."""

    def __init__(self, backbone: Backbone, **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        self.encoded_texts = 0

    def _encode_texts(self, backbone: Backbone, texts: list[str]) -> torch.Tensor:
        self.encoded_texts += len(texts)
        return super()._encode_texts(backbone, texts)


@pytest.fixture(scope="module")
def backbone(tiny_architecture) -> Backbone:
    return load_backbone(
        ModelConfig(
            architecture=tiny_architecture.stem, architecture_config=tiny_architecture, seed=7, device="cpu"
        )
    )


@pytest.fixture(scope="module")
def cxr() -> PromptSet:
    return load_prompt_set(REPO / "prompts" / "cxr")


def _samples(backbone: Backbone, count: int, seed: int = 0) -> list[Sample]:
    size = backbone.input_spec.image_size
    rng = np.random.default_rng(seed)
    return [
        Sample(
            sop_instance_uid=f"1.2.3.{index + 1}",
            pixels=rng.standard_normal((3, size, size)).astype(np.float32),
            display=np.zeros((size, size), np.uint8),
        )
        for index in range(count)
    ]


def _prompt_set(
    tmp_path: Path,
    *,
    name: str = "test",
    task: str = "multi-label",
    classes: tuple[str, ...] = ("effusion", "pneumothorax", "a nodule"),
    positive: tuple[str, ...] = ("a chest X-ray showing {finding}",),
    negative: tuple[str, ...] = ("a chest X-ray without {finding}",),
    backbone: dict | None = None,
) -> PromptSet:
    spec = {
        "name": name,
        "version": "1",
        "domain": "cxr",
        "procedure": {"value": "399208008", "scheme": "SCT", "meaning": "Plain chest X-ray"},
        "method": "zeroshot",
        "task": task,
        "templates": {"positive": list(positive), "negative": list(negative)},
        "classes": [{"name": f"class{i}", "text": text, "code": CODE} for i, text in enumerate(classes)],
    }
    if backbone is not None:
        spec["backbone"] = backbone
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / PROMPTSET_FILE).write_text(yaml.safe_dump(spec))
    return load_prompt_set(folder)


def _probabilities(predictions) -> np.ndarray:
    return np.array([p.probabilities for p in predictions])


def test_text_features_are_computed_once_and_then_served_from_the_cache(backbone, cxr):
    engine = CountingEngine(backbone)

    first = engine.text_features(cxr)
    encoded = engine.encoded_texts
    second = engine.text_features(cxr)
    engine.predict(cxr, _samples(backbone, 2))

    assert encoded == len(cxr.class_texts) * (len(cxr.positive_templates) + len(cxr.negative_templates))
    assert engine.encoded_texts == encoded, "the second call encoded nothing"
    assert second is first
    assert first.shape == (14, 2, 32)
    assert torch.allclose(first.norm(dim=-1), torch.ones(14, 2))


def test_a_changed_prompt_set_gets_its_own_text_features(backbone, tmp_path):
    engine = CountingEngine(backbone)
    before = _prompt_set(tmp_path / "a", classes=("effusion", "pneumothorax"))
    after = _prompt_set(tmp_path / "b", classes=("effusion", "a hiatal hernia"))

    old, new = engine.text_features(before), engine.text_features(after)

    assert before.sha256 != after.sha256
    assert engine.encoded_texts == 8
    assert torch.equal(old[0], new[0]), "same class text, same features"
    assert not torch.equal(old[1], new[1])


def test_class_features_are_the_normalised_mean_over_templates(backbone, tmp_path):
    engine = Engine(backbone)
    templates = ("a chest X-ray showing {finding}", "an image with {finding}")
    prompt_set = _prompt_set(
        tmp_path, task="multi-class", classes=("effusion",), positive=templates, negative=()
    )

    features = engine.text_features(prompt_set)

    tokens = backbone.tokenizer([t.format(finding="effusion") for t in templates])
    with torch.inference_mode():
        encoded = F.normalize(backbone.model.encode_text(tokens).float(), dim=-1)
    expected = F.normalize(encoded.mean(dim=0), dim=-1)
    assert features.shape == (1, 1, 32)
    assert torch.allclose(features[0, 0], expected, atol=1e-6)


def test_predict_gives_one_probability_per_class_in_zero_to_one_for_each_sample(backbone, cxr):
    samples = _samples(backbone, 3)

    predictions = Engine(backbone).predict(cxr, samples)

    assert [p.sop_instance_uid for p in predictions] == [s.sop_instance_uid for s in samples]
    probabilities = _probabilities(predictions)
    assert probabilities.shape == (3, 14)
    assert np.all((probabilities >= 0.0) & (probabilities <= 1.0))
    assert not np.allclose(probabilities[0], probabilities[1]), "different images, different outputs"


def test_multi_label_is_a_two_way_softmax_per_class_between_positive_and_negative(backbone, cxr):
    engine = Engine(backbone)
    samples = _samples(backbone, 2)

    probabilities = _probabilities(engine.predict(cxr, samples))

    text = engine.text_features(cxr)
    pixels = torch.from_numpy(np.stack([s.pixels for s in samples]))
    with torch.inference_mode():
        images = F.normalize(backbone.model.encode_image(pixels).float(), dim=-1)
        scale = backbone.model.logit_scale.exp()
        positive = images @ text[:, 0].T
        negative = images @ text[:, 1].T
        expected = torch.sigmoid(scale * (positive - negative))
    np.testing.assert_allclose(probabilities, expected.numpy(), atol=1e-5)
    assert not np.allclose(probabilities.sum(axis=1), 1.0), "classes are independent"


def test_multi_label_with_identical_positive_and_negative_prompts_is_exactly_undecided(backbone, tmp_path):
    template = ("a chest X-ray showing {finding}",)
    prompt_set = _prompt_set(tmp_path, positive=template, negative=template)

    probabilities = _probabilities(Engine(backbone).predict(prompt_set, _samples(backbone, 2)))

    np.testing.assert_allclose(probabilities, 0.5, atol=1e-6)


def test_multi_class_probabilities_sum_to_one_over_the_classes(backbone, tmp_path):
    prompt_set = _prompt_set(tmp_path, task="multi-class", negative=())

    probabilities = _probabilities(Engine(backbone).predict(prompt_set, _samples(backbone, 4)))

    assert probabilities.shape == (4, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.all((probabilities >= 0.0) & (probabilities <= 1.0))


def test_multi_class_ignores_negative_templates(backbone, tmp_path):
    with_negative = _prompt_set(tmp_path / "a", task="multi-class")
    without = _prompt_set(tmp_path / "b", task="multi-class", negative=())
    engine, samples = Engine(backbone), _samples(backbone, 2)

    np.testing.assert_allclose(
        _probabilities(engine.predict(with_negative, samples)),
        _probabilities(engine.predict(without, samples)),
        atol=1e-6,
    )


def test_multi_class_with_indistinguishable_classes_splits_evenly(backbone, tmp_path):
    prompt_set = _prompt_set(tmp_path, task="multi-class", classes=("effusion",) * 4, negative=())

    probabilities = _probabilities(Engine(backbone).predict(prompt_set, _samples(backbone, 2)))

    np.testing.assert_allclose(probabilities, 0.25, atol=1e-6)


def test_batching_over_max_batch_gives_the_same_results_as_one_batch(backbone, cxr):
    samples = _samples(backbone, 7)

    one_batch = Engine(backbone, max_batch=16).predict(cxr, samples)
    small_batches = Engine(backbone, max_batch=3).predict(cxr, samples)

    assert [p.sop_instance_uid for p in small_batches] == [p.sop_instance_uid for p in one_batch]
    np.testing.assert_allclose(_probabilities(small_batches), _probabilities(one_batch), atol=1e-5)


def test_predict_of_no_samples_is_an_empty_list(backbone, cxr):
    assert Engine(backbone).predict(cxr, []) == []


def test_prompt_set_made_for_another_architecture_is_refused(backbone, tmp_path):
    prompt_set = _prompt_set(tmp_path, backbone={"architecture": "ViT-B-16"})
    engine = CountingEngine(backbone)

    with pytest.raises(EngineError, match="made for ViT-B-16, the node runs tinyclip"):
        engine.predict(prompt_set, _samples(backbone, 1))
    assert engine.encoded_texts == 0


def test_prompt_set_trained_on_other_weights_is_refused(backbone, tmp_path):
    prompt_set = _prompt_set(tmp_path, backbone={"architecture": "tinyclip", "sha256": "ab" * 32})

    with pytest.raises(EngineError, match=f"backbone sha256 {'ab' * 32}, the node runs random DEMO weights"):
        Engine(backbone).text_features(prompt_set)


def test_prompt_set_for_the_running_backbone_and_checkpoint_is_accepted(tiny_architecture, tmp_path):
    checkpoint = tmp_path / "tiny.pt"
    seeded = ModelConfig(architecture="tinyclip", architecture_config=tiny_architecture, seed=3, device="cpu")
    torch.save(load_backbone(seeded).model.state_dict(), checkpoint)
    clinical = load_backbone(seeded.model_copy(update={"checkpoint": checkpoint}))
    prompt_set = _prompt_set(tmp_path, backbone={"architecture": "tinyclip", "sha256": clinical.sha256})

    assert len(Engine(clinical).predict(prompt_set, _samples(clinical, 1))) == 1


def test_identity_marks_a_demo_backbone_and_names_prompt_set_and_backbone(backbone, cxr):
    identity = Engine(backbone, algorithm_name="dicomnode").identity(cxr)

    assert identity.demo is True
    assert identity.algorithm_name == "dicomnode cxr zeroshot DEMO"
    assert identity.algorithm_version.startswith(f"{cxr.version}+node")
    assert (identity.prompt_set, identity.prompt_set_sha256) == ("cxr", cxr.sha256)
    assert (identity.backbone, identity.backbone_sha256) == ("tinyclip", None)
    # The seed is the DEMO weights' identity: results of another seed get other UIDs.
    assert identity.backbone_seed == backbone.seed
    assert f"DEMO seed {backbone.seed}" in identity.parameters


def test_identity_of_a_checkpointed_backbone_records_its_sha256_and_no_demo(tiny_architecture, cxr, tmp_path):
    config = ModelConfig(architecture="tinyclip", architecture_config=tiny_architecture, device="cpu")
    checkpoint = tmp_path / "tiny.pt"
    torch.save(load_backbone(config).model.state_dict(), checkpoint)
    clinical = load_backbone(config.model_copy(update={"checkpoint": checkpoint}))

    identity = Engine(clinical).identity(cxr)

    assert identity.demo is False
    assert "DEMO" not in identity.algorithm_name
    assert (identity.backbone_sha256, identity.backbone_seed) == (clinical.sha256, None)
    assert clinical.sha256 in identity.parameters
