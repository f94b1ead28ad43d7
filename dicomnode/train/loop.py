"""Learning a prompt set: only prompt and head parameters train, on one device or many (torchrun).

`train` runs in every process torchrun starts (or alone): it joins the process group when
WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPU), shards the training images with a distributed
sampler, and lets DDP average the prompt gradients. AdamW (0.9, 0.999, weight decay 0.01)
with the seed's learning rates (prompts 1e-3, head 1e-5), a cosine schedule after a linear
warm-up, bf16 autocast on CUDA. After every epoch rank 0 writes a checkpoint (prompts,
optimiser, schedule, epoch), so a crashed run resumes where it stopped and ends exactly as
an uninterrupted one. At the end the validation split calibrates each class's threshold for
the target sensitivity; rank 0 writes the prompt-set version.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from dicomnode.config import ModelConfig
from dicomnode.model.backbone import Backbone, load_backbone
from dicomnode.model.classifier import PromptedClassifier, build_classifier, encode_texts, text_logits
from dicomnode.model.promptset import DptSpec, PromptSet, VptSpec
from dicomnode.model.vpt import CHEST_DEFAULT
from dicomnode.train.data import LabelledData, LabelledImage, TrainingImages, few_shot
from dicomnode.train.losses import (
    ClinicalLossWeights,
    DistillationWeights,
    classification_loss,
    clinical_loss,
    distillation_loss,
)

CHECKPOINT = "checkpoint.pt"


class TrainingConfig(BaseModel):
    """The training YAML: the seeds' defaults, each overridable by a flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["vpt", "dpt", "linear-probe"] = "vpt"
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=32, ge=1, description="per process")
    lr_prompts: float = Field(default=1e-3, gt=0)
    lr_head: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    augment: bool = True
    shots: int | None = Field(default=None, ge=1)
    # Base-to-novel: learn from the labels of the first N classes (in the set's order) only;
    # the others are novel, their labels never seen, their figures reported apart.
    base_classes: int | None = Field(default=None, ge=1)
    seed: int = 0
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    target_sensitivity: float = Field(default=0.9, gt=0, le=1)
    workers: int = Field(default=2, ge=0)
    vpt: VptSpec = VptSpec.model_validate(CHEST_DEFAULT)
    dpt: DptSpec = DptSpec()
    clinical: dict[str, float] = Field(default_factory=dict, description="class -> priority weight")
    focal: tuple[float, float, float] = (1.0, 4.0, 0.05)
    distillation: tuple[float, float, float] = (25.0, 10.0, 1.0)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the run: its rank, the world size and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def join_process_group(wanted_device: str) -> Ranks:
    """Join torchrun's process group if there is one (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() and wanted_device != "cpu"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Ranks(rank, world, device)


def _loader(images: TrainingImages, ranks: Ranks, cfg: TrainingConfig, shuffle: bool) -> DataLoader:
    sampler = DistributedSampler(
        images, num_replicas=ranks.world, rank=ranks.rank, shuffle=shuffle, seed=cfg.seed, drop_last=False
    )
    return DataLoader(
        images,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=ranks.device.type == "cuda",
        # Workers start anew each epoch, so they see the dataset's epoch (its augmentation draw).
        persistent_workers=False,
    )


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup_fraction: float):
    warmup = max(1, int(total * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


#: A description whose similarity to its class's mean lies this many robust standard
#: deviations below the others' is an outlier (BiomedCoOp's filter of LLM-written text).
OUTLIER_Z = 3.0


def consensus(features: torch.Tensor) -> torch.Tensor:
    """Mean of normalised description features (n, dim) after dropping outliers.

    Each description's cosine to the mean is scored by a robust z-score (median and MAD);
    those far below the others (a description about something else) are left out. Fewer than
    three descriptions give no robust spread, so all are kept.
    """
    if len(features) < 3:
        return features.mean(dim=0)
    similarity = features @ F.normalize(features.mean(dim=0), dim=-1)
    median = similarity.median()
    spread = 1.4826 * (similarity - median).abs().median() + 1e-6
    keep = (similarity - median) / spread > -OUTLIER_Z
    return features[keep].mean(dim=0)


def _teacher(classifier: PromptedClassifier, backbone: Backbone, prompt_set: PromptSet) -> torch.Tensor:
    """DPT's teacher: per class the template features joined by the consensus of its descriptions."""
    teacher = classifier.zero_shot.clone()
    with torch.no_grad():
        for c, descriptions in enumerate(prompt_set.class_descriptions):
            if descriptions:
                described = consensus(encode_texts(backbone, list(descriptions)))
                teacher[c, 0] = F.normalize(teacher[c, 0] + described, dim=-1)
    return teacher


@dataclass
class Trained:
    """What a run produced: the classifier and its scores on the validation and test splits."""

    classifier: PromptedClassifier
    validation: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    images_per_s: float
    seconds: float


def predict_split(
    classifier: PromptedClassifier, images: list[LabelledImage], data_classes, domain, backbone, ranks, cfg
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and targets of a split, each process scoring its shard, gathered on all."""
    if not images:
        return np.zeros((0, len(data_classes))), np.zeros((0, len(data_classes)))
    dataset = TrainingImages(images, data_classes, domain, backbone.input_spec, augment=False, seed=cfg.seed)
    loader = _loader(dataset, ranks, cfg, shuffle=False)
    indices = list(iter(loader.sampler))
    probabilities, targets = [], []
    classifier.eval()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=ranks.device.type == "cuda"):
        for pixels, target in loader:
            scores = classifier.probabilities(classifier.image_features(pixels.to(ranks.device)))
            probabilities.append(scores.float().cpu())
            targets.append(target)
    local = (torch.cat(probabilities).numpy(), torch.cat(targets).numpy(), np.array(indices))
    if ranks.world > 1:
        shards: list = [None] * ranks.world
        dist.all_gather_object(shards, local)
    else:
        shards = [local]
    # The sampler pads shards by repeating images; keep each image once, in split order.
    by_index: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for p, t, idx in shards:
        for row, index in enumerate(idx):
            by_index.setdefault(int(index), (p[row], t[row]))
    order = sorted(by_index)
    return np.stack([by_index[i][0] for i in order]), np.stack([by_index[i][1] for i in order])


def train(
    backbone: Backbone,
    prompt_set: PromptSet,
    data: LabelledData,
    cfg: TrainingConfig,
    ranks: Ranks,
    work_dir: Path,
    progress: Callable[[int, int, float, float, float], None] | None = None,
) -> Trained:
    """Learn `prompt_set` (a draft: promptset.yaml without tensors) on `data`; resume from `work_dir`."""
    classifier = build_classifier(backbone, prompt_set, initialise=True, seed=cfg.seed)
    base = cfg.base_classes or len(data.classes)
    if base >= len(data.classes) and cfg.base_classes:
        raise ValueError(
            f"base_classes {cfg.base_classes} leaves no novel class among the data's {len(data.classes)}"
        )
    train_images = list(data.split("train"))
    if prompt_set.task == "multi-class":  # an image of a novel class would teach its label
        train_images = [i for i in train_images if set(i.labels) <= set(data.classes[:base])]
    if cfg.shots:
        train_images = list(few_shot(train_images, data.classes[:base], cfg.shots, cfg.seed))
    dataset = TrainingImages(
        train_images, data.classes, prompt_set.domain, backbone.input_spec, augment=cfg.augment, seed=cfg.seed
    )
    loader = _loader(dataset, ranks, cfg, shuffle=True)
    head = [p for name, p in classifier.named_parameters() if name.startswith("head.")]
    prompts = [p for name, p in classifier.named_parameters() if not name.startswith("head.")]
    groups = [{"params": prompts, "lr": cfg.lr_prompts}] if prompts else []
    if head:
        groups.append({"params": head, "lr": cfg.lr_head})
    optimizer = torch.optim.AdamW(groups, betas=cfg.betas, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(loader)
    scheduler = _schedule(optimizer, total, cfg.warmup_fraction)
    start_epoch = _resume(work_dir / CHECKPOINT, classifier, optimizer, scheduler, ranks)
    model = DistributedDataParallel(classifier) if ranks.world > 1 else classifier
    priority = torch.tensor([cfg.clinical.get(c, 1.0) for c in data.classes], device=ranks.device)
    focal = ClinicalLossWeights(*cfg.focal)
    distill = DistillationWeights(*cfg.distillation)
    teacher = _teacher(classifier, backbone, prompt_set) if classifier.dual_prompts is not None else None
    cuda = ranks.device.type == "cuda"
    started, seen = time.monotonic(), 0
    for epoch in range(start_epoch, cfg.epochs):
        loader.sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        classifier.train()
        for step, (pixels, targets) in enumerate(loader):
            pixels, targets = pixels.to(ranks.device, non_blocking=True), targets.to(ranks.device)
            with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
                logits, image, text = model(pixels, with_features=True)
                # Only the base classes' labels and names teach (all classes unless base-to-novel).
                logits, targets = logits[:, :base], targets[:, :base]
                if prompt_set.task == "multi-label":
                    loss = clinical_loss(logits, targets, priority[:base], focal)
                else:
                    loss = classification_loss(logits, targets, prompt_set.task)
                if teacher is not None:
                    loss = loss + _distillation(
                        classifier, pixels, logits, image, text[:base], teacher[:base], distill
                    )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(pixels) * ranks.world
            if progress is not None and ranks.main:
                elapsed = time.monotonic() - started
                done = (epoch - start_epoch) * len(loader) + step + 1
                left = elapsed / done * ((cfg.epochs - start_epoch) * len(loader) - done)
                progress(epoch + 1, cfg.epochs, float(loss.detach()), seen / max(elapsed, 1e-9), left)
        if ranks.main:
            _save_checkpoint(work_dir / CHECKPOINT, classifier, optimizer, scheduler, epoch + 1)
        if ranks.world > 1:
            dist.barrier()
    seconds = time.monotonic() - started
    classifier.eval()
    args = (data.classes, prompt_set.domain, backbone, ranks, cfg)
    validation = predict_split(classifier, list(data.split("val")), *args)
    test = predict_split(classifier, list(data.split("test")), *args)
    return Trained(classifier, validation, test, seen / max(seconds, 1e-9), seconds)


def _distillation(classifier, pixels, logits, image, text, teacher, weights) -> torch.Tensor:
    """DPT: text towards the teacher, image features near the frozen ones, scores near the teacher's."""
    with torch.no_grad():
        frozen = F.normalize(classifier._backbone.model.encode_image(pixels).float(), dim=-1)
        teacher_logits = text_logits(frozen, teacher, classifier.scale, classifier.task)[:, : logits.shape[1]]
    return distillation_loss(text, teacher, image, frozen, logits, teacher_logits, classifier.task, weights)


def _save_checkpoint(path: Path, classifier, optimizer, scheduler, epoch: int) -> None:
    from dicomnode.durable import write_durably

    state = {
        "epoch": epoch,
        "prompts": {k: v.detach().cpu() for k, v in classifier.named_tensors().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    write_durably(path, lambda handle: torch.save(state, handle))


def _resume(path: Path, classifier, optimizer, scheduler, ranks: Ranks) -> int:
    """Load the last checkpoint of an interrupted run; the epoch to start from."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location=ranks.device, weights_only=True)
    with torch.no_grad():
        for name, tensor in classifier.named_tensors().items():
            tensor.copy_(state["prompts"][name].to(tensor.device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ranks.main:
        print(f"resumed from {path} after epoch {state['epoch']}", file=sys.stderr)
    return int(state["epoch"])


def load_training_backbone(model: ModelConfig, ranks: Ranks) -> Backbone:
    """The node's backbone on this process's device (fp32 weights: bf16 only by autocast)."""
    device = "cuda" if ranks.device.type == "cuda" else "cpu"
    backbone = load_backbone(model.model_copy(update={"device": device, "precision": "autocast"}))
    if ranks.device.type == "cuda" and backbone.device != ranks.device:
        backbone.model.to(ranks.device)
        backbone.device = ranks.device
    return backbone
