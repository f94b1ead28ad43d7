"""Training losses: the seed's clinical multi-label loss, cross-entropy, and DPT's distillation.

Multi-label (METHODS.md, VPT): an asymmetric loss against false negatives combined with a
focal term, positives weighted per class by clinical priority. For each class with
probability p and label y:

    positive:  - w_c * (1 - p)^gamma_pos * log(p)
    negative:  - p_m^gamma_neg * log(1 - p_m),   p_m = max(p - margin, 0)

The negative side is down-weighted (gamma_neg > gamma_pos) and easy negatives below the
margin are dropped, so the many absent findings do not drown the few present ones.
Multi-class: cross-entropy. DPT adds distillation towards the frozen teacher (template and
description text features, zero-shot logits) and keeps the prompted image features near the
frozen ones (PromptSRC's self-regularisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ClinicalLossWeights:
    """Hyperparameters of the clinical loss (the seed's defaults)."""

    gamma_pos: float = 1.0
    gamma_neg: float = 4.0
    margin: float = 0.05


def clinical_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    priority: torch.Tensor | None = None,
    weights: ClinicalLossWeights = ClinicalLossWeights(),
) -> torch.Tensor:
    """Mean asymmetric-focal loss of multi-label `logits` (B, C) against 0/1 `targets`."""
    probability = torch.sigmoid(logits.float())
    targets = targets.float()
    log_p = F.logsigmoid(logits.float())
    shifted = (probability - weights.margin).clamp(min=0)
    log_not = torch.log((1 - shifted).clamp(min=1e-8))
    positive = targets * (1 - probability).pow(weights.gamma_pos) * log_p
    if priority is not None:
        positive = positive * priority
    negative = (1 - targets) * shifted.pow(weights.gamma_neg) * log_not
    return -(positive + negative).sum(dim=1).mean()


def classification_loss(
    logits: torch.Tensor, targets: torch.Tensor, task: str, priority: torch.Tensor | None = None
) -> torch.Tensor:
    """The task's loss: clinical for multi-label, cross-entropy over the one true class otherwise."""
    if task == "multi-label":
        return clinical_loss(logits, targets, priority)
    return F.cross_entropy(logits.float(), targets.argmax(dim=1))


@dataclass(frozen=True)
class DistillationWeights:
    """Weights of DPT's extra terms (PromptSRC: text 25, image 10; here per training YAML)."""

    text: float = 25.0
    image: float = 10.0
    logits: float = 1.0


def distillation_loss(
    text: torch.Tensor,
    teacher_text: torch.Tensor,
    image: torch.Tensor,
    frozen_image: torch.Tensor,
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    task: str,
    weights: DistillationWeights = DistillationWeights(),
) -> torch.Tensor:
    """L1 of prompted to teacher text features and prompted to frozen image features, plus KL of
    the prompted scores to the teacher's (per class for multi-label, over classes otherwise)."""
    text_term = F.l1_loss(text.float(), teacher_text.float())
    image_term = F.l1_loss(image.float(), frozen_image.float())
    if task == "multi-label":
        student = torch.stack([F.logsigmoid(logits), F.logsigmoid(-logits)], dim=-1)
        teacher = torch.stack([torch.sigmoid(teacher_logits), torch.sigmoid(-teacher_logits)], dim=-1)
        kl = F.kl_div(student.float(), teacher.float(), reduction="none").sum(-1).mean()
    else:
        kl = F.kl_div(
            F.log_softmax(logits.float(), -1), F.softmax(teacher_logits.float(), -1), reduction="batchmean"
        )
    return weights.text * text_term + weights.image * image_term + weights.logits * kl
