"""The administrator's commands that need no running node: config, route, status, echo, send.

Each command runs through the real typer app (in this process, for speed, or as
`python -m dicomnode` where the working directory or the environment matters) against real
files and real peers: Orthanc as the PACS and DCMTK's `storescp`. Exit codes are part of the
contract: 0 success, 1 the peer or a file failed, 2 the command cannot run as given.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import load_routing
from dicomnode.privacy import uid_tag
from dicomnode.routing import Ignored, route_study
from dicomnode.spool import Spool
from dicomnode.spool.journal import SCHEMA_VERSION
from tests.conftest import (
    REPO,
    Orthanc,
    dciodvfy_errors,
    free_port,
    start_orthanc,
    stop_process,
    tiny_backbone,
    umask,
    wait_for_port,
    wait_until,
    write_node_config,
)

CHEST = "RG1_UNCR.dcm"
EXTREMITY = "RG3_UNCR.dcm"
CT = "CT_small.dcm"
JPEG_BASELINE = "SC_rgb_jpeg_dcmtk.dcm"  # JPEG baseline: storescp's default contexts refuse it
CT_SOP_INSTANCE_UID = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"


def shipped_file(name: str) -> Path:
    """Path of a shipped test file; fails, never downloads, if pydicom-data is missing."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} missing: install the test extra (pydicom-data)"
    return Path(path)


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str


def cli(*args: str | Path) -> Outcome:
    """Run `dicomnode ARGS...` through the real typer app, in this process."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Outcome(result.exit_code, result.stdout, result.stderr)


def cli_process(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> Outcome:
    """Run `python -m dicomnode ARGS...` as a process, as an administrator's shell would."""
    environment = {k: v for k, v in os.environ.items() if k != "DICOMNODE_CONFIG"} | (env or {})
    done = subprocess.run(
        [sys.executable, "-m", "dicomnode", *map(str, args)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


#: The routing of these tests, so that the expected output does not follow conf/routing.yaml.
ROUTING = """
rules:
  - name: chest-radiograph
    match: {Modality: [CR, DX], BodyPartExamined: [CHEST]}
    prompt_set: cxr
  - name: extremity
    match: {BodyPartExamined: [EXTREMITY]}
    ignore: no prompt set for extremities
"""


#: A patient the tests chose: a value of theirs in an output was put there by the node.
PATIENT = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-884422",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.424242",
}

#: Rules, added after ROUTING's, that read each attribute of PATIENT and never match it, so
#: that routing compares the patient's values and must still keep them out of its reasons.
PATIENT_RULES = """
  - {name: patient-name, match: {PatientName: [Nobody^Known]}, prompt_set: cxr}
  - {name: patient-id, match: {PatientID: [NOBODY]}, prompt_set: cxr}
  - {name: study, match: {StudyInstanceUID: ['1.2.3']}, prompt_set: cxr}
"""

#: Why ROUTING + PATIENT_RULES routes PATIENT's CT nowhere.
PATIENT_CT_REASON = (
    "no rule matched (chest-radiograph: Modality is CT, rule wants CR|DX; "
    "extremity: BodyPartExamined is absent, rule wants EXTREMITY; "
    "patient-name: PatientName is a value that does not match, rule wants Nobody^Known; "
    "patient-id: PatientID is a value that does not match, rule wants NOBODY; "
    "study: StudyInstanceUID is a value that does not match, rule wants 1.2.3)"
)


def ct_of_patient(folder: Path) -> Path:
    """pydicom's CT_small as a study of PATIENT, written as a modality sends it."""
    ds = pydicom.dcmread(shipped_file(CT))
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    path = folder / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def node_config(tmp_path, tiny_architecture) -> Path:
    """A test dicomnode.yaml: tiny backbone, the repository's prompt sets, ROUTING."""
    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port())
    with_routing(config, ROUTING)
    return config


def with_routing(config: Path, rules_yaml: str) -> Path:
    """Point `config` at a routing.yaml written next to it with these rules."""
    routing = config.parent / "routing.yaml"
    routing.write_text(rules_yaml)
    content = yaml.safe_load(config.read_text())
    content["routing"] = str(routing)
    config.write_text(yaml.safe_dump(content))
    return routing


# -- dicomnode config ----------------------------------------------------------------------------


def test_config_accepts_a_valid_configuration_and_says_the_model_is_a_demo(node_config, tiny_architecture):
    outcome = cli("config", "--config", node_config)

    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.stdout == (
        f"{node_config}: valid; 2 routing rules; model {tiny_architecture.stem} "
        "(no checkpoint: DEMO model, no clinical meaning)\n"
        "  prompt set cxr 0.1.0: zeroshot, 0 learned parameters\n"
    )


def test_config_with_a_checkpoint_names_its_file_and_sha256(node_config, tiny_architecture, tmp_path):
    import hashlib

    import torch

    checkpoint = tmp_path / "weights.pt"
    torch.save(tiny_backbone(tiny_architecture).model.state_dict(), checkpoint)
    content = yaml.safe_load(node_config.read_text())
    content["model"]["checkpoint"] = str(checkpoint)
    node_config.write_text(yaml.safe_dump(content))

    outcome = cli("config", "--config", node_config)

    assert outcome.exit_code == 0, outcome.stderr
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    first = outcome.stdout.splitlines()[0]
    assert first.endswith(f"model {tiny_architecture.stem} from {checkpoint} (sha256 {sha256})")
    assert "DEMO" not in outcome.stdout


def _with_prompts(config: Path, prompts: Path) -> None:
    content = yaml.safe_load(config.read_text())
    content["prompts_dir"] = str(prompts)
    config.write_text(yaml.safe_dump(content))


def test_config_names_each_served_sets_method_and_learned_parameters(
    node_config, tiny_architecture, tmp_path
):
    from tests.prompt_sets import VPT_DEEP, spec, write_prompt_set

    backbone = tiny_backbone(tiny_architecture)
    write_prompt_set(tmp_path / "prompts" / "cxr", spec("cxr", "vpt", backbone, section=VPT_DEEP), backbone)
    _with_prompts(node_config, tmp_path / "prompts")

    outcome = cli("config", "--config", node_config)

    assert outcome.exit_code == 0, outcome.stderr
    # Two lung boxes at grids 8 and 2, four deep tokens on two 64-wide layers, a 32 -> 3 head.
    learned = 2 * 3 * (64 + 4) + 2 * 4 * 64 + 32 * 3 + 3
    assert outcome.stdout.endswith(f"  prompt set cxr 1: vpt, {learned:,} learned parameters\n")


def test_config_refuses_a_set_learned_on_other_weights_naming_both(node_config, tiny_architecture, tmp_path):
    from tests.prompt_sets import DPT, spec, write_prompt_set

    other = tiny_backbone(tiny_architecture, seed=3)
    write_prompt_set(tmp_path / "prompts" / "cxr", spec("cxr", "dpt", other, section=DPT), other)
    _with_prompts(node_config, tmp_path / "prompts")

    outcome = cli("config", "--config", node_config)

    assert outcome.exit_code == 2
    assert "prompt set cxr was trained on random DEMO weights (seed 3), the node runs" in outcome.stderr
    assert "(seed 7)" in outcome.stderr


def test_config_without_option_checks_the_embedded_default_of_the_checkout():
    outcome = cli_process("config", cwd=REPO)

    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.stdout.startswith("conf/dicomnode.yaml: valid; ")


def test_config_reads_the_file_named_by_dicomnode_config_variable(node_config, tmp_path):
    outcome = cli_process("config", cwd=tmp_path, env={"DICOMNODE_CONFIG": str(node_config)})

    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.stdout.startswith(f"{node_config}: valid")


def test_config_without_option_elsewhere_checks_the_embedded_default_and_says_so(tmp_path, tiny_architecture):
    tiny = {
        "DICOMNODE_MODEL__ARCHITECTURE": tiny_architecture.stem,
        "DICOMNODE_MODEL__ARCHITECTURE_CONFIG": str(tiny_architecture),
    }
    outcome = cli_process("config", cwd=tmp_path, env=tiny)

    assert outcome.exit_code == 0, outcome.stderr
    embedded = REPO / "conf" / "dicomnode.yaml"
    assert f"no conf/dicomnode.yaml here: using the embedded default {embedded}" in outcome.stderr
    assert outcome.stdout.startswith(f"{embedded}: valid; ")


def test_config_error_exits_2_naming_file_and_key(node_config):
    content = yaml.safe_load(node_config.read_text())
    content["scp"]["ae_title"] = "A_TITLE_TOO_LONG_X"
    node_config.write_text(yaml.safe_dump(content))

    outcome = cli("config", "--config", node_config)

    assert outcome.exit_code == 2
    assert outcome.stdout == ""
    assert outcome.stderr.startswith("configuration error:\n")
    assert f"{node_config}: scp.ae_title: " in outcome.stderr


def test_config_missing_file_exits_2_naming_it(tmp_path):
    outcome = cli("config", "--config", tmp_path / "absent.yaml")

    assert outcome.exit_code == 2
    assert f"{tmp_path / 'absent.yaml'}: cannot read configuration" in outcome.stderr


def test_config_invalid_routing_exits_2_naming_routing_file_and_rule_key(node_config):
    routing = with_routing(node_config, "rules: [{name: r, match: {BodyPart: CHEST}, prompt_set: cxr}]\n")

    outcome = cli("config", "--config", node_config)

    assert outcome.exit_code == 2
    assert f"{routing}: rules.0.match.BodyPart: in 'r': not a DICOM attribute keyword" in outcome.stderr


def test_config_rule_naming_a_missing_prompt_set_exits_2_naming_routing_file_and_rule(node_config):
    routing = with_routing(
        node_config, "rules: [{name: r, match: {Modality: CR}, prompt_set: cxr},\n"
        "        {name: s, match: {Modality: CT}, prompt_set: no-such-set}]\n",
    )  # fmt: skip

    outcome = cli("config", "--config", node_config)

    assert outcome.exit_code == 2
    assert (
        f"{routing}: rules.1.prompt_set: no prompt set 'no-such-set' in {REPO / 'prompts'} (there: cxr,"
        in outcome.stderr
    )


def test_config_reports_every_problem_at_once_each_with_file_and_key(node_config, tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    routing = with_routing(
        node_config, "rules: [{name: s, match: {Modality: CT}, prompt_set: no-such-set}]\n"
    )
    not_a_certificate = tmp_path / "ca.crt"
    not_a_certificate.write_text("not a certificate\n")
    content = yaml.safe_load(node_config.read_text())
    content["destinations"] = [
        {
            "name": "pacs",
            "host": "pacs",
            "port": 2762,
            "ae_title": "PACS",
            "tls": {"ca_certificates": str(not_a_certificate)},
        },
        {"name": "web", "stow_url": "https://pacs/dicom-web", "auth": {"bearer": {"env": "NO_SUCH_TOKEN"}}},
    ]
    node_config.write_text(yaml.safe_dump(content))

    outcome = cli("config", "--config", node_config)

    assert outcome.exit_code == 2
    problems = outcome.stderr.splitlines()
    assert problems[0] == "configuration error:"
    assert problems[1].startswith(f"{node_config}: destinations.0.tls.ca_certificates: {not_a_certificate}")
    assert problems[2].startswith(
        f"{node_config}: destinations.1.auth.bearer.env: environment variable NO_SUCH_TOKEN"
    )
    assert problems[3].startswith(f"{routing}: rules.0.prompt_set: no prompt set 'no-such-set'")


def test_config_ignore_rules_need_no_prompt_set(node_config):
    with_routing(node_config, "rules: [{name: r, match: {Modality: CT}, ignore: no CT model}]\n")

    assert cli("config", "--config", node_config).exit_code == 0


# -- dicomnode route -----------------------------------------------------------------------------


def test_route_prints_the_decision_and_reason_for_each_file(node_config):
    chest, limb, ct = shipped_file(CHEST), shipped_file(EXTREMITY), shipped_file(CT)

    outcome = cli("route", chest, limb, ct, "--config", node_config)

    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.stdout.splitlines() == [
        f"{chest}: cxr: rule 'chest-radiograph' matched",
        f"{limb}: (ignored): rule 'extremity': no prompt set for extremities",
        f"{ct}: (ignored): no rule matched (chest-radiograph: Modality is CT, rule wants CR|DX; "
        "extremity: BodyPartExamined is absent, rule wants EXTREMITY)",
    ]


def test_route_never_prints_the_patient_data_of_a_file(node_config, tmp_path):
    with_routing(node_config, ROUTING + PATIENT_RULES)
    patient_ct = ct_of_patient(tmp_path)

    outcome = cli(
        "route",
        shipped_file(CHEST),
        shipped_file(EXTREMITY),
        shipped_file(CT),
        patient_ct,
        "--config",
        node_config,
    )

    assert outcome.exit_code == 0, outcome.stderr
    assert f"{patient_ct}: (ignored): {PATIENT_CT_REASON}" in outcome.stdout.splitlines()
    for value in ("CompressedSamples", *PATIENT.values()):  # CT_small's patient, and ours
        assert value not in outcome.stdout + outcome.stderr, value


def test_route_as_a_calling_ae_title(node_config):
    with_routing(node_config, "rules: [{name: ward, match: {CallingAETitle: WARD_CR}, prompt_set: cxr}]\n")
    ct = shipped_file(CT)

    routed = cli("route", ct, "--calling-ae", "WARD_CR", "--config", node_config)
    other = cli("route", ct, "--config", node_config)

    assert routed.stdout == f"{ct}: cxr: rule 'ward' matched\n"
    assert (
        other.stdout
        == f"{ct}: (ignored): no rule matched (ward: CallingAETitle is absent, rule wants WARD_CR)\n"
    )


def test_route_unreadable_file_exits_1_after_routing_the_others(node_config, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM")
    missing = tmp_path / "missing.dcm"
    chest = shipped_file(CHEST)

    outcome = cli("route", text, chest, missing, "--config", node_config)

    assert outcome.exit_code == 1
    assert outcome.stdout == f"{chest}: cxr: rule 'chest-radiograph' matched\n"
    assert f"{text}: unreadable: " in outcome.stderr
    assert f"{missing}: unreadable: " in outcome.stderr


def test_route_with_invalid_routing_exits_2_naming_the_rule(node_config):
    routing = with_routing(
        node_config, "rules: [{name: both, match: {Modality: CR}, prompt_set: cxr, ignore: x}]\n"
    )

    outcome = cli("route", shipped_file(CHEST), "--config", node_config)

    assert outcome.exit_code == 2
    assert f"{routing}: rules.0: " in outcome.stderr


# -- dicomnode status ----------------------------------------------------------------------------


def state_dir_of(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["state_dir"])


def test_status_before_the_node_ever_ran_says_so_and_creates_nothing(node_config):
    state_dir = state_dir_of(node_config)

    outcome = cli("status", "--config", node_config)

    assert outcome.exit_code == 0
    assert outcome.stdout == f"no journal in {state_dir}: the node has not run yet\n"
    assert not state_dir.exists()


def table_row(stdout: str, first_cell: str) -> list[str]:
    """The cells of the table row of `dicomnode status` whose first cell is `first_cell`."""
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{stdout}")


def test_status_of_an_empty_journal_shows_the_empty_queues_and_no_problems(tmp_path, tiny_architecture):
    destination = {"name": "pacs", "host": "127.0.0.1", "port": 104, "ae_title": "PACS"}
    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port(), destinations=[destination])
    Spool(state_dir_of(config)).close()

    outcome = cli("status", "--config", config)

    assert outcome.exit_code == 0
    lines = outcome.stdout.splitlines()
    assert lines[0].startswith(f"node DICOMNODE ({config}): health not answering at http://127.0.0.1:")
    # destination, pending, failing for, sent, dead, last error
    assert table_row(outcome.stdout, "pacs") == ["pacs", "0", "", "0", "0", ""]
    assert "Last 10 studies" in outcome.stdout
    assert lines[-1] == "no problems"


def journal_ct_study(config: Path, study_uid: str, **outcome) -> Spool:
    """A CT study received and finished (`finish_study(**outcome)`) in the config's journal."""
    spool = Spool(state_dir_of(config))
    spool.store(
        shipped_file(CT).read_bytes(),
        sop_instance_uid=f"{study_uid}.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=study_uid,
        series_instance_uid=f"{study_uid}.2",
        calling_ae="CT_SCANNER",
    )
    study = spool.claim_quiet_study(0.0, now=float("inf"))
    assert study is not None
    spool.finish_study(study, **outcome)
    return spool


def journal_ignored_study(config: Path, instance: Path) -> Spool:
    """`instance` received into the config's journal and its study routed nowhere, as by the node.

    Stored under the UIDs the file carries, as the SCP stores it; routed by the config's
    routing.yaml; journaled as ignored with the reason routing gave.
    """
    ds = pydicom.dcmread(instance, stop_before_pixels=True)
    spool = Spool(state_dir_of(config))
    spool.store(
        instance.read_bytes(),
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        calling_ae="CT_SCANNER",
    )
    study = spool.claim_quiet_study(0.0, now=float("inf"))
    assert study is not None
    routing = load_routing(Path(yaml.safe_load(config.read_text())["routing"]))
    outcome = route_study(routing, study.study_instance_uid, spool.instances(study.study_instance_uid))
    assert isinstance(outcome, Ignored), outcome
    spool.finish_study(study, state="ignored", reason=outcome.reason)
    return spool


def test_status_lists_an_ignored_study_by_hashed_uid_only(node_config, tmp_path):
    with_routing(node_config, ROUTING + PATIENT_RULES)
    journal_ignored_study(node_config, ct_of_patient(tmp_path)).close()

    outcome = cli("status", "--config", node_config)

    assert outcome.exit_code == 0
    tag = uid_tag(PATIENT["StudyInstanceUID"])
    assert table_row(outcome.stdout, tag)[1:3] == ["ignored", "not routed"]
    lines = outcome.stdout.splitlines()
    assert lines[1:4] == ["studies: ignored=1", "outbox: none", "instances: stored=1"]
    assert lines[-2:] == ["recent problems:", f"  study ignored study {tag}: {PATIENT_CT_REASON}"]
    for value in PATIENT.values():
        assert value not in outcome.stdout, value


def test_status_with_invalid_configuration_exits_2(tmp_path):
    config = tmp_path / "dicomnode.yaml"
    config.write_text("state_dir: [not, a, path]\n")

    outcome = cli("status", "--config", config)

    assert outcome.exit_code == 2
    assert f"{config}: state_dir: " in outcome.stderr


# -- real peers ----------------------------------------------------------------------------------


@dataclass
class StoreScp:
    """DCMTK's storescp on a free loopback port, writing what it receives to `folder`."""

    port: int
    folder: Path
    process: subprocess.Popen

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


def start_storescp(folder: Path, *options: str) -> StoreScp:
    binary = shutil.which("storescp")
    if binary is None:
        pytest.fail("storescp is not installed (Debian package dcmtk); .ci/run installs it")
    folder.mkdir(parents=True)
    port = free_port()
    process = subprocess.Popen(
        [binary, "--aetitle", "STORESCP", "--output-directory", str(folder), *options, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, timeout=30, process=process)
    return StoreScp(port, folder, process)


@pytest.fixture
def storescp(tmp_path) -> Iterator[StoreScp]:
    """A fresh storescp per test: it names files by SOP Instance UID, so resends overwrite."""
    server = start_storescp(tmp_path / "storescp")
    yield server
    stop_process(server.process)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Iterator[Orthanc]:
    """One Orthanc for the module: it is slow to stop, and these tests only add to it."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    stop_process(server.process)


def stored_in(pacs: Orthanc) -> set[str]:
    """SOP Instance UIDs of everything Orthanc holds."""
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.get("/instances?expand").json()}


@pytest.fixture
def unreachable_port() -> int:
    return free_port()


def test_echo_to_orthanc_exits_0_and_prints_the_status(pacs):
    outcome = cli("echo", "127.0.0.1", pacs.dicom_port, "--aec", pacs.ae_title, "--timeout", 10)

    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.stdout == f"C-ECHO ORTHANC@127.0.0.1:{pacs.dicom_port}: status 0x0000\n"


def test_echo_to_storescp_exits_0(storescp):
    outcome = cli("echo", "127.0.0.1", storescp.port, "--aec", "STORESCP", "--timeout", 10)

    assert outcome.exit_code == 0, outcome.stderr


def test_echo_with_a_called_ae_title_orthanc_does_not_have_exits_1_saying_rejected(pacs):
    outcome = cli("echo", "127.0.0.1", pacs.dicom_port, "--aec", "NOT_ORTHANC", "--timeout", 10)

    assert outcome.exit_code == 1
    assert (
        outcome.stderr == f"echo failed: NOT_ORTHANC@127.0.0.1:{pacs.dicom_port} rejected the association\n"
    )


def test_echo_to_a_port_nobody_listens_on_exits_1_naming_the_peer(unreachable_port):
    outcome = cli("echo", "127.0.0.1", unreachable_port, "--aec", "PACS", "--timeout", 5)

    assert outcome.exit_code == 1
    assert outcome.stderr.startswith(
        f"echo failed: PACS@127.0.0.1:{unreachable_port} did not accept an association"
    )


@pytest.mark.parametrize("port", ["0", "65536"])
def test_echo_to_a_port_out_of_range_is_a_usage_error(port):
    outcome = cli("echo", "127.0.0.1", port)

    assert outcome.exit_code == 2
    assert "Invalid value for 'port'" in outcome.stderr


@pytest.mark.parametrize("option", ["--aet", "--aec"])
def test_echo_with_an_invalid_ae_title_exits_2_without_a_traceback(option, unreachable_port):
    outcome = cli("echo", "127.0.0.1", unreachable_port, option, "SEVENTEEN_CHARS_X")

    assert outcome.exit_code == 2
    assert outcome.stderr.startswith("cannot echo: ")
    assert "SEVENTEEN_CHARS_X" in outcome.stderr


def test_send_files_and_folders_to_orthanc_stores_each_instance(pacs, tmp_path):
    folder = tmp_path / "study"
    (folder / "series").mkdir(parents=True)
    shutil.copy(shipped_file(CT), folder / "series" / "ct.dcm")
    shutil.copy(shipped_file(EXTREMITY), folder / "limb.dcm")
    chest = shipped_file(CHEST)
    sent = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        for p in (chest, shipped_file(CT), shipped_file(EXTREMITY))
    }

    outcome = cli(
        "send", "127.0.0.1", pacs.dicom_port, chest, folder, "--aec", pacs.ae_title, "--timeout", 30
    )

    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr
    assert outcome.stdout.splitlines() == [
        f"{chest}: 0x0000",
        f"{folder / 'limb.dcm'}: 0x0000",
        f"{folder / 'series' / 'ct.dcm'}: 0x0000",
        "3 sent, 0 failed",
    ]
    wait_until(lambda: sent <= stored_in(pacs), 30, what="the three instances in Orthanc")


def _send_folder(pacs: Orthanc, folder: Path, stderr) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dicomnode", "send", "127.0.0.1", str(pacs.dicom_port), str(folder)]
    return subprocess.run(
        [*command, "--aec", pacs.ae_title], stdout=subprocess.PIPE, stderr=stderr, timeout=120
    )


def test_send_of_a_folder_shows_a_progress_bar_on_a_terminal_and_none_in_a_pipe(pacs, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    folder = tmp_path / "study"
    folder.mkdir()
    for name in (CT, EXTREMITY, CHEST):
        shutil.copy(shipped_file(name), folder / f"{name}.dcm")
    terminal, stderr = pty.openpty()
    # A terminal of 24 rows and 100 columns: a fresh pty has none, and tqdm would draw nothing.
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))

    on_terminal = _send_folder(pacs, folder, stderr)
    os.close(stderr)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    in_a_pipe = _send_folder(pacs, folder, subprocess.PIPE)

    assert on_terminal.returncode == 0 and in_a_pipe.returncode == 0
    assert re.search(rb"send: +\d+%.*\| *\d/3 \[", shown), shown
    assert on_terminal.stdout == in_a_pipe.stdout, "the results on stdout are the same"
    assert in_a_pipe.stderr == b""


def test_send_with_a_called_ae_title_orthanc_does_not_have_exits_1_and_stores_nothing(pacs):
    before = len(pacs.instances())

    outcome = cli("send", "127.0.0.1", pacs.dicom_port, shipped_file(CT), "--aec", "NOT_ORTHANC")

    assert outcome.exit_code == 1
    assert (
        outcome.stderr == f"send failed: NOT_ORTHANC@127.0.0.1:{pacs.dicom_port} rejected the association\n"
    )
    assert len(pacs.instances()) == before


def test_send_to_storescp_stores_the_instance(storescp):
    outcome = cli("send", "127.0.0.1", storescp.port, shipped_file(CT), "--aec", "STORESCP")

    assert outcome.exit_code == 0, outcome.stdout + outcome.stderr
    assert outcome.stdout.endswith("1 sent, 0 failed\n")
    assert [p.name for p in storescp.received()] == [f"CT.{CT_SOP_INSTANCE_UID}"]


def test_send_of_a_file_the_peer_refuses_exits_1_and_the_others_still_go(storescp):
    refused, accepted = shipped_file(JPEG_BASELINE), shipped_file(CT)

    outcome = cli("send", "127.0.0.1", storescp.port, refused, accepted, "--aec", "STORESCP")

    assert outcome.exit_code == 1
    lines = outcome.stdout.splitlines()
    assert lines[0].startswith(f"{refused}: no status ")
    assert lines[1:] == [f"{accepted}: 0x0000", "1 sent, 1 failed"]
    assert [p.name for p in storescp.received()] == [f"CT.{CT_SOP_INSTANCE_UID}"]


def test_send_to_a_peer_that_never_answers_reports_every_file_as_failed(tmp_path):
    # --abort-after: storescp drops the C-STORE response, so the store runs into --timeout.
    silent = start_storescp(tmp_path / "received", "--abort-after")
    try:
        outcome = cli("send", "127.0.0.1", silent.port, shipped_file(CT), shipped_file(CHEST), "--timeout", 2)
    finally:
        stop_process(silent.process)

    assert outcome.exit_code == 1
    first, second, summary = outcome.stdout.splitlines()
    assert first.startswith(f"{shipped_file(CT)}: no status ")
    assert second.startswith(f"{shipped_file(CHEST)}: no status ")
    assert summary == "0 sent, 2 failed"


def test_send_to_a_port_nobody_listens_on_exits_1_naming_the_peer(unreachable_port):
    outcome = cli("send", "127.0.0.1", unreachable_port, shipped_file(CT), "--aec", "PACS", "--timeout", 5)

    assert outcome.exit_code == 1
    assert outcome.stderr.startswith(
        f"send failed: PACS@127.0.0.1:{unreachable_port} did not accept an association"
    )


def test_send_of_a_missing_file_exits_2_before_connecting(tmp_path, unreachable_port):
    missing = tmp_path / "missing.dcm"

    outcome = cli("send", "127.0.0.1", unreachable_port, missing)

    assert outcome.exit_code == 2
    assert outcome.stderr.startswith("cannot send: ")
    assert str(missing) in outcome.stderr


def test_send_of_a_file_that_is_not_dicom_exits_2_and_sends_nothing(storescp, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not DICOM")

    outcome = cli("send", "127.0.0.1", storescp.port, shipped_file(CT), notes, "--aec", "STORESCP")

    assert outcome.exit_code == 2
    assert outcome.stderr.startswith("cannot send: ")
    assert storescp.received() == []


def test_send_of_an_empty_folder_exits_2_saying_there_is_nothing_to_send(tmp_path, unreachable_port):
    (tmp_path / "empty").mkdir()

    outcome = cli("send", "127.0.0.1", unreachable_port, tmp_path / "empty")

    assert outcome.exit_code == 2
    assert outcome.stderr == "no files to send\n"


def test_send_to_a_port_out_of_range_is_a_usage_error():
    outcome = cli("send", "127.0.0.1", "70000", shipped_file(CT))

    assert outcome.exit_code == 2
    assert "Invalid value for 'port'" in outcome.stderr


def test_requeue_puts_dead_deliveries_back_and_refuses_an_unknown_destination(tmp_path, tiny_architecture):
    destination = {"name": "pacs", "host": "127.0.0.1", "port": 104, "ae_title": "PACS"}
    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port(), destinations=[destination])
    result = state_dir_of(config) / "outbox" / "sr.dcm"
    spool = journal_ct_study(
        config, "1.2.826.0.1.3680043.8.498.78", state="done", deliveries=[("pacs", result)]
    )
    spool.delivery_failed(spool.next_delivery("pacs"), "PACS@127.0.0.1:104 rejected", retry_at=None)
    spool.close()

    unknown = cli("requeue", "--config", config, "--destination", "archive")
    assert unknown.exit_code == 2
    assert "no destination 'archive'" in unknown.stderr

    outcome = cli("requeue", "--config", config, "--destination", "pacs")
    assert outcome.exit_code == 0
    assert outcome.stdout == "1 dead deliveries requeued\n"
    assert table_row(cli("status", "--config", config).stdout, "pacs")[1:5:3] == ["1", "0"]  # pending, dead


def test_status_and_requeue_from_a_permissive_shell_leave_the_journal_private(tmp_path, tiny_architecture):
    destination = {"name": "pacs", "host": "127.0.0.1", "port": 104, "ae_title": "PACS"}
    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port(), destinations=[destination])
    state_dir = state_dir_of(config)
    with umask(0o000):  # private by the journal's own opener and folder modes, not by a umask
        spool = journal_ct_study(
            config,
            "1.2.826.0.1.3680043.8.498.79",
            state="done",
            deliveries=[("pacs", state_dir / "outbox" / "sr.dcm")],
        )
        spool.delivery_failed(spool.next_delivery("pacs"), "PACS@127.0.0.1:104 rejected", retry_at=None)
        spool.close()

    with umask(0o022):  # an administrator's shell
        status = cli("status", "--config", config)
        requeue = cli("requeue", "--config", config)
        # The -wal and -shm these commands' connections created, if they are still open.
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state_dir.glob("journal.sqlite*")}

    assert status.exit_code == 0 and table_row(status.stdout, "pacs")[4] == "1"  # dead
    assert requeue.stdout == "1 dead deliveries requeued\n"
    assert "journal.sqlite" in modes
    assert set(modes.values()) == {0o600}, modes
    for folder in (state_dir, state_dir / "spool", state_dir / "outbox"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def schema_of(journal: Path) -> tuple[int, list[tuple[str, str]]]:
    """The journal's schema version and table definitions, read through a connection of its own."""
    with closing(sqlite3.connect(journal)) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        return version, sorted(db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL"))


def test_status_and_requeue_change_neither_the_schema_nor_the_files_of_the_journal(
    tmp_path, tiny_architecture
):
    destination = {"name": "pacs", "host": "127.0.0.1", "port": 104, "ae_title": "PACS"}
    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port(), destinations=[destination])
    state_dir = state_dir_of(config)
    journal = state_dir / "journal.sqlite"
    spool = journal_ct_study(
        config,
        "1.2.826.0.1.3680043.8.498.82",
        state="done",
        deliveries=[("pacs", state_dir / "outbox" / "a")],
    )
    spool.delivery_failed(spool.next_delivery("pacs"), "PACS@127.0.0.1:104 rejected", retry_at=None)
    spool.close()
    for folder in ("spool", "incoming", "outbox"):
        shutil.rmtree(state_dir / folder)
    before, mode = schema_of(journal), stat.S_IMODE(journal.stat().st_mode)

    assert cli("status", "--config", config).exit_code == 0
    assert cli("status", "--config", config, "--json").exit_code == 0
    assert cli("requeue", "--config", config).stdout == "1 dead deliveries requeued\n"

    assert schema_of(journal) == before
    assert stat.S_IMODE(journal.stat().st_mode) == mode
    assert sorted(p.name for p in state_dir.iterdir()) == [
        "journal.sqlite",
        "journal.sqlite-shm",
        "journal.sqlite-wal",
        "journal.sqlite-writer",  # the node's, not the commands'
        "studies.lock",  # the node's too
    ]


def test_status_and_requeue_leave_a_journal_of_another_schema_version_as_it_is(tmp_path, tiny_architecture):
    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port())
    journal = state_dir_of(config) / "journal.sqlite"
    Spool(state_dir_of(config)).close()
    with closing(sqlite3.connect(journal)) as db:  # as version 1 wrote it: no reports, no first_failed_at
        db.executescript(
            "DROP TABLE reports; ALTER TABLE outbox DROP COLUMN first_failed_at; PRAGMA user_version=1;"
        )
    before = schema_of(journal)

    status, requeue = cli("status", "--config", config), cli("requeue", "--config", config)

    for outcome in (status, requeue):
        assert outcome.exit_code == 2
        expected = f"the journal {journal} has schema version 1, this dicomnode reads version "
        assert expected + str(SCHEMA_VERSION) in outcome.stderr
    assert schema_of(journal) == before


def test_status_shows_queues_and_last_studies_with_route_outcome_and_timing(tmp_path, tiny_architecture):
    destination = {"name": "pacs", "host": "127.0.0.1", "port": 104, "ae_title": "PACS"}
    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port(), destinations=[destination])
    outbox = state_dir_of(config) / "outbox"
    study = "1.2.826.0.1.3680043.8.498.83"
    spool = journal_ct_study(
        config,
        study,
        state="done",
        prompt_set="cxr",
        deliveries=[("pacs", outbox / "sr"), ("pacs", outbox / "sc")],
    )
    spool.delivery_sent(spool.next_delivery("pacs"))
    spool.delivery_failed(spool.next_delivery("pacs"), "PACS@127.0.0.1:104 [down]", retry_at=2e9)
    spool.close()

    outcome = cli("status", "--config", config)

    assert outcome.exit_code == 0, outcome.stderr
    pending, failing, sent, dead, error = table_row(outcome.stdout, "pacs")[1:]
    assert (pending, sent, dead, error) == ("1", "1", "0", "PACS@127.0.0.1:104 [down]")
    assert failing.endswith(" s")
    tag, outcome_, route, received, took, delivered = table_row(outcome.stdout, uid_tag(study))
    assert (outcome_, route, delivered) == ("done", "cxr", "1/2")
    assert took.endswith(" s") and received[:2] == "20"
    assert study not in outcome.stdout


def test_requeue_studies_puts_failed_studies_back_naming_them_by_hashed_uid(tmp_path, tiny_architecture):
    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port())
    failed, done = "1.2.826.0.1.3680043.8.498.80", "1.2.826.0.1.3680043.8.498.81"
    journal_ct_study(config, failed, state="failed", reason="ImagingError: no pixels").close()
    journal_ct_study(config, done, state="done").close()

    both = cli("requeue", "--config", config, "--studies", "--destination", "pacs")
    outcome = cli("requeue", "--config", config, "--studies")

    assert both.exit_code == 2
    assert outcome.exit_code == 0
    assert outcome.stdout == f"1 failed studies requeued\n  study {uid_tag(failed)}\n"
    spool = Spool(state_dir_of(config))
    assert (spool.study(failed).state, spool.study(done).state) == ("receiving", "done")
    spool.close()
    assert cli("requeue", "--config", config, "--studies").stdout == "0 failed studies requeued\n"


def test_reprocess_queues_finished_studies_again_and_names_them_only_by_hashed_uid(
    tmp_path, tiny_architecture
):
    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port())
    state_dir = state_dir_of(config)
    done, unknown = "1.2.826.0.1.3680043.8.498.82", "1.2.826.0.1.3680043.8.498.83"
    with umask(0o000):  # private by the journal's own opener, not by a umask
        journal_ct_study(config, done, state="done").close()

    with umask(0o022):
        outcome = cli("reprocess", done, unknown, "--config", config)
        again = cli("reprocess", done, "--config", config)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state_dir.glob("journal.sqlite*")}

    assert outcome.exit_code == 1
    assert outcome.stdout == f"study {uid_tag(done)}: was done, queued to be processed again\n"
    assert "not in the journal" in outcome.stderr and uid_tag(unknown) in outcome.stderr
    assert again.exit_code == 0
    assert again.stdout == f"study {uid_tag(done)}: already waiting to be processed\n"
    for text in (outcome.stdout, outcome.stderr, again.stdout):
        assert done not in text and unknown not in text
    assert set(modes.values()) == {0o600}, modes
    spool = Spool(state_dir)
    assert spool.study(done).state == "receiving"
    spool.close()


def test_reprocess_refuses_an_argument_that_is_not_a_uid(node_config):
    outcome = cli("reprocess", "1.2.3", "Doe^John", "--config", node_config)

    assert outcome.exit_code == 2
    assert "argument 2 is not a valid Study Instance UID" in outcome.stderr
    assert "Doe" not in outcome.stderr


# -- infer ---------------------------------------------------------------------------------------


def test_infer_prints_every_finding_of_a_routed_chest_and_why_the_others_were_not_classified(
    node_config, tmp_path
):
    out = tmp_path / "results"

    outcome = cli("infer", shipped_file(CHEST), shipped_file(CT), "--config", node_config, "--out", out)

    assert outcome.exit_code == 0, outcome.stderr
    assert "DEMO model (random weights): these numbers have NO clinical meaning" in outcome.stderr
    lines = outcome.stdout.splitlines()
    assert f"{shipped_file(CT)}: not classified: no rule matched" in outcome.stdout
    start = lines.index(f"{shipped_file(CHEST)}: prompt set cxr")
    rows = lines[start + 1 : start + 15]
    assert [row.split()[0] for row in rows][:3] == ["Atelectasis", "Cardiomegaly", "Effusion"]
    assert all(row.split()[2] in ("PRESENT", "absent") for row in rows)
    written = sorted(out.rglob("*.dcm"))
    assert [p.name[:3] for p in written] == ["sc-", "sr-"]
    assert all(not dciodvfy_errors(p) for p in written)


def test_infer_with_a_forced_prompt_set_says_why_imaging_refused_a_ct_and_exits_1(node_config):
    outcome = cli("infer", shipped_file(CT), "--prompt-set", "cxr", "--config", node_config)

    assert outcome.exit_code == 1
    assert "not classified: Modality (0008,0060) 'CT' is not a projection radiograph" in outcome.stdout


def test_infer_with_an_unknown_prompt_set_exits_2_naming_its_file(node_config):
    outcome = cli("infer", shipped_file(CHEST), "--prompt-set", "nosuchset", "--config", node_config)

    assert outcome.exit_code == 2
    assert "nosuchset/promptset.yaml: cannot read prompt set" in outcome.stderr


def test_status_json_gives_monitoring_the_same_counts_and_problems(node_config):
    import json

    assert json.loads(cli("status", "--config", node_config, "--json").stdout) == {"journal": False}
    journal_ct_study(
        node_config,
        "1.2.826.0.1.3680043.8.498.92",
        state="ignored",
        reason="no rule matched (cxr: Modality is CT)",
    ).close()

    report = json.loads(cli("status", "--config", node_config, "--json").stdout)

    assert report == {
        "journal": True,
        "studies": {"ignored": 1},
        "outbox": {},
        "instances": {"stored": 1},
        "problems": [
            {
                "kind": "study ignored",
                "study": uid_tag("1.2.826.0.1.3680043.8.498.92"),
                "reason": "no rule matched (cxr: Modality is CT)",
            }
        ],
    }
