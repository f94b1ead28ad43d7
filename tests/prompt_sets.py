"""Writing learned prompt sets for tests: promptset.yaml plus prompts.safetensors, as training would.

The tensors are fresh prompts moved off their starting point by seeded noise, so that every
prompt really changes the outputs (an untrained pixel prompt or DPT gate is zero, a no-op).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from dicomnode.model.backbone import Backbone
from dicomnode.model.classifier import build_classifier, save_prompts
from dicomnode.model.promptset import PROMPTSET_FILE, PromptSet, load_prompt_set

CODE = {"value": "1", "scheme": "99TEST", "meaning": "Test finding"}
CLASSES = ("effusion", "pneumothorax", "a nodule")

VPT_SHALLOW = {"tokens": {"count": 4, "depth": "shallow"}}
VPT_DEEP = {
    "pixel": {
        "placement": "regions",
        "regions": {"left": [0.1, 0.2, 0.45, 0.9], "right": [0.55, 0.2, 0.9, 0.9]},
        "grids": [8, 2],
    },
    "tokens": {"count": 4, "depth": "deep"},
}
DPT = {"context_tokens": 4}


def spec(
    name: str,
    method: str,
    backbone: Backbone,
    *,
    task: str = "multi-label",
    classes: tuple[str, ...] = CLASSES,
    section: dict | None = None,
) -> dict:
    """The promptset.yaml content of a test set for `backbone` (its architecture and seed)."""
    content = {
        "name": name,
        "version": "1",
        "domain": "cxr",
        "procedure": {"value": "399208008", "scheme": "SCT", "meaning": "Plain chest X-ray"},
        "method": method,
        "task": task,
        "templates": {
            "positive": ["a chest X-ray showing {finding}", "a radiograph with {finding}"],
            "negative": ["a chest X-ray without {finding}"] if task == "multi-label" else [],
        },
        "classes": [{"name": f"class{i}", "text": text, "code": CODE} for i, text in enumerate(classes)],
    }
    if method != "zeroshot":
        content["backbone"] = {"architecture": backbone.architecture, "seed": backbone.seed}
    if section is not None:
        content[method] = section
    return content


def write_prompt_set(
    folder: Path, content: dict, backbone: Backbone, *, trained: bool = True, seed: int = 1
) -> PromptSet:
    """Write `content` into `folder` and, for learned methods, tensors moved by seeded noise."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PROMPTSET_FILE).write_text(yaml.safe_dump(content, sort_keys=False))
    if content["method"] == "zeroshot":
        return load_prompt_set(folder)
    draft = load_prompt_set(folder, require_tensors=False)
    classifier = build_classifier(backbone, draft, initialise=True, seed=seed)
    if trained:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for tensor in classifier.named_tensors().values():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator).to(tensor.device))
    save_prompts(classifier, folder)
    return load_prompt_set(folder)
