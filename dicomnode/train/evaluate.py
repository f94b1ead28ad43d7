"""`dicomnode eval`: the seeds' table for a prompt set on a labelled split, with 95% intervals.

Per class and macro: AUC-ROC, sensitivity, specificity, F1 and false-negative rate at the
set's own thresholds, with bootstrap 95% confidence intervals over images; the learned
parameter count. With baselines, zero-shot (the modality's shipped templates) and a linear
probe trained on the train split are scored on the same images. Pixels come from the same
imaging code as serving.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from dicomnode.model.backbone import Backbone
from dicomnode.model.classifier import PromptedClassifier, build_classifier
from dicomnode.model.promptset import PromptSet
from dicomnode.progress import progress
from dicomnode.train.data import LabelledData, TrainingImages
from dicomnode.train.metrics import bootstrap_ci, class_figures, macro_auc


def scores(
    classifier: PromptedClassifier, data: LabelledData, split: str, backbone: Backbone, batch: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (in the data's class order) and targets of every image of a split."""
    images = TrainingImages(
        data.split(split), data.classes, classifier.prompt_set.domain, backbone.input_spec
    )
    names = [f.name for f in classifier.prompt_set.findings]
    missing = [c for c in data.classes if c not in names]
    if missing:
        raise ValueError(f"prompt set {classifier.prompt_set.name} has no class {', '.join(missing)}")
    columns = [names.index(c) for c in data.classes]
    probabilities, targets = [], []
    classifier.eval()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=backbone.device.type == "cuda"):
        starts = range(0, len(images), batch)
        for start in progress(starts, description=classifier.prompt_set.method, unit="batch"):
            items = [images[i] for i in range(start, min(start + batch, len(images)))]
            pixels = torch.stack([p for p, _ in items]).to(backbone.device)
            probabilities.append(
                classifier.probabilities(classifier.image_features(pixels)).float().cpu().numpy()
            )
            targets.append(torch.stack([t for _, t in items]).numpy())
    return np.concatenate(probabilities)[:, columns], np.concatenate(targets)


def figures(
    name: str,
    classifier: PromptedClassifier,
    probabilities: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
) -> dict:
    """One method's row of the table: macro AUC with its interval and the per-class figures."""
    thresholds = {f.name: f.threshold for f in classifier.prompt_set.findings}
    per_class = class_figures(probabilities, targets, [thresholds[c] for c in classes])
    for c, row in enumerate(per_class):
        one = lambda p, t, c=c: macro_auc(p[:, [c]], t[:, [c]])  # noqa: E731 - the bootstrap's statistic
        row["auc_ci"] = list(bootstrap_ci(probabilities, targets, one, rounds=500))
    low, high = bootstrap_ci(probabilities, targets)
    return {
        "method": name,
        "auc": macro_auc(probabilities, targets),
        "auc_ci": [low, high],
        "learned_parameters": classifier.trainable_parameters(),
        "images": int(len(targets)),
        "classes": dict(zip(classes, per_class, strict=True)),
    }


def evaluate(
    backbone: Backbone,
    prompt_set: PromptSet,
    data: LabelledData,
    split: str,
    baselines: dict[str, PromptedClassifier] | None = None,
) -> list[dict]:
    """The table's rows: the prompt set first, then each baseline, on the same images."""
    rows = []
    for name, classifier in {
        prompt_set.method: build_classifier(backbone, prompt_set),
        **(baselines or {}),
    }.items():
        probabilities, targets = scores(classifier, data, split, backbone)
        rows.append(figures(name, classifier, probabilities, targets, data.classes))
    return rows


def _mean(values) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def markdown(rows: list[dict], report: Callable[[str], None]) -> None:
    """The method x metric table, then each method's per-class figures."""
    report("| method | macro AUC (95% CI) | sensitivity | specificity | F1 | FNR | learned parameters |")
    report("|---|---|---|---|---|---|---|")
    for row in rows:
        per_class = list(row["classes"].values())
        low, high = row["auc_ci"]
        means = [_mean(c[k] for c in per_class) for k in ("sensitivity", "specificity", "f1", "fnr")]
        report(
            f"| {row['method']} | {row['auc']:.3f} ({low:.3f}-{high:.3f}) | "
            + " | ".join(f"{m:.3f}" for m in means)
            + f" | {row['learned_parameters']:,} |"
        )
    for row in rows:
        report("")
        report(f"{row['method']}, per class ({row['images']} images):")
        report("| class | AUC (95% CI) | threshold | sensitivity | specificity | F1 | FNR |")
        report("|---|---|---|---|---|---|---|")
        for name, c in row["classes"].items():
            low, high = c["auc_ci"]
            report(
                f"| {name} | {c['auc']:.3f} ({low:.3f}-{high:.3f}) | {c['threshold']:.3f} | "
                f"{c['sensitivity']:.3f} | {c['specificity']:.3f} | {c['f1']:.3f} | {c['fnr']:.3f} |"
            )
