"""Fixtures shared by the rooms' tests: a tiny seeded backbone, configs, real peers.

Real peers only: Orthanc is started as the PACS on free loopback ports, the node runs as
`python -m dicomnode serve`, and DCMTK's tools send to it. The backbone is a tiny open_clip
architecture defined here, with seeded random weights, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parent.parent

#: A CLIP small enough for two CPU cores: 64 px input, two layers per tower.
TINY_ARCHITECTURE = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on TCP `port` (/proc/net/tcp and tcp6)."""
    listening = {
        fields[9]
        for table in ("/proc/net/tcp", "/proc/net/tcp6")
        for fields in (line.split() for line in Path(table).read_text().splitlines()[1:])
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A"  # 0A: TCP_LISTEN
    }
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with suppress(FileNotFoundError):  # closed meanwhile
            held.add(os.readlink(fd))
    return any(f"socket:[{inode}]" in held for inode in listening)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value, which is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached after {timeout} s")


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block under this process umask, as a service or a shell with that umask would."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture(scope="session")
def tiny_architecture(tmp_path_factory) -> Path:
    """An open_clip JSON config for the tiny test backbone; its stem is the architecture name."""
    path = tmp_path_factory.mktemp("arch") / "tinyclip.json"
    path.write_text(json.dumps(TINY_ARCHITECTURE))
    return path


def tiny_backbone(architecture: Path, seed: int = 7):
    """The tiny test backbone on the CPU with seeded random weights (seed 7, as the node configs)."""
    from dicomnode.config import ModelConfig
    from dicomnode.model.backbone import load_backbone

    return load_backbone(
        ModelConfig(architecture=architecture.stem, architecture_config=architecture, seed=seed, device="cpu")
    )


@pytest.fixture(scope="session")
def chest_cr() -> Path:
    """A real computed radiograph of the chest (MONOCHROME1, 1955x1841) from pydicom-data."""
    return Path(get_testdata_file("RG1_UNCI.dcm"))


def write_node_config(
    folder: Path,
    architecture: Path,
    *,
    scp_port: int,
    destinations: list[dict] | None = None,
    **overrides,
) -> Path:
    """A dicomnode.yaml for tests: tiny backbone, short quiet period, the repo's routing."""
    config = {
        "state_dir": str(folder / "var"),
        "prompts_dir": str(REPO / "prompts"),
        "routing": str(REPO / "conf" / "routing.yaml"),
        "log_level": "INFO",
        # One receiving process, not serve's auto: tests read the node's logs right after an
        # exchange, and a receiver's records reach them through the node a moment later.
        # Receiving processes are tested where asked for (test_receivers, the reliability
        # tests); auto by the packaging test, which serves the embedded default.
        "scp": {
            "host": "127.0.0.1",
            "port": scp_port,
            "ae_title": "DICOMNODE",
            "min_free_mb": 0,
            "receivers": 1,
        },
        "studies": {"quiet_period_s": 1.0, "poll_interval_s": 0.2},
        "model": {"architecture": architecture.stem, "architecture_config": str(architecture), "seed": 7},
        "destinations": destinations or [],
        # A port of its own: several nodes run side by side in one test.
        "metrics": {"host": "127.0.0.1", "port": free_port()},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    path = folder / "dicomnode.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def routing_for(folder: Path, *prompt_sets: str) -> Path:
    """The shipped routing rules, less those naming a prompt set other than `prompt_sets`.

    For nodes that serve a prompts folder of their own holding only those sets.
    """
    rules = yaml.safe_load((REPO / "conf" / "routing.yaml").read_text())["rules"]
    kept = [rule for rule in rules if rule.get("prompt_set") in (None, *prompt_sets)]
    path = folder / "routing.yaml"
    path.write_text(yaml.safe_dump({"rules": kept}))
    return path


@dataclass
class Orthanc:
    """A running Orthanc: the PACS of the tests, checked through its REST API."""

    http_port: int
    dicom_port: int
    ae_title: str
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str):
        response = requests.get(self.url + path, timeout=10)
        response.raise_for_status()
        return response

    @property
    def dicomweb_url(self) -> str:
        """The base URL of its DICOMweb plugin (started with dicomweb=True)."""
        return self.url + "/dicom-web"

    def instances(self) -> list[str]:
        return self.get("/instances").json()

    def destination(self, **extra) -> dict:
        return {
            "name": "orthanc",
            "host": "127.0.0.1",
            "port": self.dicom_port,
            "ae_title": self.ae_title,
            **extra,
        }


#: Where Debian's orthanc-dicomweb puts the DICOMweb plugin.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def start_orthanc(
    folder: Path,
    dicom_port: int | None = None,
    modalities: dict | None = None,
    http_port: int | None = None,
    dicomweb: bool = False,
    **settings,
) -> Orthanc:
    """Start Orthanc on free loopback ports with its database under `folder`.

    `modalities` is Orthanc's DicomModalities: the nodes it may send to, {name: [AET, host, port]}.
    `dicomweb` loads its DICOMweb plugin (STOW-RS at `Orthanc.dicomweb_url`).
    `settings` are further Orthanc configuration options (e.g. LuaScripts, RegisteredUsers).
    """
    binary = shutil.which("Orthanc")
    if binary is None:
        pytest.fail("Orthanc is not installed (Debian package orthanc); .ci/run installs it")
    if dicomweb and not DICOMWEB_PLUGIN.is_file():
        pytest.fail("Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = http_port or free_port(), dicom_port or free_port()
    if dicomweb:
        plugin = {"Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        settings = plugin | settings
    config = {
        "Name": "dicomnode-test-pacs",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "HttpsCACertificates": "",
        "Plugins": [],
        "StableAge": 1,
        "DicomModalities": modalities or {},
        **settings,
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(http_port, process=process)
    wait_for_port(dicom_port, process=process)
    return Orthanc(http_port, dicom_port, "ORTHANC", process)


def orthanc_forwarding_to_node(folder: Path, lua: str, node_port: int) -> Orthanc:
    """An Orthanc running the Lua script `lua` (an auto-forward rule), the node its modality "dicomnode"."""
    script = folder / "forward.lua"
    script.write_text(lua)
    return start_orthanc(
        folder / "pacs",
        modalities={"dicomnode": ["DICOMNODE", "127.0.0.1", node_port]},
        LuaScripts=[str(script)],
    )


def stop_process(process: subprocess.Popen) -> None:
    """Terminate politely, then kill."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def orthanc(tmp_path) -> Iterator[Orthanc]:
    """A fresh Orthanc for one test."""
    server = start_orthanc(tmp_path / "orthanc")
    yield server
    stop_process(server.process)


@dataclass
class RunningNode:
    """`dicomnode serve` running as a real process."""

    config: Path
    port: int
    process: subprocess.Popen
    log: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return run_cli(*args, "--config", str(self.config))

    @property
    def metrics_url(self) -> str:
        """Where its /metrics and /healthz are served."""
        metrics = yaml.safe_load(self.config.read_text())["metrics"]
        return f"http://{metrics['host']}:{metrics['port']}"


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run the dicomnode command line in a subprocess, as an administrator would."""
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", *args], capture_output=True, text=True, timeout=120, check=check
    )


def start_node(config: Path, port: int, env: dict[str, str] | None = None) -> RunningNode:
    """Start `dicomnode serve` (with `env` added to its environment) and wait until its SCP listens.

    Its own SCP: the receivers of a node killed just before may hold the port for a second
    more (their node gone, they stop), so the port accepting is not enough; the socket
    listening on it must be the new node's."""
    log = config.parent / "node.out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def listening() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"node exited with {process.returncode} before listening on {port}")
        return listens(process.pid, port)

    try:
        wait_until(listening, timeout=120, interval=0.1, what="the node's SCP listening")
        wait_for_port(port, timeout=120, process=process)
    except Exception:
        stop_process(process)
        raise AssertionError(f"node did not start:\n{log.read_text()}") from None
    return RunningNode(config, port, process, log)


@pytest.fixture
def node_factory(tmp_path, tiny_architecture) -> Iterator:
    """Start nodes on demand; all are stopped at the end of the test."""
    started: list[RunningNode] = []

    def factory(destinations: list[dict] | None = None, port: int | None = None, **overrides) -> RunningNode:
        port = port or free_port()
        config = write_node_config(
            tmp_path, tiny_architecture, scp_port=port, destinations=destinations, **overrides
        )
        node = start_node(config, port)
        started.append(node)
        return node

    yield factory
    for node in started:
        stop_process(node.process)


def dcmtk(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a DCMTK tool; fails the test if DCMTK is not installed."""
    binary = shutil.which(tool)
    if binary is None:
        pytest.fail(f"{tool} is not installed (Debian package dcmtk); .ci/run installs it")
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout, env=env)


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of dicom3tools' dciodvfy report on `path` that start with "Error"."""
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.fail("dciodvfy is not installed (Debian package dicom3tools); .ci/run installs it")
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
