"""The frozen CLIP backbone, built only through open_clip's factory and never downloaded.

A clinical node names a local checkpoint; its sha256 is recorded in every result. Without
one the node builds the architecture with seeded random weights: a DEMO model, said loudly
in the log and in every result.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from dicomnode.config import ModelConfig
from dicomnode.flow import InputSpec

log = logging.getLogger(__name__)

_REMOTE_PREFIXES = ("hf-hub:",)


class BackboneError(RuntimeError):
    """The backbone cannot be built or its checkpoint cannot be loaded; names the cause."""


@dataclass
class Backbone:
    """A frozen open_clip model with its tokenizer and what the imaging stage must produce."""

    model: Any
    tokenizer: Any
    architecture: str
    sha256: str | None
    input_spec: InputSpec
    device: torch.device
    seed: int = 0
    precision: str = "bf16"

    @property
    def autocast(self) -> bool:
        """Whether passes run under bf16 autocast (CUDA with fp32 weights)."""
        return self.device.type == "cuda" and self.precision == "autocast"

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype images are handed to the tower in."""
        return torch.bfloat16 if self.device.type == "cuda" and self.precision == "bf16" else torch.float32

    @property
    def demo(self) -> bool:
        """True when the weights are random: outputs then have no clinical meaning."""
        return self.sha256 is None


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks so multi-GB checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pick_device(wanted: str) -> torch.device:
    """`auto` takes the GPU when there is one; asking for cuda without one is an error."""
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BackboneError("model.device is cuda but no CUDA device is available")
    return torch.device("cuda", torch.cuda.current_device())


def _register_architecture(cfg: ModelConfig) -> None:
    if cfg.architecture.startswith(_REMOTE_PREFIXES):
        raise BackboneError(
            f"model.architecture {cfg.architecture!r} would download from a hub; "
            "give a local architecture_config JSON and checkpoint instead"
        )
    if cfg.architecture_config is not None:
        open_clip.add_model_config(cfg.architecture_config)
    if cfg.architecture not in open_clip.list_models():
        hint = f" (is it the stem of {cfg.architecture_config.name}?)" if cfg.architecture_config else ""
        raise BackboneError(f"model.architecture {cfg.architecture!r} is not an open_clip architecture{hint}")


def _input_spec(model: Any) -> InputSpec:
    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess.get("size", model.visual.image_size)
    if isinstance(size, tuple | list):
        if size[0] != size[1]:
            raise BackboneError(f"non-square backbone input {size} is not supported")
        size = size[0]
    return InputSpec(
        image_size=int(size),
        mean=tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD)),
    )


class _OpenClipRandomWeights(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" on the root logger
    whenever it builds a model without downloading, even when the node then loads a checkpoint;
    the node says itself which it is (DEMO, or the checkpoint's sha256)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextmanager
def _without_open_clips_random_weights_warning() -> Iterator[None]:
    drop = _OpenClipRandomWeights()
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


def load_backbone(cfg: ModelConfig) -> Backbone:
    """Build the configured architecture, load the local checkpoint if any, and freeze it."""
    # Belt and braces: even a misconfigured tokenizer must not reach for the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _register_architecture(cfg)
    with torch.random.fork_rng(devices=[]), _without_open_clips_random_weights_warning():
        torch.manual_seed(cfg.seed)
        model = open_clip.create_model(
            cfg.architecture, pretrained=None, pretrained_image=False, pretrained_text=False
        )
    sha256 = None
    if cfg.checkpoint is not None:
        try:
            sha256 = file_sha256(cfg.checkpoint)
        except OSError as exc:
            raise BackboneError(f"model.checkpoint {cfg.checkpoint} cannot be read: {exc.strerror}") from exc
        # torch, safetensors and open_clip each fail in their own way on a file that is not a
        # state_dict of this architecture (UnpicklingError, SafetensorError, StopIteration, ...).
        try:
            open_clip.load_checkpoint(model, str(cfg.checkpoint), strict=True, weights_only=True)
        except Exception as exc:
            raise BackboneError(
                f"model.checkpoint {cfg.checkpoint} does not fit architecture {cfg.architecture}: {exc}"
            ) from exc
        log.info("backbone %s loaded from checkpoint sha256 %s", cfg.architecture, sha256)
    else:
        log.warning(
            "DEMO MODEL: no model.checkpoint configured; %s has seeded random weights (seed %d). "
            "Every result is labelled DEMO and has NO clinical meaning.",
            cfg.architecture,
            cfg.seed,
        )
    device = pick_device(cfg.device)
    model = model.to(device).eval()
    if device.type == "cuda" and cfg.precision == "bf16":
        model = model.to(torch.bfloat16)
    model.requires_grad_(False)
    return Backbone(
        model=model,
        tokenizer=open_clip.get_tokenizer(cfg.architecture),
        architecture=cfg.architecture,
        sha256=sha256,
        input_spec=_input_spec(model),
        device=device,
        seed=cfg.seed,
        precision=cfg.precision,
    )
