"""The model room: a frozen backbone built only from local files, and validated prompt sets.

The backbone is the tiny architecture of conftest.py (seeded random weights); checkpoints are
written by the tests themselves from models of the same or of another architecture, so
nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import save_file

from dicomnode.config import ModelConfig
from dicomnode.model.backbone import Backbone, BackboneError, load_backbone
from dicomnode.model.promptset import (
    PROMPTSET_FILE,
    TENSORS_FILE,
    PromptSetError,
    folder_sha256,
    load_prompt_set,
)
from tests.conftest import REPO, TINY_ARCHITECTURE

CXR = REPO / "prompts" / "cxr"


def _config(architecture: Path, **fields) -> ModelConfig:
    return ModelConfig(
        architecture=architecture.stem, architecture_config=architecture, device="cpu", **fields
    )


def _weights(backbone: Backbone) -> dict[str, torch.Tensor]:
    return backbone.model.state_dict()


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def other_architecture(tmp_path_factory) -> Path:
    """A second tiny architecture with other widths: its checkpoints cannot fit the first."""
    path = tmp_path_factory.mktemp("arch") / "tinyclip_other.json"
    path.write_text(json.dumps({**TINY_ARCHITECTURE, "embed_dim": 16}))
    return path


@pytest.fixture(scope="module")
def checkpoint_weights(tiny_architecture) -> dict[str, torch.Tensor]:
    """Weights of the tiny architecture built with another seed than the tests' default."""
    return {k: v.clone() for k, v in _weights(load_backbone(_config(tiny_architecture, seed=1234))).items()}


# -- backbone ------------------------------------------------------------------------------------


def test_same_seed_builds_the_same_weights_and_another_seed_different_ones(tiny_architecture):
    first = _weights(load_backbone(_config(tiny_architecture, seed=7)))
    again = _weights(load_backbone(_config(tiny_architecture, seed=7)))
    other = _weights(load_backbone(_config(tiny_architecture, seed=8)))

    assert _same_weights(first, again)
    assert not _same_weights(first, other)


def test_building_the_backbone_leaves_the_global_random_state_alone(tiny_architecture):
    torch.manual_seed(99)
    expected = torch.rand(4)
    torch.manual_seed(99)
    load_backbone(_config(tiny_architecture, seed=7))
    assert torch.equal(torch.rand(4), expected)


def test_without_checkpoint_the_backbone_is_a_demo_with_no_sha256(tiny_architecture):
    backbone = load_backbone(_config(tiny_architecture))

    assert backbone.demo is True
    assert backbone.sha256 is None
    assert backbone.architecture == "tinyclip"
    assert backbone.device == torch.device("cpu")


def test_backbone_is_frozen_and_in_eval_mode(tiny_architecture):
    model = load_backbone(_config(tiny_architecture)).model

    assert all(not p.requires_grad for p in model.parameters())
    assert all(not module.training for module in model.modules())


def test_input_spec_is_the_architectures_image_size_and_channel_statistics(tiny_architecture, tmp_path):
    spec = load_backbone(_config(tiny_architecture)).input_spec
    assert spec.image_size == TINY_ARCHITECTURE["vision_cfg"]["image_size"]
    assert spec.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert spec.std == pytest.approx(open_clip.OPENAI_DATASET_STD)

    small = tmp_path / "tinyclip_32px.json"
    small.write_text(
        json.dumps({**TINY_ARCHITECTURE, "vision_cfg": {**TINY_ARCHITECTURE["vision_cfg"], "image_size": 32}})
    )
    assert load_backbone(_config(small)).input_spec.image_size == 32


def test_torch_checkpoint_replaces_the_weights_and_records_its_sha256(
    tiny_architecture, checkpoint_weights, tmp_path, caplog
):
    path = tmp_path / "tiny.pt"
    torch.save(checkpoint_weights, path)

    with caplog.at_level(logging.INFO):
        backbone = load_backbone(_config(tiny_architecture, seed=7, checkpoint=path))

    said = [record.getMessage() for record in caplog.records]
    assert any(f"loaded from checkpoint sha256 {backbone.sha256}" in line for line in said), said
    assert not any("initialized randomly" in line or "DEMO" in line for line in said), (
        "open_clip's warning of random weights would contradict the checkpoint just loaded"
    )

    assert _same_weights(_weights(backbone), checkpoint_weights)
    assert backbone.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert backbone.demo is False
    assert all(not p.requires_grad for p in backbone.model.parameters())


def test_safetensors_checkpoint_replaces_the_weights_and_records_its_sha256(
    tiny_architecture, checkpoint_weights, tmp_path
):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint_weights.items()}, str(path))

    backbone = load_backbone(_config(tiny_architecture, seed=7, checkpoint=path))

    assert _same_weights(_weights(backbone), checkpoint_weights)
    assert backbone.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_wrapped_in_a_training_state_dict_loads(tiny_architecture, checkpoint_weights, tmp_path):
    path = tmp_path / "epoch_10.pt"
    torch.save({"epoch": 10, "state_dict": {f"module.{k}": v for k, v in checkpoint_weights.items()}}, path)

    backbone = load_backbone(_config(tiny_architecture, checkpoint=path))

    assert _same_weights(_weights(backbone), checkpoint_weights)


def test_checkpoint_of_another_architecture_fails_naming_the_path(
    tiny_architecture, other_architecture, tmp_path
):
    path = tmp_path / "other.pt"
    torch.save(_weights(load_backbone(_config(other_architecture))), path)

    with pytest.raises(BackboneError, match="does not fit architecture tinyclip") as raised:
        load_backbone(_config(tiny_architecture, checkpoint=path))
    assert str(path) in str(raised.value)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("garbage.pt", b"this is not a checkpoint"),
        ("garbage.safetensors", b"x" * 64),
        ("empty.pt", "empty"),
        ("tensor.pt", "tensor"),
    ],
    ids=["not-a-pickle", "not-safetensors", "empty-state-dict", "bare-tensor"],
)
def test_a_file_that_is_not_a_checkpoint_fails_with_backboneerror_naming_the_path(
    tiny_architecture, tmp_path, name, content
):
    path = tmp_path / name
    if content == "empty":
        torch.save({}, path)
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)

    with pytest.raises(BackboneError) as raised:
        load_backbone(_config(tiny_architecture, checkpoint=path))
    assert str(path) in str(raised.value)


def test_a_missing_checkpoint_fails_with_backboneerror_naming_the_path(tiny_architecture, tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(BackboneError, match="cannot be read") as raised:
        load_backbone(_config(tiny_architecture, checkpoint=path))
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("architecture", ["hf-hub:timm/ViT-B-16-SigLIP", "hf-hub:laion/CLIP-ViT-B-32"])
def test_hub_architectures_are_refused_before_anything_is_built(architecture):
    with pytest.raises(BackboneError, match="would download from a hub"):
        load_backbone(ModelConfig(architecture=architecture, device="cpu"))


def test_unknown_architecture_name_is_an_error_naming_it(tiny_architecture):
    with pytest.raises(BackboneError, match="'no-such-clip' is not an open_clip architecture"):
        load_backbone(ModelConfig(architecture="no-such-clip", device="cpu"))
    with pytest.raises(BackboneError, match="is it the stem of tinyclip.json"):
        load_backbone(ModelConfig(architecture="tiny-clip", architecture_config=tiny_architecture))


# -- prompt sets ---------------------------------------------------------------------------------


def _promptset_folder(tmp_path: Path, name: str = "cxr", **changes) -> Path:
    """A copy of the shipped cxr prompt set in `tmp_path/name`, with top-level keys changed."""
    spec = yaml.safe_load((CXR / PROMPTSET_FILE).read_text())
    spec.update({"name": name})
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    folder = tmp_path / name
    folder.mkdir()
    (folder / PROMPTSET_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


def test_shipped_cxr_prompt_set_loads_with_fourteen_coded_classes():
    prompt_set = load_prompt_set(CXR)

    assert (prompt_set.name, prompt_set.domain, prompt_set.method, prompt_set.task) == (
        "cxr",
        "cxr",
        "zeroshot",
        "multi-label",
    )
    assert len(prompt_set.findings) == len(prompt_set.class_texts) == 14
    atelectasis = prompt_set.findings[0]
    assert (atelectasis.name, atelectasis.code.value, atelectasis.code.scheme) == (
        "Atelectasis",
        "46621007",
        "SCT",
    )
    assert len({f.name for f in prompt_set.findings}) == 14
    assert all(f.code.value and f.code.meaning for f in prompt_set.findings)
    assert prompt_set.procedure.value == "399208008"
    assert all(0.0 <= f.threshold <= 1.0 for f in prompt_set.findings)
    assert all("{finding}" in t for t in prompt_set.positive_templates + prompt_set.negative_templates)
    assert prompt_set.negative_templates
    assert prompt_set.sha256 == folder_sha256(CXR)
    assert prompt_set.folder == CXR


def test_invalid_yaml_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "cxr"
    folder.mkdir()
    (folder / PROMPTSET_FILE).write_text("name: cxr\nclasses: [unclosed\n")

    with pytest.raises(PromptSetError, match="not valid YAML") as raised:
        load_prompt_set(folder)
    assert str(folder / PROMPTSET_FILE) in str(raised.value)


def test_missing_folder_is_refused_naming_the_file(tmp_path):
    with pytest.raises(PromptSetError, match="cannot read prompt set") as raised:
        load_prompt_set(tmp_path / "absent")
    assert str(tmp_path / "absent" / PROMPTSET_FILE) in str(raised.value)


def test_empty_file_is_refused_naming_every_missing_key(tmp_path):
    folder = tmp_path / "cxr"
    folder.mkdir()
    (folder / PROMPTSET_FILE).write_text("# nothing yet\n")

    with pytest.raises(PromptSetError) as raised:
        load_prompt_set(folder)
    for key in ("name", "version", "domain", "method", "task", "templates", "classes"):
        assert f"{folder / PROMPTSET_FILE}: {key}: Field required" in str(raised.value)


def test_missing_field_is_refused_naming_file_and_key(tmp_path):
    folder = _promptset_folder(tmp_path, task=None)

    with pytest.raises(PromptSetError) as raised:
        load_prompt_set(folder)
    assert f"{folder / PROMPTSET_FILE}: task: Field required" in str(raised.value)


def test_unknown_key_is_refused_naming_it(tmp_path):
    folder = _promptset_folder(tmp_path, temperature=0.07)

    with pytest.raises(PromptSetError, match="temperature: Extra inputs are not permitted"):
        load_prompt_set(folder)


def test_threshold_outside_zero_to_one_is_refused_naming_the_class_index(tmp_path):
    spec = yaml.safe_load((CXR / PROMPTSET_FILE).read_text())
    classes = spec["classes"]
    classes[2]["threshold"] = 1.5
    folder = _promptset_folder(tmp_path, classes=classes)

    with pytest.raises(PromptSetError, match=r"classes\.2\.threshold"):
        load_prompt_set(folder)


def test_template_without_finding_slot_is_refused_naming_file_and_key(tmp_path):
    templates = {
        "positive": ["a chest X-ray showing {finding}", "a chest X-ray"],
        "negative": ["no {finding}"],
    }
    folder = _promptset_folder(tmp_path, templates=templates)

    with pytest.raises(PromptSetError) as raised:
        load_prompt_set(folder)
    message = str(raised.value)
    assert f"{folder / PROMPTSET_FILE}: templates.positive" in message
    assert "'a chest X-ray' has no {finding} slot" in message


def test_name_differing_from_its_folder_is_refused(tmp_path):
    folder = _promptset_folder(tmp_path, name="cxr")
    renamed = folder.rename(tmp_path / "chest")

    with pytest.raises(PromptSetError, match="name: 'cxr' differs from its folder 'chest'") as raised:
        load_prompt_set(renamed)
    assert str(renamed / PROMPTSET_FILE) in str(raised.value)


@pytest.mark.parametrize("method", ["vpt", "dpt"])
def test_a_learned_method_without_its_section_is_refused_naming_it(tmp_path, method):
    folder = _promptset_folder(tmp_path, method=method, backbone={"architecture": "ViT-B-16", "seed": 0})

    with pytest.raises(PromptSetError) as raised:
        load_prompt_set(folder)
    assert f"{folder / PROMPTSET_FILE}: {method}: method '{method}' needs this section" in str(raised.value)


def test_a_learned_method_without_the_backbone_it_learned_on_is_refused(tmp_path):
    folder = _promptset_folder(tmp_path, method="dpt", dpt={"context_tokens": 4})

    with pytest.raises(PromptSetError, match="backbone: method 'dpt' is learned on one backbone"):
        load_prompt_set(folder)


def test_a_learned_method_without_its_tensors_file_is_refused_naming_it(tmp_path):
    folder = _promptset_folder(
        tmp_path, method="dpt", dpt={"context_tokens": 4}, backbone={"architecture": "ViT-B-16", "seed": 0}
    )

    with pytest.raises(PromptSetError) as raised:
        load_prompt_set(folder)
    assert f"{folder / TENSORS_FILE}: method 'dpt' needs its learned tensors" in str(raised.value)


def test_a_section_of_another_method_is_refused(tmp_path):
    folder = _promptset_folder(tmp_path, vpt={"tokens": {"count": 4}})

    with pytest.raises(PromptSetError, match="vpt: given, but method is 'zeroshot'"):
        load_prompt_set(folder)


def test_unknown_method_is_refused_naming_the_key(tmp_path):
    folder = _promptset_folder(tmp_path, method="coop")

    with pytest.raises(
        PromptSetError, match="method: Input should be 'zeroshot', 'linear-probe', 'vpt' or 'dpt'"
    ):
        load_prompt_set(folder)


def test_multi_label_set_without_negative_templates_is_refused(tmp_path):
    folder = _promptset_folder(tmp_path, templates={"positive": ["a chest X-ray showing {finding}"]})

    with pytest.raises(PromptSetError, match="templates.negative: a multi-label set needs negative"):
        load_prompt_set(folder)


def test_multi_class_set_needs_no_negative_templates(tmp_path):
    folder = _promptset_folder(
        tmp_path, task="multi-class", templates={"positive": ["a chest X-ray showing {finding}"]}
    )

    prompt_set = load_prompt_set(folder)

    assert prompt_set.task == "multi-class"
    assert prompt_set.negative_templates == ()


def test_backbone_reference_is_read_from_the_prompt_set(tmp_path):
    folder = _promptset_folder(tmp_path, backbone={"architecture": "ViT-B-16", "sha256": "ab" * 32})

    prompt_set = load_prompt_set(folder)

    assert (prompt_set.backbone_architecture, prompt_set.backbone_sha256) == ("ViT-B-16", "ab" * 32)
    assert load_prompt_set(CXR).backbone_architecture is None


def test_sha256_changes_when_promptset_yaml_or_its_tensors_change(tmp_path):
    folder = tmp_path / "cxr"
    shutil.copytree(CXR, folder)
    original = load_prompt_set(folder).sha256
    assert original == load_prompt_set(CXR).sha256, "the hash covers content, not location"

    path = folder / PROMPTSET_FILE
    path.write_text(path.read_text() + "# calibrated again\n")
    edited = load_prompt_set(folder).sha256
    assert edited != original

    save_file({"context": torch.zeros(4, 8)}, str(folder / TENSORS_FILE))
    assert load_prompt_set(folder).sha256 not in (original, edited)
