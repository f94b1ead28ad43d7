"""Prompt sets swap atomically while the node runs, and a bad new version never serves."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from watchdog.events import (
    DirCreatedEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
)

from dicomnode.model.library import SETTLE_S, PromptSetLibrary, is_change
from dicomnode.model.promptset import PromptSet, PromptSetError
from tests.conftest import REPO, wait_until


@pytest.fixture
def prompts(tmp_path) -> Path:
    folder = tmp_path / "prompts"
    shutil.copytree(REPO / "prompts" / "cxr", folder / "cxr")
    return folder


def _retune(prompts: Path, threshold: str) -> None:
    """Rewrite the first class's threshold, as an administrator recalibrating would."""
    path = prompts / "cxr" / "promptset.yaml"
    text = path.read_text()
    path.write_text(text.replace("threshold: 0.5}", f"threshold: {threshold}}}", 1))


def test_a_changed_prompt_set_is_swapped_in_with_its_new_hash(prompts):
    library = PromptSetLibrary(prompts, ["cxr"])
    before = library.get("cxr")

    _retune(prompts, "0.7")

    assert library.refresh("cxr") is True
    after = library.get("cxr")
    assert after.sha256 != before.sha256
    assert after.findings[0].threshold == 0.7


def test_an_unchanged_folder_is_not_reloaded(prompts):
    library = PromptSetLibrary(prompts, ["cxr"])

    assert library.refresh("cxr") is False


def test_an_invalid_new_version_is_refused_and_the_last_good_one_keeps_serving(prompts, caplog):
    library = PromptSetLibrary(prompts, ["cxr"])
    good = library.get("cxr")

    (prompts / "cxr" / "promptset.yaml").write_text("name: cxr\nclasses: [half written")

    assert library.refresh("cxr") is False
    assert library.get("cxr") is good
    assert "new version refused, still serving 0.1.0" in caplog.text


def test_a_version_the_check_refuses_does_not_serve(prompts):
    seen: list[PromptSet] = []

    def check(prompt_set: PromptSet) -> None:
        seen.append(prompt_set)
        if len(seen) > 1:
            raise ValueError("made for another backbone")

    library = PromptSetLibrary(prompts, ["cxr"], check=check)
    good = library.get("cxr")
    _retune(prompts, "0.9")

    assert library.refresh("cxr") is False
    assert library.get("cxr") is good


def test_an_unusable_prompt_set_stops_start_up(prompts):
    (prompts / "cxr" / "promptset.yaml").write_text("name: cxr\n")

    with pytest.raises(PromptSetError, match="promptset.yaml: version: Field required"):
        PromptSetLibrary(prompts, ["cxr"])


def test_the_watcher_reloads_a_prompt_set_after_its_folder_changes(prompts):
    library = PromptSetLibrary(prompts, ["cxr"])
    library.watch()
    try:
        _retune(prompts, "0.65")
        wait_until(lambda: library.get("cxr").findings[0].threshold == 0.65, 15, what="reload")
    finally:
        library.stop()


def _version(prompts: Path, name: str, threshold: str) -> Path:
    """A learned version of the cxr set in prompts/cxr/<name>/ (a copy with one threshold changed)."""
    folder = prompts / "cxr" / name
    folder.mkdir()
    text = (prompts / "cxr" / "promptset.yaml").read_text()
    (folder / "promptset.yaml").write_text(text.replace("threshold: 0.5}", f"threshold: {threshold}}}", 1))
    return folder


def test_the_newest_valid_version_serves_and_hidden_runs_never_do(prompts):
    _version(prompts, "20261101-080000", "0.31")
    _version(prompts, "20261120-080000", "0.32")
    _version(prompts, ".20261125-080000.partial", "0.33")

    library = PromptSetLibrary(prompts, ["cxr"])

    assert library.get("cxr").folder.name == "20261120-080000"
    assert library.get("cxr").findings[0].threshold == 0.32


def test_a_broken_newest_version_is_passed_over_for_the_one_before(prompts, caplog):
    _version(prompts, "20261101-080000", "0.31")
    broken = _version(prompts, "20261120-080000", "0.32")
    (broken / "promptset.yaml").write_text("name: cxr\n")

    library = PromptSetLibrary(prompts, ["cxr"])

    assert library.get("cxr").folder.name == "20261101-080000"
    assert "version in 20261120-080000 not usable" in caplog.text


def test_a_pinned_version_serves_even_when_a_newer_one_exists(prompts):
    _version(prompts, "20261101-080000", "0.31")
    _version(prompts, "20261120-080000", "0.32")

    library = PromptSetLibrary(prompts, ["cxr"], pins={"cxr": "20261101-080000"})

    assert library.get("cxr").findings[0].threshold == 0.31


def test_a_new_version_folder_is_picked_up_by_refresh(prompts):
    library = PromptSetLibrary(prompts, ["cxr"])
    before = library.get("cxr").sha256
    _version(prompts, "20261125-080000", "0.4")

    assert library.refresh("cxr")
    assert library.get("cxr").sha256 != before
    assert library.get("cxr").folder.name == "20261125-080000"


def test_reading_a_folder_is_no_change_writing_moving_or_creating_one_is():
    assert not is_change(FileOpenedEvent("/p/cxr/promptset.yaml"))
    assert not is_change(FileClosedNoWriteEvent("/p/cxr/promptset.yaml"))
    for event in (
        FileModifiedEvent("/p/cxr/promptset.yaml"),
        FileClosedEvent("/p/cxr/promptset.yaml"),
        FileMovedEvent("/p/.staged", "/p/cxr/2"),
        DirCreatedEvent("/p/cxr/2"),
    ):
        assert is_change(event), event


def test_a_broken_version_is_refused_once_not_each_time_the_library_reads_its_folder(prompts, caplog):
    library = PromptSetLibrary(prompts, ["cxr"])
    library.watch()
    try:
        broken = _version(prompts, "20261125-080000", "0.4")
        (broken / "promptset.yaml").write_text("name: cxr\n")
        wait_until(lambda: "not usable" in caplog.text, 15, what="the refusal")
        # Reading the broken version raised open events in its folder: they must not reload it.
        time.sleep(6 * SETTLE_S)
    finally:
        library.stop()
    assert caplog.text.count("version in 20261125-080000 not usable") == 1, caplog.text
