"""Logs for log shippers and SIEMs: JSON lines (`log_format: json`) and the audit to syslog.

The node runs as a real process; syslog is a real socket in the test's folder (a Unix datagram
socket, as /dev/log is) or on loopback UDP, read the way rsyslog reads it.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomnode.config import AuditConfig, load_config
from dicomnode.logs import JsonLinesFormatter, syslog_handler
from dicomnode.privacy import uid_tag
from tests.conftest import dcmtk, free_port, run_cli, wait_until, write_node_config

JSON_KEYS = {"time", "level", "logger", "message", "thread"}


@pytest.fixture
def syslog_socket(tmp_path) -> Iterator[tuple[socket.socket, Path]]:
    """A Unix datagram socket standing in for /dev/log."""
    path = tmp_path / "log.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(30)
    yield server, path
    server.close()


def _json_lines(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path} is empty"
    return [json.loads(line) for line in lines]


def test_json_log_format_writes_one_object_per_line_to_stderr_and_the_files(node_factory):
    node = node_factory(log_format="json")
    assert dcmtk("echoscu", "-aec", "NOTUS", "127.0.0.1", str(node.port)).returncode != 0

    logs = node.config.parent / "var" / "logs"
    # Ready once its receiving processes are, a moment after its own SCP listens.
    wait_until(lambda: "dicomnode ready" in (logs / "dicomnode.log").read_text(), what="ready")
    for records in (_json_lines(node.log), _json_lines(logs / "dicomnode.log")):
        assert all(set(record) >= JSON_KEYS for record in records)
        assert any(r["message"].startswith("dicomnode ready") and r["level"] == "INFO" for r in records)
        assert any(r["message"].startswith("start-up objects exempt from garbage") for r in records)
    [rejected] = [r for r in _json_lines(logs / "audit.log") if "association rejected" in r["message"]]
    assert rejected["logger"] == "dicomnode.audit"
    assert "called AE title 'NOTUS' is not ours" in rejected["message"]


def test_a_traceback_stays_inside_its_json_record():
    try:
        raise ValueError("a bad value")
    except ValueError:
        record = logging.LogRecord("dicomnode.x", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
        record.exc_info = sys.exc_info()

    line = JsonLinesFormatter().format(record)

    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed here" and entry["level"] == "ERROR"
    assert entry["exception"].startswith("Traceback") and "ValueError: a bad value" in entry["exception"]
    assert entry["time"].endswith("+00:00")


def test_the_audit_goes_to_syslog_as_well_as_to_audit_log(node_factory, syslog_socket):
    server, path = syslog_socket
    node = node_factory(audit={"syslog": True, "address": str(path), "facility": "local3"})

    assert dcmtk("echoscu", "-aec", "NOTUS", "127.0.0.1", str(node.port)).returncode != 0

    messages = []
    while not any("association rejected" in m for m in messages):
        messages.append(server.recv(65536).decode("utf-8"))
    [rejected] = [m for m in messages if "association rejected" in m]
    # <PRI> = facility local3 (19) * 8 + severity warning (4) or info (6), then the tag.
    assert rejected.split(">", 1)[0] in ("<156", "<158")
    assert rejected.split(">", 1)[1].startswith("dicomnode-audit: ")
    assert "called AE title 'NOTUS' is not ours" in rejected
    audit = (node.config.parent / "var" / "logs" / "audit.log").read_text()
    assert "called AE title 'NOTUS' is not ours" in audit


def test_audit_to_syslog_over_udp():
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(10)
    handler = syslog_handler(AuditConfig(syslog=True, address=f"udp://127.0.0.1:{server.getsockname()[1]}"))
    try:
        handler.emit(
            logging.LogRecord("dicomnode.audit", logging.INFO, __file__, 1, "association accepted", (), None)
        )
        assert (
            server.recv(65536) == b"<38>dicomnode-audit: INFO association accepted\x00"
        )  # auth (4) * 8 + info
    finally:
        handler.close()
        server.close()


def test_an_unreachable_syslog_socket_stops_start_up_naming_the_key(tmp_path, tiny_architecture):
    absent = tmp_path / "no-such.sock"
    config = write_node_config(
        tmp_path, tiny_architecture, scp_port=free_port(), audit={"syslog": True, "address": str(absent)}
    )

    done = run_cli("serve", "--config", str(config))

    assert done.returncode == 2
    assert f"{config}: audit.address: cannot reach syslog at {absent}" in done.stderr


@pytest.mark.parametrize(
    ("audit", "message"),
    [
        ({"address": "siem:514"}, "audit.address: Value error, give a socket path such as /dev/log"),
        ({"address": "udp://siem"}, "audit.address: Value error, give udp://host:port"),
        ({"facility": "kitchen"}, "audit.facility: Value error, unknown syslog facility"),
    ],
)
def test_a_bad_audit_setting_names_its_key(tmp_path, tiny_architecture, audit, message):
    config = write_node_config(tmp_path, tiny_architecture, scp_port=free_port(), audit=audit)

    with pytest.raises(ValueError, match=message):
        load_config(config)


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_stored_instances_are_counted_per_association_and_listed_one_by_one_only_when_debugging(
    node_factory, tmp_path, level
):
    """A CT study of 2,000 slices must not write 2,000 lines at INFO: the association's audit line
    counts what it stored. At DEBUG each instance has its line, tagged, never with its UID."""
    from dicomnode.bench.receive import make_instances

    (tmp_path / "in").mkdir()
    slices = make_instances(Path(get_testdata_file("CT_small.dcm")), 3, tmp_path / "in")
    node = node_factory(log_level=level)
    sent = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), *map(str, slices))
    assert sent.returncode == 0, sent.stderr
    logs = node.config.parent / "var" / "logs"
    wait_until(
        lambda: "association released" in (logs / "audit.log").read_text(),
        what="the association's audit line",
    )
    assert "stored=3 refused=0" in (logs / "audit.log").read_text()
    lines = [line for line in (logs / "dicomnode.log").read_text().splitlines() if "stored instance" in line]
    uids = [pydicom.dcmread(path).SOPInstanceUID for path in slices]
    if level == "INFO":
        assert lines == []
    else:
        assert len(lines) == 3
        assert all(any(uid_tag(uid) in line for line in lines) for uid in uids)
    assert not any(uid in (logs / "dicomnode.log").read_text() for uid in uids)
