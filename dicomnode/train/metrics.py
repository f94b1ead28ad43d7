"""Figures of a classifier on a labelled split: AUC-ROC, sensitivity, specificity, F1, FNR.

Per class and macro (the mean over classes that have both outcomes in the split), with
bootstrap 95% confidence intervals over images, and thresholds calibrated for a target
sensitivity. scikit-learn computes the curves; nothing here knows about torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def calibrate_thresholds(
    probabilities: np.ndarray, targets: np.ndarray, target_sensitivity: float, default: float = 0.5
) -> list[float]:
    """Per class, the highest threshold whose sensitivity on this split reaches the target.

    A class without positives (or negatives) in the split keeps `default`: nothing to learn from.
    """
    thresholds = []
    for c in range(targets.shape[1]):
        y, p = targets[:, c], probabilities[:, c]
        if y.min() == y.max():
            thresholds.append(default)
            continue
        _, tpr, cut = roc_curve(y, p)
        reaching = cut[tpr >= target_sensitivity]
        chosen = float(reaching.max()) if len(reaching) else float(p.min())
        thresholds.append(min(max(chosen, 0.0), 1.0))
    return thresholds


def _binary(y: np.ndarray, decided: np.ndarray) -> dict[str, float]:
    tp = float(((decided == 1) & (y == 1)).sum())
    tn = float(((decided == 0) & (y == 0)).sum())
    fp = float(((decided == 1) & (y == 0)).sum())
    fn = float(((decided == 0) & (y == 1)).sum())
    sensitivity = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"sensitivity": sensitivity, "specificity": specificity, "f1": f1, "fnr": 1 - sensitivity}


def class_figures(probabilities: np.ndarray, targets: np.ndarray, thresholds: Sequence[float]) -> list[dict]:
    """AUC and the decision figures at each class's threshold."""
    figures = []
    for c, threshold in enumerate(thresholds):
        y, p = targets[:, c], probabilities[:, c]
        auc = float(roc_auc_score(y, p)) if y.min() != y.max() else float("nan")
        figures.append(
            {"auc": auc, "threshold": float(threshold), **_binary(y, (p >= threshold).astype(int))}
        )
    return figures


def macro_auc(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """Mean AUC over the classes that have both outcomes (nan if none has)."""
    aucs = [
        roc_auc_score(targets[:, c], probabilities[:, c])
        for c in range(targets.shape[1])
        if targets[:, c].min() != targets[:, c].max()
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


def bootstrap_ci(
    probabilities: np.ndarray, targets: np.ndarray, statistic=macro_auc, rounds: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of `statistic` over images drawn with replacement."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        pick = rng.integers(0, len(targets), len(targets))
        value = statistic(probabilities[pick], targets[pick])
        if not np.isnan(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)
