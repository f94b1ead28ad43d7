"""`dicomnode train`: from a dataset folder to a new version of a modality's prompt set.

The classes, codes, templates and descriptions come from the modality's shipped prompt set
(prompts/<modality>/promptset.yaml); the backbone is the node configuration's, so the learned
set always fits the node that serves it. The run's work folder (checkpoints) is named by a
hash of what defines the run, so the same command after a crash resumes it. The version is
written to prompts/<modality>/<version>/ (or --out), which a running node picks up by itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed
import yaml

from dicomnode.config import NodeConfig
from dicomnode.model.promptset import PROMPTSET_FILE, PromptSetError, load_prompt_set
from dicomnode.train.data import DataError, data_fingerprint, read_dataset
from dicomnode.train.loop import TrainingConfig, join_process_group, load_training_backbone, train
from dicomnode.train.report import write_version


class TrainingError(ValueError):
    """The run cannot start or finish; the message names what to fix."""


def _draft(base: dict, cfg: TrainingConfig, classes: tuple[str, ...], backbone, version: str) -> dict:
    """The shipped set's content restricted to the data's classes, with the method to learn."""
    content = {k: v for k, v in base.items() if k not in ("vpt", "dpt", "backbone")}
    content["classes"] = [c for c in base["classes"] if c["name"] in classes]
    content["method"] = cfg.method
    content["version"] = version
    if cfg.method in ("vpt", "dpt"):
        content[cfg.method] = getattr(cfg, cfg.method).model_dump(mode="json", exclude_none=True)
    identity = {"architecture": backbone.architecture}
    identity.update({"sha256": backbone.sha256} if backbone.sha256 else {"seed": backbone.seed})
    content["backbone"] = identity
    return content


def run(
    modality: str,
    data_dir: Path,
    node: NodeConfig,
    cfg: TrainingConfig,
    out: Path | None,
    report: Callable[[str], None],
    progress=None,
) -> Path | None:
    """Train and write the version; returns its folder on rank 0 (None on the other ranks)."""
    shipped = node.prompts_dir / modality
    try:
        base_set = load_prompt_set(shipped)
    except PromptSetError as exc:
        raise TrainingError(f"--modality {modality}: {exc}") from None
    base = yaml.safe_load((shipped / PROMPTSET_FILE).read_text())
    try:
        data = read_dataset(
            data_dir, [f.name for f in base_set.findings], val_fraction=cfg.val_fraction, seed=cfg.seed
        )
    except DataError as exc:
        raise TrainingError(str(exc)) from None
    ranks = join_process_group(node.model.device)
    backbone = load_training_backbone(node.model, ranks)
    fingerprint = data_fingerprint(data)
    identity = backbone.sha256 or f"seed-{backbone.seed}"
    run_key = hashlib.sha256(
        json.dumps(
            [modality, fingerprint, cfg.model_dump(mode="json"), backbone.architecture, identity]
        ).encode()
    ).hexdigest()[:12]
    work = shipped / f".train-{run_key}"
    work.mkdir(parents=True, exist_ok=True)
    version = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    content = _draft(base, cfg, data.classes, backbone, version)
    draft_folder = work / modality
    if ranks.main:
        draft_folder.mkdir(exist_ok=True)
        (draft_folder / PROMPTSET_FILE).write_text(yaml.safe_dump(content, sort_keys=False))
    if ranks.world > 1:
        torch.distributed.barrier()
    draft = load_prompt_set(draft_folder, require_tensors=False)
    if ranks.main:
        counts = {split: len(data.split(split)) for split in ("train", "val", "test")}
        report(
            f"train {modality}: {cfg.method} on {backbone.architecture} ({identity[:16]}), "
            f"{data.layout} layout, classes {', '.join(data.classes)}, images {counts}, "
            f"{ranks.world} process(es) on {ranks.device.type}"
        )
    trained = train(backbone, draft, data, cfg, ranks, work, progress)
    if not ranks.main:
        return None
    target = out or shipped / version
    record = {
        "modality": modality,
        "method": cfg.method,
        "training": cfg.model_dump(mode="json"),
        "backbone": {"architecture": backbone.architecture, "sha256": backbone.sha256, "seed": backbone.seed},
        "data": {"folder": str(data_dir), "layout": data.layout, "fingerprint": fingerprint},
        "base_classes": cfg.base_classes,
        "learned_parameters": trained.classifier.trainable_parameters(),
        "processes": ranks.world,
        "seconds": round(trained.seconds, 1),
        "images_per_s": round(trained.images_per_s, 1),
    }
    metrics = write_version(
        target, content, trained.classifier, trained.validation, trained.test, record, cfg.target_sensitivity
    )
    shutil.rmtree(work, ignore_errors=True)
    test = metrics["test"]
    if test.get("images"):
        low, high = test["auc_ci"]
        report(f"test macro AUC {test['auc']:.3f} (95% CI {low:.3f}-{high:.3f}) on {test['images']} images")
        if cfg.base_classes:
            report(f"  base classes {test['base_auc']:.3f}, novel classes {test['novel_auc']:.3f}")
    if backbone.demo:
        report("DEMO backbone (random weights): these figures have NO clinical meaning")
    report(f"wrote {target}")
    return target
