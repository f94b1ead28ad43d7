"""Learned prompts (VPT, DPT, linear probe) on the tiny seeded backbone: shapes, semantics, storage.

The prompted passes are checked against open_clip's own towers, the methods against the
properties METHODS.md gives them, and prompt-set files against the ways they go wrong.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerScale, QuickGELU
from torch import nn

from dicomnode.engine import Engine, EngineError
from dicomnode.flow import Sample
from dicomnode.model.backbone import Backbone
from dicomnode.model.classifier import PLAIN_VISION, build_classifier
from dicomnode.model.promptset import TENSORS_FILE, PromptSetError, load_prompt_set
from dicomnode.model.towers import TextTower, embed_patches, encode_image, servable, serve_block
from dicomnode.model.vpt import CHEST_DEFAULT, VisualPrompts
from tests.conftest import tiny_backbone
from tests.prompt_sets import DPT, VPT_DEEP, VPT_SHALLOW, spec, write_prompt_set


@pytest.fixture(scope="module")
def backbone(tiny_architecture) -> Backbone:
    return tiny_backbone(tiny_architecture)


def _pixels(backbone: Backbone, count: int, seed: int = 0) -> torch.Tensor:
    size = backbone.input_spec.image_size
    return torch.from_numpy(
        np.random.default_rng(seed).standard_normal((count, 3, size, size)).astype(np.float32)
    )


def _samples(backbone: Backbone, count: int, seed: int = 0) -> list[Sample]:
    pixels = _pixels(backbone, count, seed).numpy()
    return [Sample(f"1.2.{seed}.{i + 1}", pixels[i], np.zeros((4, 4), np.uint8)) for i in range(count)]


# -- the prompted towers ---------------------------------------------------------------------


def test_the_prompted_image_pass_without_prompts_is_open_clips_own(backbone):
    pixels = _pixels(backbone, 3)
    visual = backbone.model.visual
    # With gradients (training) every block runs its own forward: bit for bit open_clip's pass.
    assert torch.equal(encode_image(visual, pixels), backbone.model.encode_image(pixels))
    # Serving runs the same arithmetic through the fused blocks.
    assert all(servable(block) for block in visual.transformer.resblocks)
    with torch.no_grad():
        torch.testing.assert_close(
            encode_image(visual, pixels), backbone.model.encode_image(pixels), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("activation", [nn.GELU(), nn.GELU(approximate="tanh"), QuickGELU()])
def test_a_served_block_computes_what_the_block_computes(backbone, activation):
    block = copy.deepcopy(backbone.model.visual.transformer.resblocks[0])
    block.mlp.gelu = activation
    with torch.random.fork_rng():
        torch.manual_seed(3)
        x = torch.randn(4, 11, block.attn.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(serve_block(block, x), block(x), rtol=1e-5, atol=1e-5)


def test_patches_are_embedded_as_the_patch_convolution_embeds_them(backbone):
    conv = backbone.model.visual.conv1
    pixels = _pixels(backbone, 3)
    with torch.no_grad():
        reference = conv(pixels).flatten(2).transpose(1, 2)
        torch.testing.assert_close(embed_patches(conv, pixels), reference, rtol=1e-5, atol=1e-5)
        overlapping = nn.Conv2d(
            3, conv.out_channels, conv.kernel_size, stride=conv.stride[0] // 2, bias=False
        )
        reference = overlapping(pixels).flatten(2).transpose(1, 2)
        torch.testing.assert_close(embed_patches(overlapping, pixels), reference)


def test_blocks_the_served_pass_does_not_know_run_their_own_forward(backbone):
    visual = copy.deepcopy(backbone.model.visual)
    block = visual.transformer.resblocks[0]
    block.ls_1 = LayerScale(block.attn.embed_dim, 0.5)
    assert not servable(block)
    pixels = _pixels(backbone, 2)
    with torch.no_grad():
        torch.testing.assert_close(encode_image(visual, pixels), visual(pixels), rtol=1e-5, atol=1e-5)


def test_the_embedded_text_pass_is_open_clips_own(backbone):
    tokens = backbone.tokenizer(["a chest X-ray showing effusion", "no finding"])
    tower = TextTower.of(backbone.model)
    with torch.no_grad():
        assert torch.equal(
            tower.encode_embedded(tower.token_embedding(tokens), tokens), backbone.model.encode_text(tokens)
        )


def test_shallow_token_prompts_change_the_embedding_and_are_not_pooled(backbone):
    visual = backbone.model.visual
    pixels = _pixels(backbone, 2)
    prompts = torch.randn(1, 4, visual.class_embedding.shape[0])
    with torch.no_grad():
        plain = encode_image(visual, pixels)
        prompted = encode_image(visual, pixels, token_prompts=prompts)
    assert prompted.shape == plain.shape
    assert not torch.allclose(prompted, plain)


def test_deep_prompts_replace_the_previous_layers_prompt_outputs(backbone):
    """Deep VPT as the reference code does it, written out by hand on the tiny two-block tower:
    prompts after the class token without positional embedding, and before the second block
    the first block's prompt outputs are replaced by the second layer's prompts."""
    visual = backbone.model.visual
    pixels = _pixels(backbone, 2)
    width = visual.class_embedding.shape[0]
    prompts = torch.randn(2, 4, width)
    with torch.no_grad():
        got = encode_image(visual, pixels, token_prompts=prompts)
        patches = visual.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), patches], dim=1) + visual.positional_embedding
        x = torch.cat([x[:, :1], prompts[0].expand(2, -1, -1), x[:, 1:]], dim=1)
        x = visual.transformer.resblocks[0](visual.ln_pre(x))
        x = torch.cat([x[:, :1], prompts[1].expand(2, -1, -1), x[:, 5:]], dim=1)
        x = visual.transformer.resblocks[1](x)
        expected = visual.ln_post(x[:, 0]) @ visual.proj
        moved = prompts.clone()
        moved[1] = torch.randn(4, width)
        other = encode_image(visual, pixels, token_prompts=moved)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, other, atol=1e-4), "the second layer's own prompt enters that layer"


def test_class_shift_of_zero_is_the_frozen_tower(backbone):
    visual = backbone.model.visual
    pixels = _pixels(backbone, 2)
    shift = torch.zeros(len(visual.transformer.resblocks), visual.class_embedding.shape[0])
    # Not a constant: the layer norms would remove a shift equal on every channel.
    learned = torch.randn(shift.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(encode_image(visual, pixels, class_shift=shift), encode_image(visual, pixels))
        assert not torch.allclose(
            encode_image(visual, pixels, class_shift=learned), encode_image(visual, pixels), atol=1e-3
        )


# -- methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "section"),
    [("zeroshot", None), ("linear-probe", None), ("vpt", VPT_SHALLOW), ("vpt", VPT_DEEP), ("dpt", DPT)],
)
@pytest.mark.parametrize("task", ["multi-label", "multi-class"])
def test_every_method_gives_one_probability_per_class_with_the_tasks_semantics(
    backbone, tmp_path, method, section, task
):
    prompt_set = write_prompt_set(
        tmp_path / "s", spec("s", method, backbone, task=task, section=section), backbone
    )
    engine = Engine(backbone)

    predictions = engine.predict(prompt_set, _samples(backbone, 5))

    probabilities = np.array([p.probabilities for p in predictions])
    assert probabilities.shape == (5, 3)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    if task == "multi-class":
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    else:
        assert not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)
    engine.stop()


def test_learned_methods_differ_from_zero_shot_once_trained(backbone, tmp_path):
    engine = Engine(backbone)
    samples = _samples(backbone, 4)
    zero = engine.predict(
        write_prompt_set(tmp_path / "z", spec("z", "zeroshot", backbone), backbone), samples
    )
    for name, method, section in (("v", "vpt", VPT_DEEP), ("d", "dpt", DPT), ("p", "linear-probe", None)):
        learned = write_prompt_set(tmp_path / name, spec(name, method, backbone, section=section), backbone)
        got = engine.predict(learned, samples)
        assert not np.allclose([p.probabilities for p in got], [p.probabilities for p in zero], atol=1e-4), (
            method
        )
    engine.stop()


@pytest.mark.parametrize("task", ["multi-label", "multi-class"])
def test_untrained_dpt_gives_exactly_the_zero_shot_probabilities(backbone, tmp_path, task):
    engine = Engine(backbone)
    samples = _samples(backbone, 6)
    zero = write_prompt_set(tmp_path / "z", spec("z", "zeroshot", backbone, task=task), backbone)
    dpt = write_prompt_set(
        tmp_path / "d", spec("d", "dpt", backbone, task=task, section=DPT), backbone, trained=False
    )

    expected = [p.probabilities for p in engine.predict(zero, samples)]
    got = [p.probabilities for p in engine.predict(dpt, samples)]

    assert np.allclose(got, expected, atol=1e-6)
    assert engine.classifier(dpt).vision_key == PLAIN_VISION, (
        "a zero vision prompt shares the frozen features"
    )
    engine.stop()


def test_untrained_linear_probe_gives_exactly_the_zero_shot_probabilities(backbone, tmp_path):
    engine = Engine(backbone)
    samples = _samples(backbone, 6)
    zero = write_prompt_set(tmp_path / "z", spec("z", "zeroshot", backbone), backbone)
    probe = write_prompt_set(tmp_path / "p", spec("p", "linear-probe", backbone), backbone, trained=False)

    expected = [p.probabilities for p in engine.predict(zero, samples)]
    assert np.allclose([p.probabilities for p in engine.predict(probe, samples)], expected, atol=1e-5)
    engine.stop()


def test_a_prompted_pass_and_its_backward_never_write_a_backbone_tensor(backbone, tmp_path):
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    prompt_set = write_prompt_set(tmp_path / "v", spec("v", "vpt", backbone, section=VPT_DEEP), backbone)
    classifier = build_classifier(backbone, prompt_set)
    classifier.train()

    classifier(_pixels(backbone, 2)).sum().backward()

    assert all(not p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training, "training the prompts leaves the backbone in eval mode"
    assert classifier.visual_prompts.tokens.grad is not None
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_pixel_prompts_only_touch_their_placement(backbone):
    from dicomnode.model.promptset import VptSpec
    from dicomnode.model.towers import vision_shape

    shape = vision_shape(backbone.model)
    size = shape.image_size
    for pixel, outside in (
        ({"placement": "border", "size": 8}, (slice(8, size - 8), slice(8, size - 8))),
        ({"placement": "corner", "size": 8}, (slice(8, None), slice(None))),
        (
            {"placement": "regions", "regions": {"left": [0.0, 0.0, 0.5, 0.5]}, "grids": [4, 2]},
            (slice(32, None), slice(None)),
        ),
    ):
        prompts = VisualPrompts(VptSpec.model_validate({"pixel": pixel}), shape, patch_size=16)
        with torch.no_grad():
            for tensor in prompts.pixel.values():
                tensor.fill_(1.0)
        canvas = prompts.pixel_prompt()
        assert canvas.shape == (3, size, size)
        assert canvas.abs().sum() > 0, pixel["placement"]
        assert canvas[:, outside[0], outside[1]].abs().sum() == 0, pixel["placement"]


def test_the_default_chest_vpt_for_vit_b16_stays_near_the_seeds_parameter_budget():
    """METHODS.md: VPT trains about 0.08M parameters on ViT-B/16 (width 768, 12 layers, 512-d)."""
    from dicomnode.model.promptset import VptSpec
    from dicomnode.model.towers import VisionShape

    section = CHEST_DEFAULT
    prompts = VisualPrompts(VptSpec.model_validate(section), VisionShape(768, 12, 224, 512), patch_size=16)
    head = 512 * 14 + 14
    total = sum(t.numel() for t in prompts.named_tensors().values()) + head
    assert 60_000 <= total <= 100_000, total


# -- storage ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "section"), [("vpt", VPT_DEEP), ("dpt", DPT), ("linear-probe", None)])
def test_a_saved_and_reloaded_set_gives_identical_outputs(backbone, tmp_path, method, section):
    prompt_set = write_prompt_set(tmp_path / "s", spec("s", method, backbone, section=section), backbone)
    again = load_prompt_set(tmp_path / "s")
    pixels = _pixels(backbone, 3)

    with torch.no_grad():
        first = build_classifier(backbone, prompt_set)(pixels)
        second = build_classifier(backbone, again)(pixels)

    assert again.sha256 == prompt_set.sha256
    assert torch.equal(first, second)


def test_the_hash_is_of_the_very_bytes_that_were_loaded(backbone, tmp_path):
    prompt_set = write_prompt_set(tmp_path / "s", spec("s", "dpt", backbone, section=DPT), backbone)
    import hashlib

    digest = hashlib.sha256()
    for name in ("promptset.yaml", TENSORS_FILE):
        digest.update(name.encode())
        digest.update((tmp_path / "s" / name).read_bytes())
    assert prompt_set.sha256 == digest.hexdigest()
    assert set(prompt_set.tensors) == {
        "dpt.context.positive",
        "dpt.context.negative",
        "dpt.gate.positive",
        "dpt.gate.negative",
        "dpt.vision.class_shift",
    }


def test_a_corrupted_tensors_file_is_refused_naming_it(backbone, tmp_path):
    write_prompt_set(tmp_path / "s", spec("s", "vpt", backbone, section=VPT_SHALLOW), backbone)
    path = tmp_path / "s" / TENSORS_FILE
    path.write_bytes(path.read_bytes()[:-40])

    with pytest.raises(PromptSetError) as raised:
        load_prompt_set(tmp_path / "s")
    assert f"{path}: not a readable safetensors file" in str(raised.value)


def test_tensors_of_the_wrong_shape_are_refused_naming_tensor_and_shapes(backbone, tmp_path):
    content = spec("s", "vpt", backbone, section=VPT_SHALLOW)
    write_prompt_set(tmp_path / "s", content, backbone)
    content["vpt"] = {"tokens": {"count": 6, "depth": "shallow"}}  # the yaml now promises 6 tokens
    (tmp_path / "s" / "promptset.yaml").write_text(__import__("yaml").safe_dump(content))

    with pytest.raises(PromptSetError) as raised:
        Engine(backbone).classifier(load_prompt_set(tmp_path / "s"))
    message = str(raised.value)
    assert "tensor vpt.tokens has shape (1, 4, 64)" in message
    assert "need (1, 6, 64)" in message


def test_tensors_of_another_method_are_refused_naming_them(backbone, tmp_path):
    write_prompt_set(tmp_path / "s", spec("s", "dpt", backbone, section=DPT), backbone)
    content = spec("s", "vpt", backbone, section=VPT_SHALLOW)
    (tmp_path / "s" / "promptset.yaml").write_text(__import__("yaml").safe_dump(content))

    with pytest.raises(
        PromptSetError, match=r"missing head\.bias, head\.weight, vpt\.tokens; unexpected dpt\.context"
    ):
        Engine(backbone).classifier(load_prompt_set(tmp_path / "s"))


def test_a_set_learned_on_other_demo_weights_is_refused(backbone, tiny_architecture, tmp_path):
    prompt_set = write_prompt_set(tmp_path / "s", spec("s", "dpt", backbone, section=DPT), backbone)
    other = tiny_backbone(tiny_architecture, seed=8)

    with pytest.raises(
        EngineError,
        match=r"trained on random DEMO weights \(seed 7\), the node runs random DEMO weights \(seed 8\)",
    ):
        Engine(other).classifier(prompt_set)


def test_a_set_learned_for_another_architecture_is_refused(backbone, tmp_path):
    content = spec("s", "dpt", backbone, section=DPT)
    prompt_set = write_prompt_set(tmp_path / "s", content, backbone)
    content["backbone"]["architecture"] = "ViT-B-16"
    (tmp_path / "s" / "promptset.yaml").write_text(__import__("yaml").safe_dump(content))

    with pytest.raises(EngineError, match="was made for ViT-B-16, the node runs tinyclip"):
        Engine(backbone).classifier(load_prompt_set(tmp_path / "s"))
    assert prompt_set.backbone_seed == 7


def test_dpt_text_features_follow_the_gate(backbone, tmp_path):
    prompt_set = write_prompt_set(
        tmp_path / "d", spec("d", "dpt", backbone, section=DPT), backbone, trained=False
    )
    classifier = build_classifier(backbone, prompt_set)
    with torch.no_grad():
        assert torch.allclose(classifier.text_features(), classifier.zero_shot, atol=1e-6)
        classifier.dual_prompts.gate["positive"].fill_(1.0)
        classifier.train(False)  # drops the cached features
        moved = classifier.text_features()
    assert not torch.allclose(moved[:, 0], classifier.zero_shot[:, 0], atol=1e-3)
    assert torch.allclose(moved[:, 1], classifier.zero_shot[:, 1], atol=1e-6), "the negative gate is still 0"
    assert torch.allclose(moved.norm(dim=-1), torch.ones(3, 2), atol=1e-5)
    assert F.cosine_similarity(moved[:, 0], classifier.zero_shot[:, 0], dim=-1).min() < 0.9999
