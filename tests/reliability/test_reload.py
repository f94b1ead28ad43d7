"""A prompt set replaced while studies are in flight, then a broken replacement: nothing lost.

The node serves a learned chest prompt set (version 1). While a study is processed on it,
an administrator moves a new version's folder into place (prompts/cxr/2/): the library
loads, checks and swaps it in. The study in work finishes on version 1, every study processed
after the swap uses version 2, and each report names the version (its sha256 and its version
string) it was made with, the one the log names when its processing started. Then a version
whose tensors file is garbage (prompts/cxr/3/) is refused with its reason logged, and version
2 keeps serving. Every study is reported once in Orthanc.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
from contextlib import closing

import pydicom

from dicomnode.model.promptset import TENSORS_FILE
from dicomnode.net.scu import Peer, store
from dicomnode.privacy import uid_tag
from tests.conftest import (
    free_port,
    routing_for,
    start_node,
    stop_process,
    tiny_backbone,
    wait_until,
    write_node_config,
)
from tests.prompt_sets import VPT_DEEP, spec, write_prompt_set
from tests.reliability.conftest import SentStudy, assert_no_leak, node_texts, study_state, write_study
from tests.reliability.test_faults import _check_reported_once, _reports, _settled
from tests.test_end_to_end import _sr_text

#: Instances of the study in work when the new version arrives: it must not finish before the
#: test holds it (a second here), so that it is in work for certain.
IN_WORK = 100


def _version_of(sr: pydicom.Dataset, versions: dict[str, str]) -> str:
    """The one version (by name, from {name: sha256}) that the report names, with its version string."""
    text = _sr_text(sr)
    named = [name for name, sha256 in versions.items() if f"sha256 {sha256}" in text]
    assert len(named) == 1, f"the report names {len(named)} prompt set versions"
    assert any(word.startswith(f"{named[0]}+node") for word in text.split()), "no version string"
    return named[0]


def test_a_prompt_set_replaced_mid_run_serves_later_studies_and_a_broken_one_is_refused(
    tmp_path, orthanc, tiny_architecture, tally
):
    backbone = tiny_backbone(tiny_architecture)
    prompts, staged = tmp_path / "prompts", tmp_path / "staged"
    content = spec("cxr", "vpt", backbone, section=VPT_DEEP)
    first = write_prompt_set(prompts / "cxr", {**content, "version": "1"}, backbone, seed=1)
    second = write_prompt_set(staged / "cxr" / "2", {**content, "version": "2"}, backbone, seed=2)
    shutil.copytree(staged / "cxr" / "2", staged / "cxr" / "3")
    (staged / "cxr" / "3" / "promptset.yaml").write_text(
        (staged / "cxr" / "2" / "promptset.yaml").read_text().replace("'2'", "'3'")
    )
    (staged / "cxr" / "3" / TENSORS_FILE).write_bytes(b"not a safetensors file" * 100)
    versions = {"1": first.sha256, "2": second.sha256}
    del backbone

    port = free_port()
    config = write_node_config(
        tmp_path,
        tiny_architecture,
        scp_port=port,
        prompts_dir=str(prompts),
        routing=str(routing_for(tmp_path, "cxr")),
        destinations=[orthanc.destination(backoff_s=0.2, max_backoff_s=1.0)],
        studies={"quiet_period_s": 0.5, "poll_interval_s": 0.1},
    )
    state = tmp_path / "var"
    peer = Peer("127.0.0.1", port, "DICOMNODE", timeout_s=30)
    sent: list[SentStudy] = []

    def send(study: SentStudy) -> SentStudy:
        outcomes = store(peer, list(study.paths), calling_ae="MODALITY")
        assert all(o.ok for o in outcomes), [o.comment for o in outcomes]
        tally.acknowledged += len(outcomes)
        sent.append(study)
        return study

    node = start_node(config, port)
    try:
        with tally.case("prompt set replaced while a study is processed: it finishes on its version"):
            before = send(write_study(tmp_path / "sent", 600))
            wait_until(lambda: _settled(state, 1), 120, what="the first study done on version 1")
            large = write_study(tmp_path / "sent", 601, instances=IN_WORK)
            send(large)
            tag = uid_tag(large.study_instance_uid)
            wait_until(
                lambda: study_state(state, large.study_instance_uid) == "processing",
                120,
                0.02,
                what="claimed",
            )
            # Held where it records its results (a write lock on the journal, as a slow disk or an
            # administrator's sqlite3 session would hold it), the study stays in work for certain
            # while the new version is moved in and swapped.
            with closing(sqlite3.connect(state / "journal.sqlite", timeout=30, isolation_level=None)) as db:
                db.execute("BEGIN IMMEDIATE")
                wait_until(
                    lambda: f"study {tag}: processing with prompt set cxr version 1" in node.log.read_text(),
                    20,
                    what="the study in work on version 1",
                )
                os.rename(staged / "cxr" / "2", prompts / "cxr" / "2")  # as an administrator moves it in
                wait_until(
                    lambda: "prompt set cxr reloaded: version 2" in node.log.read_text(), 20, what="reload"
                )
                assert study_state(state, large.study_instance_uid) == "processing"
                db.execute("ROLLBACK")
            after = [send(write_study(tmp_path / "sent", n)) for n in (602, 603)]

        with tally.case("a broken replacement (garbage tensors) is refused with its reason, v2 serves on"):
            os.rename(staged / "cxr" / "3", prompts / "cxr" / "3")
            refusal = wait_until(
                lambda: re.search(r"prompt set cxr: version in 3 not usable: (.*)", node.log.read_text()),
                60,
                what="the refusal logged",
            )
            assert "not a readable safetensors file" in refusal.group(1)
            after.append(send(write_study(tmp_path / "sent", 604)))

        with tally.case("each study reported once, on the version it started with, named in its report"):
            wait_until(lambda: _settled(state, len(sent)), 300, 0.5, what="every study done and sent")
            reports = _reports(orthanc)
            log = node.log.read_text()
            used = {}
            for study in sent:
                srs = reports[study.study_instance_uid]
                _check_reported_once(study, srs, complete_before_kill=True)
                used[study.study_instance_uid] = _version_of(srs[0], versions)
                named = f"study {uid_tag(study.study_instance_uid)}: processing with prompt set cxr version "
                started = re.findall(re.escape(named) + r"(\S+)", log)
                assert started == [used[study.study_instance_uid]], started
            assert used[before.study_instance_uid] == "1"
            assert used[large.study_instance_uid] == "1", "the study in work changed version"
            assert [used[s.study_instance_uid] for s in after] == ["2", "2", "2"]
            assert_no_leak(node_texts(node), set().union(*(s.identifiers for s in sent)))
    finally:
        stop_process(node.process)
