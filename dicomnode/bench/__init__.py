"""Benchmarks that print ratios against a reference measured in the same run, never timed tests.

`receive`: the SCP and spool against DCMTK's storescp. `infer`: each prompting method against
the bare backbone on the same device. `train`: prompt learning against full fine-tuning.
`study`: receipt-to-SR latency of the whole node against the engine alone. The port helpers
here serve the benchmarks that start receivers of their own.
"""

import json
import socket
import time
from pathlib import Path


class BenchError(RuntimeError):
    """A benchmark cannot run here (a tool is missing, a peer failed); says which."""


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port; BenchError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} after {timeout} s")


def write_json(document: dict, path: Path) -> None:
    """Write a benchmark's figures for later comparison (README tables, regressions)."""
    path.write_text(json.dumps(document, indent=2) + "\n")
