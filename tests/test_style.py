"""The code stays as STYLE.md asks: ruff-clean and ruff-formatted, checked on every CI run."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "dicomnode", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )


def test_ruff_finds_nothing_to_lint():
    done = _ruff("check", "--no-cache")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_would_change_nothing():
    done = _ruff("format", "--check", "--no-cache")
    assert done.returncode == 0, done.stdout + done.stderr
