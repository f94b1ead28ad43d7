"""`dicomnode train`: prompt sets learned on synthetic data with plain visual signs, on the tiny backbone.

Two gloo processes on the CPU, as torchrun runs them on GPUs. The figures prove the code
learns; they are not clinical results (random backbone, synthetic images).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dicomnode.config import load_config
from dicomnode.model.backbone import load_backbone
from dicomnode.model.classifier import build_classifier
from dicomnode.model.promptset import load_prompt_set
from dicomnode.train import loop
from dicomnode.train.data import TrainingImages, read_dataset
from dicomnode.train.metrics import macro_auc
from tests import synthetic
from tests.conftest import REPO, free_port, routing_for, tiny_backbone, write_node_config

CLASSES = ("Effusion", "Pneumothorax", "Nodule")

#: The seeds' defaults, but for a random backbone: a head and prompts that move fast, a light
#: distillation (the zero-shot teacher of random weights knows nothing), class-specific context.
TRAINING = {
    "epochs": 30,
    "batch_size": 16,
    "lr_head": 1e-2,
    "lr_prompts": 3e-2,
    "workers": 0,
    "augment": False,
    "distillation": [1.0, 1.0, 0.1],
    "dpt": {"context_tokens": 4, "class_specific": True},
}


@pytest.fixture(scope="module")
def chest_data(tmp_path_factory) -> Path:
    return synthetic.chestxray14(tmp_path_factory.mktemp("cxr14"), classes=CLASSES, patients=100, seed=0)


@pytest.fixture
def node(tmp_path, tiny_architecture) -> Path:
    prompts = tmp_path / "prompts"
    shutil.copytree(REPO / "prompts" / "cxr", prompts / "cxr")
    return write_node_config(
        tmp_path,
        tiny_architecture,
        scp_port=free_port(),
        prompts_dir=str(prompts),
        routing=str(routing_for(tmp_path, "cxr")),
    )


def _train(node: Path, data: Path, method: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    training = tmp_path / f"train-{method}.yaml"
    training.write_text(yaml.safe_dump({**TRAINING, "method": method}))
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", "train", "--modality", "cxr", "--data", str(data),
         "--config", str(node), "--train-config", str(training), *extra],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["vpt", "dpt"])
def test_two_processes_learn_a_set_that_beats_zero_shot_on_held_out_patients(
    node, chest_data, tmp_path, method
):
    done = _train(node, chest_data, method, tmp_path, "--nproc-per-node", "2")

    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) on cpu" in done.stdout
    prompts = load_config(node).prompts_dir / "cxr"
    versions = [p for p in prompts.iterdir() if p.is_dir()]
    assert len(versions) == 1, "one version, no work folder left behind"
    version = versions[0]
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["test"]["auc"] >= 0.8, metrics["test"]
    low, high = metrics["test"]["auc_ci"]
    assert low <= metrics["test"]["auc"] <= high
    for name in ("promptset.yaml", "prompts.safetensors", "training.yaml", "roc.png", "pr.png"):
        assert (version / name).is_file(), name
    learned = load_prompt_set(version)
    assert learned.method == method
    assert [f.name for f in learned.findings] == ["Effusion", "Nodule", "Pneumothorax"], "the set's order"
    record = yaml.safe_load((version / "training.yaml").read_text())
    assert record["processes"] == 2 and record["data"]["layout"] == "chestxray14"
    assert "NO clinical meaning" in done.stdout

    # Zero-shot on random weights, same held-out patients: near chance.
    cfg = load_config(node)
    backbone = load_backbone(cfg.model.model_copy(update={"device": "cpu"}))
    data = read_dataset(chest_data, CLASSES)
    shipped = build_classifier(backbone, load_prompt_set(REPO / "prompts" / "cxr"))
    images = TrainingImages(data.split("test"), data.classes, "cxr", backbone.input_spec)
    pixels = torch.stack([images[i][0] for i in range(len(images))])
    targets = np.stack([images[i][1].numpy() for i in range(len(images))])
    with torch.no_grad():
        everything = shipped.probabilities(shipped.image_features(pixels)).numpy()
    names = [f.name for f in load_prompt_set(REPO / "prompts" / "cxr").findings]
    zero_shot = everything[:, [names.index(c) for c in data.classes]]
    assert abs(macro_auc(zero_shot, targets) - 0.5) < 0.2


def test_a_resumed_run_ends_exactly_as_an_uninterrupted_one(chest_data, tiny_architecture, tmp_path):
    backbone = tiny_backbone(tiny_architecture)
    data = read_dataset(chest_data, CLASSES)
    draft_folder = tmp_path / "cxr"
    draft_folder.mkdir()
    content = yaml.safe_load((REPO / "prompts" / "cxr" / "promptset.yaml").read_text())
    content["classes"] = [c for c in content["classes"] if c["name"] in CLASSES]
    content.update(method="vpt", backbone={"architecture": "tinyclip", "seed": 7})
    content["vpt"] = {"tokens": {"count": 2, "depth": "deep"}, "pixel": {"placement": "border", "size": 4}}
    (draft_folder / "promptset.yaml").write_text(yaml.safe_dump(content))
    draft = load_prompt_set(draft_folder, require_tensors=False)
    cfg = loop.TrainingConfig.model_validate(
        {**TRAINING, "epochs": 3, "method": "vpt", "vpt": content["vpt"]}
    )
    ranks = loop.Ranks(0, 1, torch.device("cpu"))

    whole = loop.train(backbone, draft, data, cfg, ranks, tmp_path / "whole")

    class Crash(RuntimeError):
        pass

    def crash_in_epoch_three(epoch, *_):
        if epoch == 3:
            raise Crash

    with pytest.raises(Crash):
        loop.train(backbone, draft, data, cfg, ranks, tmp_path / "resumed", crash_in_epoch_three)
    resumed = loop.train(backbone, draft, data, cfg, ranks, tmp_path / "resumed")

    for name, tensor in whole.classifier.named_tensors().items():
        assert torch.equal(tensor, resumed.classifier.named_tensors()[name]), name
    assert np.array_equal(whole.test[0], resumed.test[0])


def test_a_label_the_prompt_set_does_not_know_is_refused_naming_it(node, tmp_path):
    data = synthetic.chestxray14(tmp_path / "odd", classes=("Effusion", "Cat"), patients=8, seed=1)

    done = _train(node, data, "vpt", tmp_path)

    assert done.returncode == 2
    assert "Cat" in done.stderr


def test_eval_prints_the_method_by_metric_table_with_baselines_and_writes_json(node, chest_data, tmp_path):
    trained = _train(node, chest_data, "vpt", tmp_path, "--out", str(tmp_path / "learned" / "cxr"))
    assert trained.returncode == 0, trained.stderr[-2000:]

    learned, table = tmp_path / "learned" / "cxr", tmp_path / "eval.json"
    done = subprocess.run(
        [sys.executable, "-m", "dicomnode", "eval", "--prompt-set", str(learned), "--data", str(chest_data),
         "--config", str(node), "--baselines", "--json", str(table)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        "| method | macro AUC (95% CI) | sensitivity | specificity | F1 | FNR | learned parameters |"
        in done.stdout
    )
    table = json.loads(table.read_text())
    methods = {row["method"]: row for row in table["results"]}
    assert list(methods) == ["vpt", "zeroshot", "linear-probe"]
    for row in methods.values():
        low, high = row["auc_ci"]
        assert low <= row["auc"] <= high
        assert set(row["classes"]) == {"Effusion", "Nodule", "Pneumothorax"}
    assert methods["vpt"]["auc"] >= 0.8
    assert methods["zeroshot"]["learned_parameters"] == 0
    assert "NO clinical meaning" in done.stdout


def test_a_trained_version_is_served_by_the_node_it_was_trained_for(node, chest_data, tmp_path, orthanc):
    from tests.conftest import dcmtk, start_node, wait_until
    from tests.test_end_to_end import _results_in, _sr_text

    trained = _train(node, chest_data, "dpt", tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    content = yaml.safe_load(node.read_text())
    content["destinations"] = [orthanc.destination(backoff_s=0.5)]
    node.write_text(yaml.safe_dump(content))
    running = start_node(node, content["scp"]["port"])
    try:
        study = synthetic.dicom_labels(tmp_path / "dicom", classes=CLASSES, patients=1, images_per_patient=1)
        path = next(p for p in study.rglob("*.dcm"))
        sent = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(running.port), str(path))
        assert sent.returncode == 0, sent.stderr
        reports = [r for r in _results_in(orthanc) if "88." in r.SOPClassUID]
        assert "cxr dpt" in _sr_text(reports[0])
        assert wait_until(lambda: "done=1" in running.cli("status").stdout, 30, what="done")
    finally:
        from tests.conftest import stop_process

        stop_process(running.process)


def test_base_to_novel_never_learns_from_a_novel_class_label(chest_data, tiny_architecture, tmp_path):
    """Two datasets that differ only in the novel class's labels give bit-identical prompts."""
    import dataclasses

    backbone = tiny_backbone(tiny_architecture)
    data = read_dataset(chest_data, CLASSES)
    novel = data.classes[-1]
    flipped = dataclasses.replace(
        data,
        images=tuple(
            dataclasses.replace(i, labels=tuple(sorted(set(i.labels) ^ {novel}))) for i in data.images
        ),
    )
    folder = tmp_path / "cxr"
    folder.mkdir()
    content = yaml.safe_load((REPO / "prompts" / "cxr" / "promptset.yaml").read_text())
    content["classes"] = [c for c in content["classes"] if c["name"] in CLASSES]
    content.update(method="dpt", dpt={"context_tokens": 4}, backbone={"architecture": "tinyclip", "seed": 7})
    (folder / "promptset.yaml").write_text(yaml.safe_dump(content))
    draft = load_prompt_set(folder, require_tensors=False)
    cfg = loop.TrainingConfig.model_validate({**TRAINING, "epochs": 2, "method": "dpt", "base_classes": 2})
    ranks = loop.Ranks(0, 1, torch.device("cpu"))

    first = loop.train(backbone, draft, data, cfg, ranks, tmp_path / "a").classifier.named_tensors()
    second = loop.train(backbone, draft, flipped, cfg, ranks, tmp_path / "b").classifier.named_tensors()
    every = loop.TrainingConfig.model_validate({**TRAINING, "epochs": 2, "method": "dpt"})
    with_novel = loop.train(backbone, draft, flipped, every, ranks, tmp_path / "c").classifier.named_tensors()

    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    assert any(not torch.equal(t, with_novel[n]) for n, t in first.items()), (
        "all classes: the labels do teach"
    )


def test_train_reports_base_and_novel_figures_apart(node, chest_data, tmp_path):
    done = _train(
        node, chest_data, "dpt", tmp_path, "--base-classes", "2", "--out", str(tmp_path / "v" / "cxr")
    )

    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "v" / "cxr" / "metrics.json").read_text())
    assert metrics["base_classes"] == 2
    assert 0.0 <= metrics["test"]["novel_auc"] <= 1.0
    assert metrics["test"]["base_auc"] >= 0.7
    assert "base classes" in done.stdout and "novel classes" in done.stdout


def test_the_description_consensus_drops_a_description_about_something_else():
    torch.manual_seed(0)
    topic = torch.nn.functional.normalize(torch.randn(32), dim=0)
    on_topic = torch.nn.functional.normalize(topic + 0.3 * torch.randn(6, 32), dim=-1)
    elsewhere = torch.nn.functional.normalize(-topic + 0.1 * torch.randn(1, 32), dim=-1)

    kept = loop.consensus(torch.cat([on_topic, elsewhere]))

    assert torch.allclose(kept, on_topic.mean(dim=0), atol=1e-6)
    assert torch.allclose(loop.consensus(on_topic[:2]), on_topic[:2].mean(dim=0)), (
        "too few to judge: all kept"
    )
