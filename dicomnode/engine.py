"""Inference: Samples in, Predictions out, on a frozen backbone with a prompt set's text.

The engine knows nothing of DICOM. Text features of a prompt set are computed once and
cached by the set's sha256 (a changed folder is a new key). Images run in batches under
`inference_mode`, with bf16 autocast on CUDA.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dicomnode.flow import InputSpec, ModelIdentity, Prediction, Sample
from dicomnode.model.backbone import Backbone
from dicomnode.model.promptset import PromptSet

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """A prompt set cannot run on this backbone; the message says which and why."""


class Engine:
    """Zero-shot CLIP classification with per-prompt-set cached text features."""

    def __init__(self, backbone: Backbone, max_batch: int = 16, algorithm_name: str = "dicomnode") -> None:
        self.backbone = backbone
        self.max_batch = max_batch
        self.algorithm_name = algorithm_name
        self._text_cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    @property
    def input_spec(self) -> InputSpec:
        """What imaging must produce for this backbone."""
        return self.backbone.input_spec

    def identity(self, prompt_set: PromptSet) -> ModelIdentity:
        """Who produced a result: written into every SR and SC."""
        from dicomnode import __version__

        demo = self.backbone.demo
        name = f"{self.algorithm_name} {prompt_set.name} {prompt_set.method}"
        return ModelIdentity(
            algorithm_name=name + (" DEMO" if demo else ""),
            algorithm_version=f"{prompt_set.version}+node{__version__}",
            prompt_set=prompt_set.name,
            prompt_set_sha256=prompt_set.sha256,
            backbone=self.backbone.architecture,
            backbone_sha256=self.backbone.sha256,
            demo=demo,
        )

    def _check_compatible(self, prompt_set: PromptSet) -> None:
        arch, sha = prompt_set.backbone_architecture, prompt_set.backbone_sha256
        if arch is not None and arch != self.backbone.architecture:
            raise EngineError(
                f"prompt set {prompt_set.name} was made for {arch}, "
                f"the node runs {self.backbone.architecture}"
            )
        if sha is not None and sha != self.backbone.sha256:
            raise EngineError(
                f"prompt set {prompt_set.name} was trained on backbone sha256 {sha}, "
                f"the node runs {self.backbone.sha256 or 'random DEMO weights'}"
            )

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.backbone.tokenizer(texts).to(self.backbone.device)
        return F.normalize(self.backbone.model.encode_text(tokens).float(), dim=-1)

    def _class_features(self, templates: Sequence[str], class_texts: Sequence[str]) -> torch.Tensor:
        """One unit vector per class: the mean over templates, as in CLIP's prompt ensembling."""
        per_class = []
        for text in class_texts:
            encoded = self._encode_texts([t.format(finding=text) for t in templates])
            per_class.append(F.normalize(encoded.mean(dim=0), dim=-1))
        return torch.stack(per_class)

    def text_features(self, prompt_set: PromptSet) -> torch.Tensor:
        """(classes, 2 or 1, dim): positive (and negative) text features, cached per sha256."""
        with self._lock:
            cached = self._text_cache.get(prompt_set.sha256)
            if cached is not None:
                return cached
            self._check_compatible(prompt_set)
            with torch.inference_mode():
                parts = [self._class_features(prompt_set.positive_templates, prompt_set.class_texts)]
                if prompt_set.negative_templates:
                    parts.append(self._class_features(prompt_set.negative_templates, prompt_set.class_texts))
                features = torch.stack(parts, dim=1)
            self._text_cache[prompt_set.sha256] = features
            log.info(
                "text features of prompt set %s computed (%d classes)",
                prompt_set.name,
                len(features),
            )
            return features

    def _encode_images(self, pixels: np.ndarray) -> torch.Tensor:
        device = self.backbone.device
        batch = torch.from_numpy(pixels).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            features = self.backbone.model.encode_image(batch)
        return F.normalize(features.float(), dim=-1)

    def predict(self, prompt_set: PromptSet, samples: Sequence[Sample]) -> list[Prediction]:
        """Per-class probabilities for each sample.

        Multi-label: for each class, a two-way softmax between its positive and negative
        prompts. Multi-class: a softmax over the classes' positive prompts.
        """
        text = self.text_features(prompt_set)
        scale = self.backbone.model.logit_scale.exp().float()
        predictions: list[Prediction] = []
        with torch.inference_mode():
            for start in range(0, len(samples), self.max_batch):
                chunk = samples[start : start + self.max_batch]
                images = self._encode_images(np.stack([s.pixels for s in chunk]).astype(np.float32))
                logits = scale * torch.einsum("bd,ckd->bck", images, text)
                if prompt_set.task == "multi-label":
                    probabilities = logits.softmax(dim=-1)[..., 0]
                else:
                    probabilities = logits[..., 0].softmax(dim=-1)
                for sample, row in zip(chunk, probabilities.cpu().tolist(), strict=True):
                    predictions.append(Prediction(sample.sop_instance_uid, tuple(float(p) for p in row)))
        return predictions
