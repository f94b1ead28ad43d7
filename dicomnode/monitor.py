"""What the administrators watch, attached to a node's stages: metrics, /healthz, alerts, watchdog.

`Node` makes one `Monitor` and hands it its SCP, engine and workers when they start; the
stages themselves only keep a heartbeat (`health.Heartbeat`) and call an `observe` hook, so the
monitoring lives here and in `health.py` and `metrics.py`, not in the stages' code.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dicomnode.config import NodeConfig
from dicomnode.health import (
    DiskFloor,
    Heartbeat,
    Liveness,
    Unreachable,
    Watchdog,
    beat_on_accept_loop,
    log_thread_death,
)
from dicomnode.metrics import MetricsServer, NodeMetrics
from dicomnode.notify import SystemdNotifier
from dicomnode.outbox import DestinationWorker

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

    from dicomnode.engine import Engine
    from dicomnode.spool import Spool


class Monitor:
    """A node's liveness, metrics and alerts; serves them once started, until stopped."""

    def __init__(self, cfg: NodeConfig, spool: Spool, notifier: SystemdNotifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or SystemdNotifier(None)
        self.liveness = Liveness(cfg.alerts.stuck_after_s)
        self.disk = DiskFloor(spool.instances_dir, spool.min_free_bytes)
        self.unreachable = Unreachable([d.name for d in cfg.destinations], cfg.alerts.unreachable_after_s)
        self.metrics = NodeMetrics(spool, self.liveness, self.disk, self.unreachable)
        self.server: MetricsServer | None = None
        self._stop = threading.Event()
        self.watchdog = Watchdog(self.liveness, self.unreachable, self.notifier, self._stop)

    def listen(self) -> None:
        """Serve /metrics and /healthz (unless `metrics.enabled` is false), before the SCP listens."""
        if self.cfg.metrics.enabled:
            self.server = MetricsServer(self.metrics, self.cfg.metrics)

    def start(
        self,
        scp: ThreadedAssociationServer,
        engine: Engine,
        workers: Sequence[threading.Thread],
        watchers: Sequence[threading.Thread] = (),
    ) -> None:
        """Watch the running SCP, the engine, the (not yet started) workers and threads that only
        wait for events (`watchers`: never stuck, but dead if they end); start the watchdog.

        A thread's uncaught error is logged naming the thread, without its text (process-wide).
        """
        threading.excepthook = log_thread_death
        scp_heartbeat = Heartbeat("scp", always_working=True)
        beat_on_accept_loop(scp, scp_heartbeat)
        self.metrics.watch_scp(scp)
        self.liveness.track([scp_heartbeat, *engine.heartbeats.values()])
        engine.observe_batch = self.metrics.batch_done
        self.metrics.watch_gpus(engine.devices)
        for watcher in watchers:
            heartbeat = Heartbeat(watcher.name)
            heartbeat.thread = watcher
            self.liveness.track([heartbeat])
        for worker in workers:
            worker.heartbeat.thread = worker  # dead even if it dies before its first step
            self.liveness.track([worker.heartbeat])
            if isinstance(worker, DestinationWorker):
                worker.observe = self.metrics.delivery_attempted
            else:
                worker.observe = self.metrics.study_processed
        self.watchdog.start()

    def stopping(self) -> None:
        """The node is stopping: its stages' threads end from now on, and that is no failure."""
        self.liveness.stopping.set()

    def stop(self) -> None:
        """Stop the watchdog and the endpoint."""
        self._stop.set()
        if self.watchdog.is_alive():
            self.watchdog.join(timeout=10)
        if self.server is not None:
            self.server.stop()
            self.server = None
