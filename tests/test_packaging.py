"""Packaging: the wheel `pip install .` builds carries the code and everything the node reads at
run time (the embedded default configuration, the routing rules, the shipped prompt sets, the
systemd units), and the node runs from it, outside any checkout, on its embedded default.

The wheel is built from a copy of the sources (so that the checkout gets no build/ folder) with
the test environment's setuptools, and unpacked instead of installed: the code that runs is the
wheel's, the libraries are the environment's.
"""

from __future__ import annotations

import email
import os
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import requests
from packaging.requirements import Requirement

from dicomnode.config import load_routing
from tests.conftest import REPO, free_port, stop_process, wait_for_port, wait_until

SOURCES = ("pyproject.toml", "README.md", "dicomnode", "conf", "prompts", "systemd")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, as `pip install .` would build it."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, source],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = out.glob("dicomnode-*.whl")
    return found


def test_the_wheel_carries_every_module_and_what_the_node_reads_at_run_time(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())

    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "dicomnode").rglob("*.py")}
    conf = {f"dicomnode/shipped/conf/{p.name}" for p in (REPO / "conf").glob("*.yaml")}
    prompt_sets = {
        f"dicomnode/shipped/prompts/{p.parent.name}/promptset.yaml"
        for p in (REPO / "prompts").glob("*/promptset.yaml")
    }
    units = {f"dicomnode/shipped/systemd/{p.name}" for p in (REPO / "systemd").iterdir()}
    # What the embedded default needs whatever the globs above find: its file, its routing, and
    # every prompt set that routing names.
    routing = load_routing(REPO / "conf" / "routing.yaml")
    needed = {"dicomnode/shipped/conf/dicomnode.yaml", "dicomnode/shipped/conf/routing.yaml"} | {
        f"dicomnode/shipped/prompts/{rule.prompt_set}/promptset.yaml"
        for rule in routing.rules
        if rule.prompt_set is not None
    }
    missing = (modules | conf | prompt_sets | units | needed) - names
    assert not missing, f"not in {wheel.name}: {', '.join(sorted(missing))}"
    assert "dicomnode/shipped/prompts/cxr/promptset.yaml" in names
    assert "dicomnode/shipped/systemd/dicomnode.service" in names
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]


def test_the_wheel_requires_the_dependencies_and_offers_the_gpu_train_and_test_extras(wheel):
    archive = zipfile.ZipFile(wheel)
    info = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = email.message_from_bytes(archive.read(info))
    required = metadata.get_all("Requires-Dist")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def by_name(requirements) -> dict[str, str]:
        return {(r := Requirement(text)).name: str(r.specifier) for text in requirements}

    assert by_name(r for r in required if "extra ==" not in r) == by_name(project["dependencies"])
    assert set(metadata.get_all("Provides-Extra")) == {"gpu", "train", "test"}
    assert any(r.startswith("nvidia-ml-py") and 'extra == "gpu"' in r for r in required)
    assert any(r.startswith("scikit-learn") and 'extra == "train"' in r for r in required)
    entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "dicomnode = dicomnode.cli:app" in entry_points


def test_the_unpacked_wheel_checks_and_serves_its_embedded_default_from_any_folder(
    wheel, tmp_path, tiny_architecture
):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    port, metrics = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")} | {
        "PYTHONPATH": str(site),
        "PYTHONUNBUFFERED": "1",
        # The embedded default as it is, on the tests' tiny backbone and free ports.
        "DICOMNODE_MODEL__ARCHITECTURE": tiny_architecture.stem,
        "DICOMNODE_MODEL__ARCHITECTURE_CONFIG": str(tiny_architecture),
        "DICOMNODE_SCP__HOST": "127.0.0.1",
        "DICOMNODE_SCP__PORT": str(port),
        "DICOMNODE_SCP__MIN_FREE_MB": "0",
        "DICOMNODE_STUDIES__IMAGING_PROCESSES": "0",
        "DICOMNODE_METRICS__PORT": str(metrics),
    }
    embedded = site / "dicomnode" / "shipped" / "conf" / "dicomnode.yaml"

    def dicomnode(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "dicomnode", *args]
        return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)

    checked = dicomnode("config")
    assert checked.returncode == 0, checked.stderr
    assert f"using the embedded default {embedded}" in checked.stderr
    assert checked.stdout.startswith(f"{embedded}: valid; ")
    for prompt_set in ("cxr", "oct", "pathology"):
        assert f"prompt set {prompt_set} " in checked.stdout

    data = tmp_path / "cxr14"
    data.mkdir()
    trained = dicomnode("train", "--modality", "cxr", "--data", str(data))
    assert trained.returncode == 2, trained.stderr
    assert (
        f"prompts_dir {site / 'dicomnode' / 'shipped' / 'prompts'} is inside the installed package"
        in trained.stderr
    )

    log = tmp_path / "serve.out"
    with open(log, "wb") as out:
        command = [sys.executable, "-m", "dicomnode", "serve"]
        node = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=120, process=node)
        health = wait_until(lambda: requests.get(f"http://127.0.0.1:{metrics}/healthz", timeout=5), 30)
        assert (health.status_code, health.text) == (200, "ok\n")
        assert (work / "var" / "journal.sqlite").is_file(), "state in ./var of the working folder"
        assert not (site / "dicomnode" / "shipped" / "var").exists(), "nothing written into the package"
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=90) == 0, log.read_text()
    finally:
        stop_process(node)
    text = log.read_text()
    assert f"state in {work / 'var'}" in text, text
    assert "Traceback" not in text, text
