"""Monitoring: systemd notify and watchdog, Prometheus metrics, /healthz, alerts, the units.

The node tests run `dicomnode serve` as a process, as systemd would: a unix datagram socket
bound here stands in for systemd's NOTIFY_SOCKET, DCMTK sends, Orthanc receives, and /metrics
and /healthz are read over HTTP as Prometheus and a probe would.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from dicomnode.config import load_config
from dicomnode.health import Heartbeat, Liveness, Unreachable, Watchdog
from dicomnode.notify import SystemdNotifier
from tests.conftest import (
    REPO,
    dcmtk,
    free_port,
    routing_for,
    run_cli,
    start_node,
    stop_process,
    wait_until,
    write_node_config,
)
from tests.test_end_to_end import _variant


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class NotifySocket:
    """systemd's side of the notify protocol: a datagram socket and every message it received."""

    def __init__(self) -> None:
        # A short folder: a unix socket path must fit in 108 bytes, pytest's tmp_path may not.
        self.folder = Path(tempfile.mkdtemp(prefix="dn-notify-"))
        self.path = str(self.folder / "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.socket.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def received(self, key: str, value: str | None = None, since: float = 0.0) -> list[float]:
        """When each message carrying `key` (with `value`, if given) arrived, after `since`."""
        return [
            at
            for at, fields in list(self.messages)
            if at > since and key in fields and (value is None or fields[key] == value)
        ]

    def statuses(self) -> list[str]:
        return [fields["STATUS"] for _, fields in list(self.messages) if "STATUS" in fields]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self.socket.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def notify() -> NotifySocket:
    listener = NotifySocket()
    yield listener
    listener.close()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, by name and sorted labels, parsed as Prometheus parses it."""
    response = requests.get(url + "/metrics", timeout=10)
    response.raise_for_status()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def scrape_until(url: str, name: str, expected: float, timeout: float = 90, **labels: str) -> dict:
    """The samples of the first scrape in which `name{labels}` has the expected value."""
    return wait_until(
        lambda: value(m := scrape(url), name, **labels) == expected and m,
        timeout,
        what=f"{name}{labels} == {expected}",
    )


def healthz(url: str) -> requests.Response:
    return requests.get(url + "/healthz", timeout=10)


# -- heartbeats, alerts and the notify protocol, in-process -----------------------------------


def test_an_idle_stage_is_never_stuck_and_a_step_past_the_limit_is():
    clock = FakeClock()
    worker = Heartbeat("outbox-pacs", clock=clock)
    liveness = Liveness(stuck_after_s=10)
    liveness.track([worker])

    clock.now += 3600  # idle for an hour, waiting for work
    assert liveness.stuck() == {}
    with worker.step():
        clock.now += 9
        assert liveness.stuck() == {}
        clock.now += 2
        assert liveness.stuck() == {"outbox-pacs": 11}
    assert liveness.stuck() == {}, "a finished step is no longer stuck"


def test_an_accept_loop_that_stops_going_round_is_stuck():
    clock = FakeClock()
    scp = Heartbeat("scp", always_working=True, clock=clock)
    liveness = Liveness(stuck_after_s=5)
    liveness.track([scp])
    for _ in range(20):
        clock.now += 0.5
        scp.beat()
    assert liveness.stuck() == {}
    clock.now += 6
    assert liveness.stuck() == {"scp": 6}


def test_an_unreachable_destination_is_alerted_once_per_outage(caplog):
    clock = FakeClock()
    unreachable = Unreachable(["pacs", "archive"], after_s=60, clock=clock)
    caplog.set_level(logging.INFO, logger="dicomnode.health")

    for _ in range(10):  # a retry every 10 s: one WARNING when the limit passes, not one per retry
        unreachable.record("pacs", "pending")
        unreachable.record("archive", "sent")
        clock.now += 10
        unreachable.check()
    alerts = [r for r in caplog.records if "ALERT destination" in r.getMessage()]
    assert [(r.levelname, r.getMessage().split(":")[0]) for r in alerts] == [
        ("WARNING", "ALERT destination pacs unreachable")
    ]
    assert set(unreachable.unreachable()) == {"pacs"}

    unreachable.record("pacs", "sent")
    assert unreachable.unreachable() == {}
    assert "destination pacs reachable again after 100 s" in caplog.text
    unreachable.record("pacs", "dead")
    clock.now += 61
    unreachable.check()
    assert caplog.text.count("ALERT destination pacs unreachable") == 2, "a new outage is alerted again"


def test_notifier_sends_readiness_status_and_pings_to_the_notify_socket(notify):
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "4000000"})
    assert notifier.watchdog_interval_s == 2.0
    notifier.ready("serving")
    notifier.watchdog()
    notifier.status("two\nlines")
    notifier.stopping()
    wait_until(lambda: len(notify.messages) == 4, 10, what="four messages")
    assert [fields for _, fields in notify.messages] == [
        {"READY": "1", "STATUS": "serving"},
        {"WATCHDOG": "1"},
        {"STATUS": "two lines"},
        {"STOPPING": "1", "STATUS": "stopping"},
    ]
    notifier.close()


def test_notifier_reaches_an_abstract_socket_and_pings_only_the_process_the_watchdog_is_for():
    name = f"dicomnode-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        other = SystemdNotifier.from_environment(
            {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
        )
        assert other.watchdog_interval_s is None, "WATCHDOG_PID names another process"
        other.watchdog()
        other.status("alive")
        assert listener.recv(4096) == b"STATUS=alive", "no WATCHDOG=1 went before it"
        other.close()


def test_without_notify_socket_the_notifier_does_nothing():
    notifier = SystemdNotifier.from_environment({})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    notifier.ready("serving")
    notifier.watchdog()


def test_a_notify_socket_that_went_away_is_logged_once(notify, caplog):
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
    notify.close()
    for _ in range(5):
        notifier.watchdog()
    assert caplog.text.count("cannot notify systemd") == 1
    notifier.close()


def test_the_watchdog_pings_only_while_nothing_is_stuck_and_logs_each_stuck_stage_once(notify, caplog):
    clock = FakeClock()
    outbox, studies = Heartbeat("outbox-pacs", clock=clock), Heartbeat("studies-0", clock=clock)
    liveness = Liveness(stuck_after_s=10)
    liveness.track([outbox, studies])
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"})
    watchdog = Watchdog(liveness, Unreachable([], 60, clock=clock), notifier, threading.Event())
    assert watchdog.interval_s == 1.0

    def messages_after_tick() -> list[dict[str, str]]:
        count = len(notify.messages)
        watchdog.tick()
        marker = {"STATUS": f"tick {count}"}  # every message of this tick has arrived before it
        notifier.send(**marker)
        wait_until(lambda: notify.messages[-1:] and notify.messages[-1][1] == marker, 10)
        return [fields for _, fields in notify.messages[count:-1]]

    assert messages_after_tick() == [{"WATCHDOG": "1"}]
    with outbox.step():
        clock.now += 11
        assert messages_after_tick() == [{"STATUS": "stuck: outbox-pacs for 11 s"}]
        with studies.step():
            clock.now += 11
            assert messages_after_tick() == [{"STATUS": "stuck: outbox-pacs for 22 s, studies-0 for 11 s"}]
        assert messages_after_tick() == [{"STATUS": "stuck: outbox-pacs for 22 s"}]
    assert messages_after_tick() == [{"STATUS": "serving"}, {"WATCHDOG": "1"}]

    lines = [
        (r.levelname, r.getMessage().split(" for ")[0])
        for r in caplog.records
        if r.name == "dicomnode.health"
    ]
    assert lines == [
        ("ERROR", "ALERT stage stuck: outbox-pacs"),
        ("ERROR", "ALERT stage stuck: studies-0"),
        ("WARNING", "stage studies-0 moving again"),
        ("WARNING", "stage outbox-pacs moving again"),
    ]
    notifier.close()


def _node_metrics(tmp_path):
    from dicomnode.health import DiskFloor
    from dicomnode.metrics import NodeMetrics
    from dicomnode.spool import Spool

    spool = Spool(tmp_path / "var", min_free_bytes=0)
    return NodeMetrics(spool, Liveness(10), DiskFloor(spool.instances_dir, 0), Unreachable([], 60))


def _gpu_samples(metrics) -> dict:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("dicomnode_gpu_")
    }


@pytest.mark.parametrize(
    ("device", "reason"),
    [
        ("cpu", "the engine runs on no CUDA device"),
        ("cuda:0", "nvidia-ml-py is not installed (pip install 'dicomnode[gpu]')"),
    ],
)
def test_without_a_cuda_device_or_nvml_there_are_no_gpu_gauges_and_a_missing_nvml_is_said(
    device, reason, tmp_path, caplog, monkeypatch
):
    import sys

    import torch

    monkeypatch.setitem(sys.modules, "pynvml", None)  # as without the gpu extra: import fails
    caplog.set_level(logging.INFO, logger="dicomnode.metrics")
    metrics = _node_metrics(tmp_path)

    gauges = metrics.watch_gpus([torch.device(device)])

    assert gauges.reason == reason
    assert _gpu_samples(metrics) == {}
    said = [f"no GPU gauges in /metrics: {reason}"] if device != "cpu" else []
    assert [r.getMessage() for r in caplog.records] == said
    metrics.spool.close()


def test_with_cuda_and_nvml_each_gpu_has_utilisation_and_memory_gauges(tmp_path):
    import torch

    pynvml = pytest.importorskip("pynvml", reason="the gpu extra (nvidia-ml-py) is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    metrics = _node_metrics(tmp_path)
    device = torch.device("cuda:0")
    held = torch.empty(64 << 20, dtype=torch.uint8, device=device)

    assert metrics.watch_gpus([torch.device("cpu"), device]).reason is None
    samples = _gpu_samples(metrics)

    label = (("device", "cuda:0"),)
    assert 0 <= samples[("dicomnode_gpu_utilization_ratio", label)] <= 1
    total = samples[("dicomnode_gpu_memory_total_bytes", label)]
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    # The CUDA runtime's total: what CUDA can use, a little less than NVML's physical total
    # (150.11 vs 150.75 GB on a lent H200).
    assert total == torch.cuda.mem_get_info(device)[1]
    assert (
        0.95 * pynvml.nvmlDeviceGetMemoryInfo(handle).total
        <= total
        <= pynvml.nvmlDeviceGetMemoryInfo(handle).total
    )
    assert held.numel() <= samples[("dicomnode_gpu_memory_allocated_bytes", label)]
    assert held.numel() <= samples[("dicomnode_gpu_memory_used_bytes", label)] <= total
    assert {name for name, labels in samples} == {
        "dicomnode_gpu_utilization_ratio",
        "dicomnode_gpu_memory_used_bytes",
        "dicomnode_gpu_memory_total_bytes",
        "dicomnode_gpu_memory_allocated_bytes",
    }
    metrics.spool.close()


# -- the node, as a process ---------------------------------------------------------------------


def test_a_study_moves_the_counters_with_their_labels_and_no_patient_data(orthanc, node_factory, chest_cr):
    node = node_factory(destinations=[orthanc.destination(backoff_s=0.5)])
    before = scrape(node.metrics_url)
    assert value(before, "dicomnode_instances_total", outcome="stored") is None
    assert value(before, "dicomnode_healthy") == 1.0

    sent = dcmtk(
        "storescu", "-aec", "DICOMNODE", "-aet", "MODALITY", "127.0.0.1", str(node.port), str(chest_cr)
    )
    assert sent.returncode == 0, sent.stderr
    samples = scrape_until(
        node.metrics_url, "dicomnode_deliveries_total", 2, destination="orthanc", outcome="sent"
    )

    assert value(samples, "dicomnode_associations_total", outcome="accepted") == 1
    assert value(samples, "dicomnode_associations_total", outcome="released") == 1
    assert value(samples, "dicomnode_instances_total", outcome="stored") == 1
    assert value(samples, "dicomnode_studies_total", prompt_set="cxr", outcome="done") == 1
    assert value(samples, "dicomnode_study_processing_seconds_count", prompt_set="cxr") == 1
    assert value(samples, "dicomnode_study_processing_seconds_sum", prompt_set="cxr") > 0
    assert value(samples, "dicomnode_batch_images_count") >= 1
    assert value(samples, "dicomnode_batch_images_sum") >= 1
    batches = value(samples, "dicomnode_batch_images_count")
    assert value(samples, "dicomnode_inference_seconds_count") == batches
    assert value(samples, "dicomnode_studies_in_state", state="done") == 1
    assert value(samples, "dicomnode_outbox_pending", destination="orthanc") == 0
    assert value(samples, "dicomnode_dead_letters", destination="orthanc") == 0
    assert value(samples, "dicomnode_destination_unreachable", destination="orthanc") == 0
    assert value(samples, "dicomnode_free_bytes") > 0
    stages = {dict(labels)["stage"] for name, labels in samples if name == "dicomnode_stage_stuck"}
    always = {"scp", "studies-0", "studies-1", "outbox-orthanc", "inference-cpu", "prompt-watcher"}
    receiving = {"receivers"} if load_config(node.config).scp.receiving_processes() > 1 else set()
    assert stages == always | receiving
    assert value(samples, "dicomnode_healthy") == 1.0
    response = healthz(node.metrics_url)
    assert (response.status_code, response.text) == (200, "ok\n")
    assert requests.get(node.metrics_url + "/other", timeout=10).status_code == 404

    text = requests.get(node.metrics_url + "/metrics", timeout=10).text
    source = pydicom.dcmread(chest_cr, stop_before_pixels=True)
    for patient_value in (source.StudyInstanceUID, source.SOPInstanceUID, source.PatientID, "MODALITY"):
        assert str(patient_value) not in text


def test_below_the_disk_floor_healthz_fails_with_the_reason_and_refusals_are_counted(node_factory, chest_cr):
    node = node_factory(scp={"min_free_mb": 1 << 40})  # an exbibyte: no disk has that much free
    response = healthz(node.metrics_url)
    assert response.status_code == 503
    assert "below the floor of 1099511627776 MiB (scp.min_free_mb)" in response.text

    dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(chest_cr))
    samples = scrape_until(node.metrics_url, "dicomnode_instances_total", 1, 30, outcome="out_of_resources")
    assert value(samples, "dicomnode_instances_total", outcome="stored") is None
    assert value(samples, "dicomnode_healthy") == 0.0
    assert value(samples, "dicomnode_free_floor_bytes") == (1 << 40) << 20


def test_dead_letters_failed_studies_and_an_unreachable_destination_each_raise_a_metric_and_a_log_line(
    tmp_path, node_factory, chest_cr
):
    down = {
        "name": "down",
        "host": "127.0.0.1",
        "port": free_port(),  # nothing listens: every attempt is refused at once
        "ae_title": "NOWHERE",
        "backoff_s": 0.3,
        "max_backoff_s": 0.3,
        "max_attempts": 8,
    }
    node = node_factory(destinations=[down], alerts={"unreachable_after_s": 1.0})
    no_pixels = _variant(chest_cr, tmp_path, "cr-no-pixels.dcm", PixelData=None)
    for path in (chest_cr, no_pixels):
        sent = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), str(path))
        assert sent.returncode == 0, sent.stderr

    samples = scrape_until(node.metrics_url, "dicomnode_dead_letters", 2, destination="down")
    assert value(samples, "dicomnode_deliveries_total", destination="down", outcome="dead") == 2
    assert value(samples, "dicomnode_deliveries_total", destination="down", outcome="retry") == 14
    assert value(samples, "dicomnode_destination_unreachable", destination="down") == 1
    assert value(samples, "dicomnode_studies_total", prompt_set="cxr", outcome="failed") == 1
    assert value(samples, "dicomnode_studies_total", prompt_set="cxr", outcome="done") == 1

    log = node.log.read_text()
    assert log.count("WARNING dicomnode.health: ALERT destination down unreachable") == 1, log
    assert log.count("ERROR dicomnode.outbox: dead letter: delivery") == 2, log
    assert log.count("ERROR dicomnode.node: study ") == 1, log
    assert "prompt set cxr failed" in log


def test_readiness_then_pings_and_a_stuck_delivery_withholds_them_and_fails_healthz_until_it_moves(
    tmp_path, tiny_architecture, chest_cr, notify
):
    # A destination that takes the TCP connection (the kernel's backlog) and never answers:
    # the outbox worker waits in its association request until the timeout, a real hang.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(8)
    destination = {
        "name": "blackhole",
        "host": "127.0.0.1",
        "port": blackhole.getsockname()[1],
        "ae_title": "NOWHERE",
        "timeout_s": 10,
        "backoff_s": 600,
    }
    port = free_port()
    config = write_node_config(
        tmp_path, tiny_architecture, scp_port=port, destinations=[destination], alerts={"stuck_after_s": 3}
    )
    node = start_node(config, port, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
    try:
        ready_at = wait_until(lambda: notify.received("READY", "1"), 30, what="READY=1")[0]
        time.sleep(3)  # idle past the limit: waiting for work is not being stuck
        assert healthz(node.metrics_url).status_code == 200
        assert len(notify.received("WATCHDOG", "1", since=ready_at)) >= 4, notify.messages

        sent = dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(port), str(chest_cr))
        assert sent.returncode == 0, sent.stderr
        # (On two busy cores the study's own processing may pass the limit too: it is a step.)
        wait_until(
            lambda: (
                "stage outbox-blackhole stuck in one step" in (r := healthz(node.metrics_url)).text
                and r.status_code == 503
            ),
            60,
            what="503 naming the outbox",
        )
        seen_stuck = time.monotonic()
        time.sleep(2)
        assert healthz(node.metrics_url).status_code == 503, "still in its association request"
        # A ping sent just before the stall was noticed may arrive a moment later; none after.
        assert notify.received("WATCHDOG", "1", since=seen_stuck + 0.3) == [], "pings withheld while stuck"
        assert any(s.startswith("stuck: outbox-blackhole for ") for s in notify.statuses()), notify.statuses()
        samples = scrape(node.metrics_url)
        assert value(samples, "dicomnode_stage_stuck", stage="outbox-blackhole") == 1
        assert value(samples, "dicomnode_stage_stuck", stage="scp") == 0

        wait_until(lambda: healthz(node.metrics_url).status_code == 200, 30, what="the attempt timed out")
        moving = time.monotonic()
        wait_until(lambda: notify.received("WATCHDOG", "1", since=moving), 10, what="pings again")
        assert "serving" in notify.statuses()
        log = node.log.read_text()
        assert log.count("ERROR dicomnode.health: ALERT stage stuck: outbox-blackhole") == 1, log
        assert "WARNING dicomnode.health: stage outbox-blackhole moving again" in log
    finally:
        stop_process(node.process)
        blackhole.close()
    assert notify.received("STOPPING", "1"), "SIGTERM is announced"


def test_a_metrics_port_in_use_stops_the_start_naming_the_key_and_address(tmp_path, tiny_architecture):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        metrics_port = taken.getsockname()[1]
        config = write_node_config(
            tmp_path, tiny_architecture, scp_port=free_port(), metrics={"port": metrics_port}
        )
        run = run_cli("serve", "--config", str(config))
    assert run.returncode == 2
    assert f"cannot start: metrics endpoint cannot listen on 127.0.0.1:{metrics_port}: " in run.stderr


class Fatal(BaseException):
    """An error no stage's loop catches (they catch Exception): the thread dies for real."""


@pytest.mark.parametrize(
    ("stage", "owner", "call"),
    [
        ("studies-0", "Spool", "claim_quiet_study"),
        ("outbox-pacs", "Spool", "next_delivery"),
        ("prompt-watcher", "PromptSetLibrary", "_changed"),  # hot reload would stop silently
    ],
)
def test_a_stage_whose_thread_dies_fails_healthz_withholds_the_pings_and_is_named_in_error_lines(
    stage, owner, call, tmp_path, tiny_architecture, notify, caplog, monkeypatch
):
    from dicomnode.config import load_config
    from dicomnode.model.library import PromptSetLibrary
    from dicomnode.node import Node
    from dicomnode.spool import Spool

    pacs = {"name": "pacs", "host": "127.0.0.1", "port": free_port(), "ae_title": "PACS"}
    prompts = tmp_path / "prompts" / "cxr"  # a folder of its own: the watcher's case changes it
    shutil.copytree(REPO / "prompts" / "cxr", prompts)
    config = write_node_config(
        tmp_path,
        tiny_architecture,
        scp_port=free_port(),
        destinations=[pacs],
        studies={"workers": 1, "imaging_processes": 0},
        prompts_dir=str(prompts.parent),
        routing=str(routing_for(tmp_path, "cxr")),
    )
    cfg = load_config(config)
    url = f"http://{cfg.metrics.host}:{cfg.metrics.port}"
    # The stage's loop calls the journal every poll (the watcher: on each change of a served
    # set's folder); once armed, that call raises in its thread.
    armed = threading.Event()
    owner = {"Spool": Spool, "PromptSetLibrary": PromptSetLibrary}[owner]
    original = getattr(owner, call)

    def dies_when_armed(self, *args, **kwargs):
        if armed.is_set():
            raise Fatal("injected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, call, dies_when_armed)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # the node sets its own
    caplog.set_level(logging.INFO, logger="dicomnode")
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
    node = Node(cfg, notifier)
    node.start()
    try:
        wait_until(lambda: notify.received("WATCHDOG", "1"), 30, what="the first ping")
        assert healthz(url).status_code == 200

        armed.set()
        if stage == "prompt-watcher":
            (prompts / "notes.txt").write_text("a change in a served set's folder")
        text = wait_until(lambda: (r := healthz(url)).status_code == 503 and r.text, 30, what="503")
        assert text == (f"stage {stage} is dead: its thread ended with an error (logged); restart the node\n")
        wait_until(lambda: f"dead: {stage}" in notify.statuses(), 10, what="the dead stage's status")
        dead_at = time.monotonic()
        time.sleep(2.5)
        assert notify.received("WATCHDOG", "1", since=dead_at) == [], "pings withheld: systemd restarts"
        samples = scrape(url)
        assert value(samples, "dicomnode_stage_dead", stage=stage) == 1
        stages = {dict(labels)["stage"] for name, labels in samples if name == "dicomnode_stage_dead"}
        assert {"scp", "inference-cpu", "studies-0", "outbox-pacs", "prompt-watcher"} <= stages
        assert all(value(samples, "dicomnode_stage_dead", stage=other) == 0 for other in stages - {stage})
        assert value(samples, "dicomnode_healthy") == 0

        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert errors[0].startswith(f"ALERT thread {stage} died: Fatal at test_monitoring.py:"), errors
        assert "injected" not in errors[0], "the error's text is withheld: it may quote patient data"
        assert errors[1].startswith(f"ALERT stage dead: {stage}, its thread ended"), errors
        assert len(errors) == 2, "each said once"
    finally:
        node.stop()
    assert [r for r in caplog.records if r.levelname == "ERROR"][2:] == [], "a stop kills no stage"


# -- the systemd units --------------------------------------------------------------------------


def _systemd_root(tmp_path: Path) -> Path:
    """A file system root holding the units, systemd's own, and the node's executable."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (Debian package systemd); .ci/run installs it")
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in (REPO / "systemd").glob("*.service"):
        shutil.copy(unit, units)
    executable = root / "opt/dicomnode/.venv/bin/dicomnode"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    return root


def test_the_units_pass_systemd_analyze_verify_without_a_warning(tmp_path):
    root = _systemd_root(tmp_path)
    run = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "dicomnode.service", "dicomnode-train@cxr.service"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (run.returncode, run.stdout + run.stderr) == (0, "")


def test_the_service_is_a_notify_service_with_a_watchdog_and_keeps_its_hardening(tmp_path):
    service = (REPO / "systemd" / "dicomnode.service").read_text().splitlines()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=120", "ProtectSystem=strict", "UMask=0077"):
        assert line in service
    root = _systemd_root(tmp_path)
    for unit, score in (("dicomnode.service", "2.0"), ("dicomnode-train@cxr.service", "2.2")):
        run = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", f"--root={root}", unit],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        # The score the README states; a change of hardening must update both.
        assert f"Overall exposure level for {unit}: {score} OK" in run.stdout
