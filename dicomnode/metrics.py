"""Prometheus metrics and the HTTP endpoint that serves them with /healthz.

One registry per Node, never the process-wide default: tests and `dicomnode bench study` run
several nodes in one process, and each must count only its own work. Counters and histograms
are fed by the stages' hooks; queue depths, dead letters, free space and stage liveness are
read when Prometheus scrapes, from the journal and the health checks, so they are never stale.

Labels carry only destination names, prompt-set names, stage names and outcomes: never a
UID, a patient attribute or an AE title a peer chose.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from pynetdicom import evt

from dicomnode.config import MetricsConfig
from dicomnode.health import DiskFloor, Liveness, Unreachable, problems

if TYPE_CHECKING:
    import torch
    from pynetdicom.transport import ThreadedAssociationServer

    from dicomnode.spool import Spool

log = logging.getLogger(__name__)

#: The C-STORE response statuses the SCP sends, by the names the metrics use.
_STORE_OUTCOMES = {0x0000: "stored", 0xA700: "out_of_resources", 0xC000: "cannot_understand"}

_ASSOCIATION_OUTCOMES = {
    evt.EVT_ACCEPTED: "accepted",
    evt.EVT_REJECTED: "rejected",
    evt.EVT_RELEASED: "released",
    evt.EVT_ABORTED: "aborted",
}

#: Seconds: a single radiograph takes tens of milliseconds on a GPU, a slide minutes on a CPU.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def count_scp(server: ThreadedAssociationServer, count: Callable[[str, str], None]) -> None:
    """Have `count(family, outcome)` called for each association's outcome ("associations":
    accepted, rejected, released, aborted) and each C-STORE response sent ("instances")."""

    def association(event: evt.Event, outcome: str) -> None:
        count("associations", outcome)

    def dimse_sent(event: evt.Event) -> None:
        message = event.message
        if type(message).__name__ != "C_STORE_RSP":
            return
        status = int(message.command_set.Status)
        count("instances", _STORE_OUTCOMES.get(status, f"0x{status:04X}"))

    for event, outcome in _ASSOCIATION_OUTCOMES.items():
        server.bind(event, association, [outcome])
    # The response as sent is the truth of what the peer was told, whatever the handler did.
    server.bind(evt.EVT_DIMSE_SENT, dimse_sent)


class NodeMetrics:
    """The node's metrics, in a registry of its own, and the hooks that feed them."""

    def __init__(self, spool: Spool, liveness: Liveness, disk: DiskFloor, unreachable: Unreachable) -> None:
        self.spool = spool
        self.liveness = liveness
        self.disk = disk
        self.unreachable = unreachable
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.associations = Counter(
            "dicomnode_associations",
            "Associations with the Storage SCP, by outcome (accepted, rejected, released, aborted)",
            ["outcome"],
            registry=self.registry,
        )
        self.instances = Counter(
            "dicomnode_instances",
            "C-STORE requests answered, by outcome (stored, out_of_resources, cannot_understand)",
            ["outcome"],
            registry=self.registry,
        )
        self.studies = Counter(
            "dicomnode_studies",
            "Studies processed, by prompt set (none when ignored) and outcome "
            "(done, ignored, failed, retry, reopened)",
            ["prompt_set", "outcome"],
            registry=self.registry,
        )
        self.study_seconds = Histogram(
            "dicomnode_study_processing_seconds",
            "Time to route, image, classify and write the results of one study",
            ["prompt_set"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "dicomnode_inference_seconds",
            "Time from staging a batch on its device to its predictions",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "dicomnode_batch_images",
            "Images per inference batch",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.deliveries = Counter(
            "dicomnode_deliveries",
            "Delivery attempts, by destination and outcome (sent, retry, dead)",
            ["destination", "outcome"],
            registry=self.registry,
        )
        self.registry.register(_JournalAndHealth(self))

    # -- hooks the stages call ------------------------------------------------------------

    def watch_scp(self, server: ThreadedAssociationServer) -> None:
        """Count the SCP's associations and C-STORE answers as they happen."""
        count_scp(server, self.count)

    def count(self, family: str, outcome: str, times: int = 1) -> None:
        """Count SCP outcomes: of `associations` or `instances` (what count_scp reports); the
        node's receivers in other processes report theirs here too (net.receivers)."""
        {"associations": self.associations, "instances": self.instances}[family].labels(outcome).inc(times)

    def study_processed(self, study_instance_uid: str, seconds: float) -> None:
        """A study worker finished one attempt at a study: count it by what the journal recorded."""
        record = self.spool.study(study_instance_uid)
        if record is None:  # purged meanwhile: nothing to say
            return
        prompt_set = record.prompt_set or "none"
        outcome = {"receiving": "retry" if record.attempts else "reopened"}.get(record.state, record.state)
        self.studies.labels(prompt_set, outcome).inc()
        self.study_seconds.labels(prompt_set).observe(seconds)

    def delivery_attempted(self, destination: str, state: str | None) -> None:
        """A destination worker made one attempt, which left the outbox row in `state`."""
        outcome = {"pending": "retry"}.get(state or "", state or "unknown")
        self.deliveries.labels(destination, outcome).inc()
        self.unreachable.record(destination, state)

    def watch_gpus(self, devices: Sequence[torch.device]) -> GpuGauges:
        """Serve the utilisation and memory of the engine's GPUs, when CUDA and NVML are there."""
        gauges = GpuGauges(devices)
        if gauges.reason is None:
            self.registry.register(gauges)
        return gauges

    def batch_done(self, images: int, seconds: float) -> None:
        """The engine returned the predictions of one batch."""
        self.batch_images.observe(images)
        self.inference_seconds.observe(seconds)


class _JournalAndHealth(Collector):
    """Gauges read at scrape time: queue depths, dead letters, free space, stage liveness."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        counts = m.spool.counts()
        m.spool.close()  # each scrape runs in a thread of its own: do not leave its connection open
        studies = GaugeMetricFamily(
            "dicomnode_studies_in_state", "Studies in the journal, by state", labels=["state"]
        )
        for state in ("receiving", "processing", "done", "ignored", "failed"):
            studies.add_metric([state], counts["studies"].get(state, 0))
        yield studies
        outbox = {name: {"pending": 0, "dead": 0} for name in m.unreachable.destinations}
        for key, count in counts["outbox"].items():
            destination, state = key.rsplit(":", 1)
            outbox.setdefault(destination, {"pending": 0, "dead": 0})[state] = count
        queued = GaugeMetricFamily(
            "dicomnode_outbox_pending",
            "Results waiting to be delivered, by destination",
            labels=["destination"],
        )
        dead = GaugeMetricFamily(
            "dicomnode_dead_letters",
            "Deliveries in the dead letter (until `dicomnode requeue`), by destination",
            labels=["destination"],
        )
        for destination, states in sorted(outbox.items()):
            queued.add_metric([destination], states["pending"])
            dead.add_metric([destination], states["dead"])
        yield queued
        yield dead
        yield GaugeMetricFamily(
            "dicomnode_free_bytes", "Free bytes on the spool's file system", value=m.disk.free_bytes()
        )
        yield GaugeMetricFamily(
            "dicomnode_free_floor_bytes",
            "Below this free space the SCP refuses instances (scp.min_free_mb)",
            value=m.disk.floor_bytes,
        )
        busy = GaugeMetricFamily(
            "dicomnode_stage_busy_seconds",
            "How long each stage's current step has lasted (0: idle)",
            labels=["stage"],
        )
        stuck = GaugeMetricFamily(
            "dicomnode_stage_stuck", "1 when the stage is stuck past alerts.stuck_after_s", labels=["stage"]
        )
        stage_dead = GaugeMetricFamily(
            "dicomnode_stage_dead", "1 when the stage's thread ended while the node runs", labels=["stage"]
        )
        ended = set(m.liveness.dead())
        for name, seconds in sorted(m.liveness.busy().items()):
            busy.add_metric([name], seconds)
            stuck.add_metric([name], float(seconds > m.liveness.stuck_after_s))
            stage_dead.add_metric([name], float(name in ended))
        yield busy
        yield stuck
        yield stage_dead
        unreachable = m.unreachable.unreachable()
        gauge = GaugeMetricFamily(
            "dicomnode_destination_unreachable",
            "1 when the destination accepted no delivery for longer than alerts.unreachable_after_s",
            labels=["destination"],
        )
        for name in m.unreachable.destinations:
            gauge.add_metric([name], float(name in unreachable))
        yield gauge
        yield GaugeMetricFamily(
            "dicomnode_healthy", "1 when /healthz answers 200", value=float(not problems(m.liveness, m.disk))
        )


class GpuGauges(Collector):
    """Utilisation and memory of the GPUs the engine runs on, read at scrape time.

    torch reads utilisation through NVML, which the `gpu` extra installs (nvidia-ml-py); without
    CUDA devices there are no GPU gauges; without NVML neither, and one INFO line says why.
    """

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self.devices = [d for d in devices if d.type == "cuda"]
        self.reason = self._unavailable()
        if self.reason is not None and self.devices:  # a CPU node has nothing to explain
            log.info("no GPU gauges in /metrics: %s", self.reason)

    def _unavailable(self) -> str | None:
        if not self.devices:
            return "the engine runs on no CUDA device"
        try:
            import pynvml

            pynvml.nvmlInit()
        except ImportError:
            return "nvidia-ml-py is not installed (pip install 'dicomnode[gpu]')"
        except Exception as exc:  # pynvml.NVMLError: no driver library, no permission
            return f"NVML cannot start ({type(exc).__name__}: {exc})"
        return None

    def collect(self) -> Iterable[Metric]:
        if self.reason is not None:
            return
        import torch

        utilisation = GaugeMetricFamily(
            "dicomnode_gpu_utilization_ratio",
            "Share of the last sample period in which a kernel ran on the GPU (NVML)",
            labels=["device"],
        )
        used = GaugeMetricFamily(
            "dicomnode_gpu_memory_used_bytes", "GPU memory in use, by every process", labels=["device"]
        )
        total = GaugeMetricFamily(
            "dicomnode_gpu_memory_total_bytes",
            "GPU memory CUDA can use (the runtime's total, slightly under NVML's physical total)",
            labels=["device"],
        )
        mine = GaugeMetricFamily(
            "dicomnode_gpu_memory_allocated_bytes",
            "GPU memory held by the node's tensors (PyTorch's allocator)",
            labels=["device"],
        )
        for device in self.devices:
            label = [str(device)]
            utilisation.add_metric(label, torch.cuda.utilization(device) / 100)
            free, size = torch.cuda.mem_get_info(device)
            used.add_metric(label, size - free)
            total.add_metric(label, size)
            mine.add_metric(label, torch.cuda.memory_allocated(device))
        yield from (utilisation, used, total, mine)


class _Quiet(WSGIRequestHandler):
    """No line per request on stderr: a scrape every 15 s would drown the node's own log."""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the name the base class uses
        pass


def _app(metrics: NodeMetrics) -> Callable:
    """/metrics in Prometheus's text format; /healthz 200 "ok" or 503 with one reason per line."""
    exposition = make_wsgi_app(metrics.registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return exposition(environ, start_response)
        if path == "/healthz":
            found = problems(metrics.liveness, metrics.disk)
            body = ("\n".join(found) if found else "ok") + "\n"
            status = "503 Service Unavailable" if found else "200 OK"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [body.encode("utf-8")]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: this endpoint serves /metrics and /healthz\n"]

    return app


class MetricsServer:
    """The HTTP endpoint, served by a thread of its own until `stop`."""

    def __init__(self, metrics: NodeMetrics, cfg: MetricsConfig) -> None:
        try:
            self.server = make_server(
                cfg.host, cfg.port, _app(metrics), server_class=ThreadingWSGIServer, handler_class=_Quiet
            )
        except OSError as exc:
            raise OSError(f"metrics endpoint cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}") from exc
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz", cfg.host, cfg.port)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
