"""The README's administrator's guide, run: the Orthanc auto-forward script and the Prometheus
configuration and alert rules are taken from the README as written, so the guide cannot drift
from what works. Orthanc, DCMTK and promtool (Debian package prometheus) are the real tools.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from tests.conftest import (
    REPO,
    dcmtk,
    free_port,
    orthanc_forwarding_to_node,
    stop_process,
    wait_until,
)

README = REPO / "README.md"


def guide_block(language: str, starts_with: str) -> str:
    """The README's fenced block in `language` whose text starts with `starts_with`."""
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)
    found = [block for block in blocks if block.startswith(starts_with)]
    assert len(found) == 1, f"README: {len(found)} {language} blocks start with {starts_with!r}"
    return found[0]


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed (Debian package prometheus); .ci/run installs it")
    return subprocess.run([binary, *args], input=stdin, capture_output=True, text=True, timeout=60)


def test_the_guides_prometheus_configuration_and_alert_rules_pass_promtool(tmp_path):
    (tmp_path / "prometheus.yml").write_text(guide_block("yaml", "rule_files:"))
    (tmp_path / "dicomnode-rules.yml").write_text(guide_block("yaml", "groups:"))

    checked = promtool("check", "config", str(tmp_path / "prometheus.yml"))

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout + checked.stderr


def test_the_guides_orthanc_script_forwards_radiographs_and_never_the_nodes_results(
    tmp_path, node_factory, chest_cr
):
    node_port = free_port()
    pacs = orthanc_forwarding_to_node(
        tmp_path, guide_block("lua", "-- Forward what dicomnode classifies"), node_port
    )
    try:
        node = node_factory(destinations=[pacs.destination(backoff_s=0.5)], port=node_port)
        ct = Path(get_testdata_file("CT_small.dcm"))
        for path in (chest_cr, ct):  # as modalities send to the PACS
            sent = dcmtk(
                "storescu", "-aet", "CR1", "-aec", pacs.ae_title, "127.0.0.1", str(pacs.dicom_port), str(path)
            )
            assert sent.returncode == 0, sent.stderr
        study_uid = str(pydicom.dcmread(chest_cr, stop_before_pixels=True).StudyInstanceUID)
        [study] = requests.post(
            f"{pacs.url}/tools/find",
            json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}},
            timeout=10,
        ).json()
        wait_until(
            lambda: len(pacs.get(f"/studies/{study}/instances").json()) == 3, 90, what="SR and SC back"
        )
        time.sleep(3)  # time for a forward of the results, had the script let one through

        logs = node.config.parent / "var" / "logs"
        audit = (logs / "audit.log").read_text()
        assert "own result not stored" not in audit, "the script kept the results from going back"
        assert audit.count("association accepted") == 1, "the CT was not forwarded, the results not sent back"
        assert (logs / "dicomnode.log").read_text().count("processed with prompt set cxr") == 1
        with sqlite3.connect(f"file:{logs.parent / 'journal.sqlite'}?mode=ro", uri=True) as journal:
            assert journal.execute("SELECT state FROM studies").fetchall() == [("done",)]

        metrics = requests.get(node.metrics_url + "/metrics", timeout=10).text
        linted = promtool("check", "metrics", stdin=metrics)
        assert linted.returncode == 0, linted.stdout + linted.stderr
    finally:
        stop_process(pacs.process)
