"""One prompt set on one frozen backbone: pixels in, per-class logits out.

`build_classifier` turns a loaded `PromptSet` into a `PromptedClassifier` for every method
(zero-shot, linear probe, VPT, DPT), checking that its learned tensors have the names and
shapes that promptset.yaml and this backbone call for. The same module serves in the engine
and learns in training: only the prompt (and head) parameters require gradients; the
backbone is held by reference, frozen, and never written.

Scores follow the set's task. Multi-label: per class a logit whose sigmoid is the two-way
softmax between the positive and the negative prompt. Multi-class: a softmax over classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_tensors
from torch import nn

from dicomnode.durable import write_durably
from dicomnode.model.backbone import Backbone
from dicomnode.model.dpt import DualPrompts
from dicomnode.model.promptset import TENSORS_FILE, PromptSet, PromptSetError
from dicomnode.model.towers import TextTower, TowerError, encode_image, vision_shape
from dicomnode.model.vpt import VisualPrompts

HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
#: Image features of the frozen tower, shared by every set that leaves the tower untouched.
PLAIN_VISION = "plain"


def encode_texts(backbone: Backbone, texts: list[str]) -> torch.Tensor:
    """Normalised embeddings of `texts` from the frozen text tower."""
    tokens = backbone.tokenizer(texts).to(backbone.device)
    return F.normalize(backbone.model.encode_text(tokens).float(), dim=-1)


def zero_shot_features(backbone: Backbone, prompt_set: PromptSet, encode=encode_texts) -> torch.Tensor:
    """(classes, 2 or 1, dim): per class the normalised mean over templates (CLIP ensembling),
    for the positive templates and, when the set has them, the negative ones."""
    parts = []
    for templates in (prompt_set.positive_templates, prompt_set.negative_templates):
        if not templates:
            continue
        per_class = [
            F.normalize(encode(backbone, [t.format(finding=text) for t in templates]).mean(dim=0), dim=-1)
            for text in prompt_set.class_texts
        ]
        parts.append(torch.stack(per_class))
    return torch.stack(parts, dim=1)


def text_logits(features: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, task: str) -> torch.Tensor:
    """Logits of normalised image features against (classes, polarities, dim) text features."""
    similarity = scale * torch.einsum("bd,ckd->bck", features, text)
    if task == "multi-label":
        return similarity[..., 0] - similarity[..., 1]
    return similarity[..., 0]


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Per-class probabilities from logits: sigmoid for multi-label, softmax for multi-class."""
    return torch.sigmoid(logits) if task == "multi-label" else logits.softmax(dim=-1)


class PromptedClassifier(nn.Module):
    """A prompt set bound to a backbone. `vision_key` names the image features it needs:
    `PLAIN_VISION` when the frozen tower's own features serve, else the set's sha256."""

    def __init__(self, backbone: Backbone, prompt_set: PromptSet, zero_shot: torch.Tensor) -> None:
        super().__init__()
        # The backbone is not a submodule: its weights are not ours to save, train or move.
        self._backbone = backbone
        self.prompt_set = prompt_set
        self.task = prompt_set.task
        self.register_buffer("zero_shot", zero_shot, persistent=False)
        self.register_buffer("scale", backbone.model.logit_scale.detach().exp().float(), persistent=False)
        self.head: nn.Linear | None = None
        self.visual_prompts: VisualPrompts | None = None
        self.dual_prompts: DualPrompts | None = None
        self._text_cache: torch.Tensor | None = None

    @property
    def vision_key(self) -> str:
        if self.visual_prompts is not None:
            return self.prompt_set.sha256
        if self.dual_prompts is not None and self.dual_prompts.changes_image_tower:
            return self.prompt_set.sha256
        return PLAIN_VISION

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every learned tensor by its name in prompts.safetensors."""
        named: dict[str, torch.Tensor] = {}
        if self.visual_prompts is not None:
            named.update(self.visual_prompts.named_tensors())
        if self.dual_prompts is not None:
            named.update(self.dual_prompts.named_tensors())
        if self.head is not None:
            named[HEAD_WEIGHT], named[HEAD_BIAS] = self.head.weight, self.head.bias
        return named

    def trainable_parameters(self) -> int:
        """How many numbers this set learns (the backbone's are not counted: they never change)."""
        return sum(t.numel() for t in self.named_tensors().values())

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised image features, with this set's vision prompts if it has any."""
        visual = self._backbone.model.visual
        if self.visual_prompts is not None:
            features = self.visual_prompts.image_features(visual, pixels)
        elif self.dual_prompts is not None and (self.training or self.dual_prompts.changes_image_tower):
            # Learning always takes the prompted pass: a zero vision prompt still has a gradient.
            features = self.dual_prompts.image_features(visual, pixels)
        else:
            features = encode_image(visual, pixels)
        return F.normalize(features.float(), dim=-1)

    def text_features(self) -> torch.Tensor:
        """(classes, polarities, dim) text features; computed once when nothing learns."""
        if self.dual_prompts is None:
            return self.zero_shot
        if self.training or self._text_cache is None:
            features = self.dual_prompts.text_features(
                TextTower.of(self._backbone.model),
                self._backbone.tokenizer,
                self.prompt_set.class_texts,
                self.zero_shot,
            )
            if self.training:
                return features
            self._text_cache = features.detach()
        return self._text_cache

    def train(self, mode: bool = True) -> PromptedClassifier:
        """Training mode for the prompts only; the frozen backbone stays in eval mode."""
        super().train(mode)
        self._text_cache = None
        return self

    def logits(self, features: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Per-class logits of normalised image features (against `text`, else this set's text
        features), in fp32 even under autocast: the probabilities are compared with calibrated
        thresholds and must not be bf16-rounded."""
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            if self.head is not None:
                return self.head(features)
            text = self.text_features() if text is None else text
            return text_logits(features, text.float(), self.scale, self.task)

    def forward(self, pixels: torch.Tensor, with_features: bool = False):
        """Per-class logits of a batch of normalised images (B, 3, S, S).

        With `with_features`, also the image features and the text features (None for a head)
        the logits came from, for losses that need them (training goes through forward, so
        that distributed training sees every use of the prompts).
        """
        image = self.image_features(pixels)
        # Once per step: while learning, text features are a pass through the text tower.
        text = None if self.head is not None else self.text_features()
        logits = self.logits(image, text)
        return (logits, image, text) if with_features else logits

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """Per-class probabilities of normalised image features, as the results need them."""
        return probabilities(self.logits(features), self.task)


def zero_shot_head(zero_shot: torch.Tensor, scale: torch.Tensor, task: str) -> nn.Linear:
    """A linear head that computes exactly the zero-shot logits: the probe's starting point."""
    weight = zero_shot[:, 0] - zero_shot[:, 1] if task == "multi-label" else zero_shot[:, 0]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(scale * weight)
        head.bias.zero_()
    return head.to(zero_shot.device)


def build_classifier(
    backbone: Backbone,
    prompt_set: PromptSet,
    *,
    initialise: bool = False,
    seed: int = 0,
    zero_shot: torch.Tensor | None = None,
) -> PromptedClassifier:
    """The classifier of `prompt_set` on `backbone`, with its learned tensors loaded.

    With `initialise`, a learned method starts from fresh prompts (for training) instead of
    the set's tensors. Raises PromptSetError naming the tensor, its shape and the expected one.
    """
    if zero_shot is None:
        with torch.no_grad():
            zero_shot = zero_shot_features(backbone, prompt_set)
    classifier = PromptedClassifier(backbone, prompt_set, zero_shot)
    method = prompt_set.method
    try:
        shape = vision_shape(backbone.model) if method in ("vpt", "dpt") else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if method == "vpt":
                patch = backbone.model.visual.patch_size
                classifier.visual_prompts = VisualPrompts(prompt_set.vpt, shape, int(patch[0]))
            if method == "dpt":
                polarities = ("positive", "negative") if prompt_set.task == "multi-label" else ("positive",)
                text_width = TextTower.of(backbone.model).width
                classifier.dual_prompts = DualPrompts(
                    prompt_set.dpt, shape, text_width, len(prompt_set.class_texts), polarities
                )
    except (TowerError, ValueError) as exc:
        raise PromptSetError(
            f"{prompt_set.folder}: method {method!r} on {backbone.architecture}: {exc}"
        ) from None
    if method in ("vpt", "linear-probe"):
        classifier.head = zero_shot_head(zero_shot, classifier.scale, prompt_set.task)
    classifier.to(backbone.device)
    if not initialise:
        _load(classifier, prompt_set.tensors, prompt_set)
    classifier.eval()
    return classifier


def _load(classifier: PromptedClassifier, tensors: dict[str, torch.Tensor], prompt_set: PromptSet) -> None:
    """Copy the stored tensors into the classifier, refusing any missing, extra or misshapen one."""
    where = prompt_set.folder / TENSORS_FILE
    expected = classifier.named_tensors()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        said = []
        if missing:
            said.append(f"missing {', '.join(missing)}")
        if extra:
            said.append(f"unexpected {', '.join(extra)}")
        raise PromptSetError(
            f"{where}: tensors do not match method {prompt_set.method!r} as promptset.yaml "
            f"describes it on {classifier._backbone.architecture}: {'; '.join(said)}"
        )
    with torch.no_grad():
        for name, target in expected.items():
            stored = tensors[name]
            if tuple(stored.shape) != tuple(target.shape):
                raise PromptSetError(
                    f"{where}: tensor {name} has shape {tuple(stored.shape)}, but promptset.yaml and "
                    f"backbone {classifier._backbone.architecture} need {tuple(target.shape)}"
                )
            if not torch.isfinite(stored).all():
                raise PromptSetError(f"{where}: tensor {name} holds NaN or infinite values")
            target.copy_(stored.to(target.dtype))


def describe(classifiers: Sequence[PromptedClassifier]) -> list[str]:
    """One line per classifier: name, version, method and learned parameter count."""
    return [
        f"{c.prompt_set.name} {c.prompt_set.version}: {c.prompt_set.method}, "
        f"{c.trainable_parameters():,} learned parameters"
        for c in classifiers
    ]


def save_prompts(classifier: PromptedClassifier, folder: Path) -> Path:
    """Write the classifier's learned tensors as `folder/prompts.safetensors`, atomically."""
    data = save_tensors(
        {
            name: tensor.detach().float().cpu().contiguous()
            for name, tensor in classifier.named_tensors().items()
        }
    )
    return write_durably(Path(folder) / TENSORS_FILE, lambda handle: handle.write(data))
