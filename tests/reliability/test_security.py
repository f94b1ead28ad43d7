"""Security: nothing from a dataset reaches a path, a shell or an eval; the commands an
administrator runs beside the node create nothing and leave the state private.

Instances whose UIDs are paths ("../../x", "1.2/../../3", "..", an absolute path, a NUL in the
middle, 200 characters) are sent over the network: each is refused with 0xC000 naming the
attribute, and nothing is written outside the state folder, nor anywhere inside it but under
UID names. Shell metacharacters in the names and descriptions of an instance with valid UIDs
are stored and processed as the text they are. The package's source is checked for calls that
would hand data to a shell, an interpreter or an unpickler.
"""

from __future__ import annotations

import ast
import copy
import stat
import warnings
from pathlib import Path

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.net.scu import Peer, store
from dicomnode.spool import is_valid_uid
from tests.conftest import (
    REPO,
    free_port,
    run_cli,
    start_node,
    stop_process,
    umask,
    wait_until,
    write_node_config,
)
from tests.reliability.conftest import assert_no_leak, node_texts, study_state, write_study
from tests.reliability.test_hostile import as_sent

#: Values of the UIDs that name the spool's and outbox's files, as a hostile sender writes them.
HOSTILE_UIDS = {
    "parent folders": "../../x",
    "a UID then parent folders": "1.2/../../3",
    "the parent folder": "..",
    "an absolute path": "/tmp/dicomnode-escaped",
    "a NUL in the middle": "1.2.3\0/../../4",
    "200 characters": "1." + "2" * 198,
}
#: A file a shell would create, where the node runs, if a dataset's text reached one.
MARKER = "dn-pwn"
#: Shell, SQL and format metacharacters, in attributes the node reads or copies into results.
SHELL = f"$(touch {MARKER})`touch {MARKER}`;touch {MARKER}|%s %(x)s{{0}}'\";--"


def _dataset_bytes(ds: pydicom.Dataset) -> bytes:
    """The dataset encoded explicit VR little endian, without file meta, values as they are."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid UIDs: they are the point
        write_dataset(buffer, ds)
    return buffer.getvalue()


def _tree(folder: Path, *, leave_out: tuple[Path, ...] = ()) -> set[Path]:
    """Every file and folder under `folder`, but those under `leave_out`."""
    return {
        path
        for path in folder.rglob("*")
        if not any(path == skip or path.is_relative_to(skip) for skip in leave_out)
    }


def test_uids_that_are_paths_are_refused_and_nothing_is_written_outside_the_state(
    tmp_path, node_factory, tally
):
    node = node_factory(studies={"quiet_period_s": 0.3, "poll_interval_s": 0.1})
    state = node.config.parent / "var"
    sent = tmp_path / "sent"
    template = write_study(sent / "template", 500, instances=1)
    source = pydicom.dcmread(template.paths[0])
    targets = {  # where each hostile UID would land if it named a file or folder
        (folder / uid).resolve()
        for uid in HOSTILE_UIDS.values()
        for folder in (state / "spool", state / "outbox", state / "incoming", state / "spool" / "1.2")
        if "\0" not in uid
    }
    existing = {target for target in targets if target.exists()}
    before = _tree(tmp_path, leave_out=(state, sent))
    markers = [folder / MARKER for folder in (Path.cwd(), tmp_path, state, state / "spool")]

    for number, (what, uid) in enumerate(HOSTILE_UIDS.items()):
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            with tally.case(f"{keyword} with {what}: refused naming the attribute"):
                ds = copy.deepcopy(source)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # pydicom warns of the invalid UID: it is the point
                    setattr(ds, keyword, uid)
                path = as_sent(
                    _dataset_bytes(ds),
                    str(ds.SOPClassUID),
                    ExplicitVRLittleEndian,
                    str(source.SOPInstanceUID) if keyword != "SOPInstanceUID" else uid,
                    sent / f"{keyword}-{number}.dcm",
                )
                (outcome,) = store(Peer("127.0.0.1", node.port, "DICOMNODE"), [path])
                assert (outcome.status, outcome.comment) == (0xC000, f"{keyword} is not a valid UID")

    with tally.case("shell metacharacters in names and descriptions: stored and processed as text"):
        shell = write_study(sent / "shell", 501, instances=1)
        ds = pydicom.dcmread(shell.paths[0])
        for keyword in ("PatientName", "SeriesDescription", "StudyDescription", "InstitutionName"):
            setattr(ds, keyword, SHELL)
        ds.save_as(shell.paths[0])
        (outcome,) = store(Peer("127.0.0.1", node.port, "DICOMNODE"), list(shell.paths))
        assert outcome.ok, outcome.comment
        tally.acknowledged += 1

        def finished() -> str | None:
            outcome = study_state(state, shell.study_instance_uid)
            return outcome in ("done", "failed", "ignored") and outcome

        assert wait_until(finished, 120, what="the study processed") == "done"

    with tally.case("hostile UIDs and names: nothing written outside the state, only UID names inside"):
        assert not any(marker.exists() for marker in markers), "a dataset's text ran in a shell"
        assert {target for target in targets if target.exists()} == existing
        assert _tree(tmp_path, leave_out=(state, sent)) == before, "written outside the state folder"
        for folder in (state / "spool", state / "outbox"):
            for path in folder.rglob("*"):
                assert path.resolve().is_relative_to(folder.resolve()), path
                name = path.name.removesuffix(".dcm").split("-", 1)[-1]
                assert is_valid_uid(name), f"{path.relative_to(state)} is not named by a UID"
        assert not any((state / "incoming").iterdir())
        assert_no_leak(node_texts(node), shell.identifiers | {SHELL})


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def test_status_and_requeue_create_no_state_folder_and_keep_a_node_state_private(
    tmp_path, tiny_architecture, tally
):
    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port())
    state = tmp_path / "var"
    commands = [
        ("status",),
        ("status", "--json"),
        ("requeue",),
        ("requeue", "--studies"),
        ("reprocess", "1.2.826.0.1.3680043.8.498.1"),
    ]
    with tally.case("status, requeue and reprocess without a state folder: none created"):
        with umask(0o000):
            outcomes = [run_cli(*command, "--config", str(config)) for command in commands]
        assert not state.exists(), f"created {sorted(_listing(state))}"
        assert [o.returncode for o in outcomes] == [0, 0, 0, 0, 1], [o.stderr for o in outcomes]
        assert "the node has not run yet" in outcomes[0].stdout

    with tally.case("status and requeue in an empty state folder: nothing created in it"):
        state.mkdir(mode=0o700)
        with umask(0o000):
            for command in commands:
                run_cli(*command, "--config", str(config))
        assert not any(state.iterdir()), sorted(_listing(state))

    with tally.case("status and requeue under umask 0: the state of a node that ran stays 0600/0700"):
        state.rmdir()
        port = free_port()
        config = write_node_config(tmp_path, tiny_architecture, scp_port=port)
        with umask(0o000):
            node = start_node(config, port)
            try:
                study = write_study(tmp_path / "sent", 502, instances=1)
                assert all(o.ok for o in store(Peer("127.0.0.1", port, "DICOMNODE"), list(study.paths)))
                tally.acknowledged += len(study.paths)
                wait_until(lambda: "done=1" in node.cli("status").stdout, 120, what="study done")
                for command in commands:
                    run_cli(*command, "--config", str(config))
            finally:
                stop_process(node.process)
        modes = _listing(state)
        assert any(name.startswith("spool/") for name in modes) and "logs/audit.log" in modes
        loose = {
            name: oct(mode)
            for name, mode in modes.items()
            if mode != (0o700 if (state / name).is_dir() else 0o600)
        }
        assert not loose, f"not private: {loose}"


#: Calls that run a program, a shell, code or an unpickler. Where the package must use one,
#: it is listed with why its arguments cannot come from a dataset.
DANGEROUS = {
    "eval",
    "exec",
    "compile",
    "__import__",
    "os.system",
    "os.popen",
    "os.execv",
    "os.execvp",
    "os.execl",
    "os.spawnv",
    "os.spawnl",
    "subprocess.run",
    "subprocess.call",
    "subprocess.check_call",
    "subprocess.check_output",
    "subprocess.Popen",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
    "pickle.load",
    "pickle.loads",
    "marshal.loads",
    "yaml.load",
    "yaml.unsafe_load",
    "shelve.open",
}
ALLOWED = {
    # `dicomnode train --nproc-per-node`: torchrun with the command's own arguments.
    ("cli.py", "subprocess.call"),
    # `dicomnode bench receive`: DCMTK's storescu sending files the benchmark wrote.
    ("bench/receive.py", "subprocess.Popen"),
}


def _called(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return ""


def test_no_dataset_value_can_reach_a_shell_an_eval_or_an_unpickler():
    package = REPO / "dicomnode"
    found, shells, unsafe_loads = set(), [], []
    for path in sorted(package.rglob("*.py")):
        module = str(path.relative_to(package))
        for node in ast.walk(ast.parse(path.read_text(), filename=module)):
            if not isinstance(node, ast.Call):
                continue
            called = _called(node)
            keywords = {k.arg: k.value for k in node.keywords}
            if called in DANGEROUS:
                found.add((module, called))
            if "shell" in keywords and not (
                isinstance(keywords["shell"], ast.Constant) and keywords["shell"].value is False
            ):
                shells.append(f"{module}:{node.lineno}")
            if called == "torch.load" and not (
                isinstance(keywords.get("weights_only"), ast.Constant)
                and keywords["weights_only"].value is True
            ):
                unsafe_loads.append(f"{module}:{node.lineno}")
    assert found <= ALLOWED, f"new calls to review: {sorted(found - ALLOWED)}"
    assert not shells, f"shell=True: {shells}"
    assert not unsafe_loads, f"torch.load without weights_only=True unpickles code: {unsafe_loads}"
