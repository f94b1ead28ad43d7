"""Writing a learned prompt-set version: the set itself, its figures, its plots, its provenance.

The version folder holds what the node serves (promptset.yaml with the calibrated thresholds,
prompts.safetensors) and what a reader needs to trust it: metrics.json (validation and test
figures with bootstrap intervals), roc.png and pr.png, and training.yaml (the training
configuration, the backbone's identity, the data's fingerprint, the learned parameter count,
how long it took). It is written into a hidden folder first and renamed into place, so a
running node never sees half a version.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import yaml

from dicomnode.durable import fsync_dir
from dicomnode.model.classifier import PromptedClassifier, save_prompts
from dicomnode.model.promptset import PROMPTSET_FILE
from dicomnode.train.metrics import bootstrap_ci, calibrate_thresholds, class_figures, macro_auc


def split_figures(
    probabilities: np.ndarray, targets: np.ndarray, classes: tuple[str, ...], thresholds: list[float]
) -> dict:
    """Macro AUC with its bootstrap 95% interval and per-class figures, for metrics.json."""
    if len(targets) == 0:
        return {"images": 0}
    low, high = bootstrap_ci(probabilities, targets)
    return {
        "images": int(len(targets)),
        "auc": macro_auc(probabilities, targets),
        "auc_ci": [low, high],
        "classes": dict(zip(classes, class_figures(probabilities, targets, thresholds), strict=True)),
    }


def _plots(folder: Path, probabilities: np.ndarray, targets: np.ndarray, classes: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    for name, curve, axes in (
        ("roc.png", roc_curve, ("false positive rate", "sensitivity")),
        ("pr.png", precision_recall_curve, ("recall", "precision")),
    ):
        figure, ax = plt.subplots(figsize=(6, 6))
        for c, label in enumerate(classes):
            y = targets[:, c]
            if y.min() == y.max():
                continue
            first, second, _ = curve(y, probabilities[:, c])
            x, yv = (first, second) if name == "roc.png" else (second, first)
            ax.plot(x, yv, label=label)
        if name == "roc.png":
            ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
        ax.set_xlabel(axes[0])
        ax.set_ylabel(axes[1])
        ax.set_title(f"{name[:-4].upper()} on the test split")
        ax.legend(fontsize=7)
        figure.savefig(folder / name, dpi=100)
        plt.close(figure)


def write_version(
    target: Path,
    content: dict,
    classifier: PromptedClassifier,
    validation: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    record: dict,
    target_sensitivity: float,
) -> dict:
    """Calibrate thresholds on validation, write the version folder at `target`; the metrics."""
    classes = tuple(c["name"] for c in content["classes"])
    thresholds = (
        calibrate_thresholds(*validation, target_sensitivity) if len(validation[1]) else [0.5] * len(classes)
    )
    content = {
        **content,
        "classes": [
            {**c, "threshold": round(t, 6)} for c, t in zip(content["classes"], thresholds, strict=True)
        ],
    }
    metrics = {
        "target_sensitivity": target_sensitivity,
        "validation": split_figures(*validation, classes, thresholds),
        "test": split_figures(*test, classes, thresholds),
        "base_classes": record.get("base_classes"),
        "learned_parameters": classifier.trainable_parameters(),
        "demo_backbone": record["backbone"].get("sha256") is None,
    }
    base = record.get("base_classes")
    if base:
        for split, (probabilities, targets) in (("validation", validation), ("test", test)):
            if len(targets):
                metrics[split]["base_auc"] = macro_auc(probabilities[:, :base], targets[:, :base])
                metrics[split]["novel_auc"] = macro_auc(probabilities[:, base:], targets[:, base:])
    staging = target.parent / f".{target.name}.partial"
    staging.mkdir(parents=True, exist_ok=False, mode=0o755)
    save_prompts(classifier, staging)
    (staging / PROMPTSET_FILE).write_text(yaml.safe_dump(content, sort_keys=False, allow_unicode=True))
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (staging / "training.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    if len(test[1]):
        _plots(staging, *test, classes)
    for path in staging.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(staging)
    os.replace(staging, target)
    fsync_dir(target.parent)
    return metrics
