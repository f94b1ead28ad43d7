"""`dicomnode serve`: wires receive -> route -> image -> infer -> results -> deliver.

One process (and `scp.receivers` - 1 more that only receive, net.receivers): the SCP's
association threads write the spool; one study worker takes quiet
studies from the journal and processes them; one outbox worker per destination sends the
results. Every hand-over goes through the journal, so a crash at any point resumes on the
next start.
"""

from __future__ import annotations

import gc
import logging
import logging.handlers
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from dicomnode.config import AuditConfig, ConfigError, NodeConfig, RoutingConfig, load_routing, usable_cores
from dicomnode.engine import Engine, EngineError
from dicomnode.flow import ResultSet, StudyJob
from dicomnode.health import Heartbeat
from dicomnode.logs import formatter, set_levels, syslog_handler
from dicomnode.model.backbone import BackboneError
from dicomnode.model.library import PromptSetLibrary
from dicomnode.model.promptset import PromptSet, PromptSetError
from dicomnode.monitor import Monitor
from dicomnode.net.receivers import Receivers, ReceiverSetup
from dicomnode.net.scp import clear_half_received, start_scp
from dicomnode.net.stow import check_endpoints
from dicomnode.net.tls import check_tls, scp_context
from dicomnode.notify import StopSignals, SystemdNotifier
from dicomnode.outbox import DestinationWorker
from dicomnode.pipeline import classify, imaging_pool
from dicomnode.privacy import describe_error, uid_tag, where_raised
from dicomnode.results import write_results
from dicomnode.routing import Ignored, route_study
from dicomnode.spool import Spool, SpoolError, StudyRecord

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)


class StudyFailed(RuntimeError):
    """A study could not be processed; the message is recorded in the journal."""


#: How often the study worker looks for finished studies past their retention.
PURGE_INTERVAL_S = 600.0

#: Failures another attempt cannot fix: the study's content, the prompt set or the code is at
#: fault (imaging, results and prompt-set errors are ValueErrors). Anything else (disk full,
#: out of memory, a device error) may pass and is retried.
PERMANENT_FAILURES = (StudyFailed, EngineError, ValueError, TypeError, KeyError, AttributeError)


class StartupError(RuntimeError):
    """The node cannot start; the message says what to fix and was logged."""


def configure_logging(
    state_dir: Path,
    level: str,
    log_format: str = "text",
    audit: AuditConfig | None = None,
    stream: TextIO | None = None,
) -> None:
    """Log to stderr (journald under systemd; `stream` instead, when given) and to files under
    state_dir/logs, as text or JSON lines; the audit also to syslog when `audit.syslog` is set.

    The DICOM libraries are silenced: pynetdicom's debug output dumps datasets, and pydicom
    and highdicom quote attribute values (names included) in their messages. The node logs
    every association, store, study and delivery outcome itself.
    """
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True, mode=0o700)
    fmt = formatter(log_format)
    root = logging.getLogger()
    set_levels(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in (
        logging.StreamHandler(stream),
        logging.handlers.RotatingFileHandler(logs / "dicomnode.log", maxBytes=20 << 20, backupCount=5),
    ):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    audit_file = logging.handlers.RotatingFileHandler(logs / "audit.log", maxBytes=20 << 20, backupCount=10)
    audit_file.setFormatter(fmt)
    logging.getLogger("dicomnode.audit").addHandler(audit_file)
    if audit is not None and audit.syslog:
        logging.getLogger("dicomnode.audit").addHandler(syslog_handler(audit))


class StudyWorker(threading.Thread):
    """Takes quiet studies from the journal and turns each into results in the outbox.

    Several run side by side, so that while one waits for the engine another decodes: the
    engine then batches the images of their studies together. Only the first purges.
    """

    def __init__(
        self,
        cfg: NodeConfig,
        spool: Spool,
        routing: RoutingConfig,
        prompt_sets: PromptSetLibrary,
        engine: Engine,
        stop: threading.Event,
        pool: Executor | None = None,
        index: int = 0,
    ) -> None:
        super().__init__(name=f"studies-{index}", daemon=True)
        self.pool = pool
        self.purges = index == 0
        self.cfg = cfg
        self.spool = spool
        self.routing = routing
        self.prompt_sets = prompt_sets
        self.engine = engine
        self.stop_event = stop
        #: Liveness, and who learns each study's outcome and time (the node's metrics).
        self.heartbeat = Heartbeat(self.name)
        self.observe: Callable[[str, float], None] = lambda study_instance_uid, seconds: None

    def run(self) -> None:
        next_purge = 0.0
        while not self.stop_event.is_set():
            try:
                with self.heartbeat.step():
                    if self.purges and time.monotonic() >= next_purge:
                        self.purge()
                        next_purge = time.monotonic() + PURGE_INTERVAL_S
                    study = self.spool.claim_quiet_study(self.cfg.studies.quiet_period_s)
            except Exception as exc:  # the loop must outlive any single failure
                log.error("study worker: unexpected error: %s", where_raised(exc))
                self.stop_event.wait(1.0)
                continue
            if study is None:
                self.stop_event.wait(self.cfg.studies.poll_interval_s)
                continue
            with self.heartbeat.step():
                started = time.perf_counter()
                try:
                    self.process(study)
                except Exception as exc:  # outside the results step: say, a locked journal
                    log.error(
                        "study %s: unexpected error: %s", uid_tag(study.study_instance_uid), where_raised(exc)
                    )
                    self._requeue(study, exc)
                self.observe(study.study_instance_uid, time.perf_counter() - started)
        self.spool.close()

    def _requeue(self, study: StudyRecord, exc: Exception) -> None:
        """Put a study whose processing broke down back in the queue, as a failure that may pass.

        Left in `processing` it would wait for the next restart. The journal itself may be what
        failed (locked, say), so this keeps trying until it records the retry or the node stops
        (then `recover` at the next start puts the study back).
        """
        while not self.stop_event.is_set():
            try:
                self._retry(study, exc)
                return
            except Exception as again:
                log.warning(
                    "study %s: cannot record the retry yet (%s)",
                    uid_tag(study.study_instance_uid),
                    type(again).__name__,
                )
                self.stop_event.wait(1.0)

    def purge(self) -> None:
        """Free the disk of studies finished longer ago than `studies.retention_days`."""
        days = self.cfg.studies.retention_days
        if days is None:
            return
        purged = self.spool.purge_finished(time.time() - days * 86400)
        if purged:
            log.info("purged %d finished studies older than %g days", purged, days)

    def process(self, study: StudyRecord) -> None:
        """Route, classify and write results for one study, recording the outcome once.

        A study may go to several prompt sets (a chest radiograph and an OCT in one study),
        each with its own chain of report versions. When a set fails for good and another
        succeeds, the results of the successful ones are still delivered and the study is
        failed with a reason naming each failed set. A failure that may pass retries the whole
        study: the sets that succeeded then write the same objects again.
        """
        tag = uid_tag(study.study_instance_uid)
        routed = route_study(
            self.routing, study.study_instance_uid, self.spool.instances(study.study_instance_uid)
        )
        if isinstance(routed, Ignored):
            self.spool.finish_study(study, state="ignored", reason=routed.reason)
            log.info("study %s ignored: %s", tag, routed.reason)
            return
        if routed.left_out is not None:
            log.info("study %s: instances left out: %s", tag, routed.left_out)
        results: list[ResultSet] = []
        failures: list[str] = []
        for job in routed.jobs:
            try:
                results.append(self._results_for(job))
            except PERMANENT_FAILURES as exc:
                # The journal's reason is shown by `dicomnode status`: log-safe, as the log line.
                failures.append(f"prompt set {job.prompt_set} failed: {describe_error(exc)}")
                log.error("study %s: %s", tag, failures[-1])
                continue
            except Exception as exc:  # disk, memory, device: may pass, so try again later
                self._retry(study, exc)
                return
            log.info(
                "study %s processed with prompt set %s (%d images)", tag, job.prompt_set, len(job.instances)
            )
        reason = "; ".join(failures + ([f"left out: {routed.left_out}"] if routed.left_out else [])) or None
        self.spool.finish_study(
            study,
            state="failed" if failures else "done",
            reason=reason,
            prompt_set=",".join(job.prompt_set for job in routed.jobs),
            deliveries=[(d.name, p) for d in self.cfg.destinations for r in results for p in r.paths],
            reports=[r.version for r in results if r.version is not None],
        )

    def _retry(self, study: StudyRecord, exc: Exception) -> None:
        studies = self.cfg.studies
        delay = studies.retry_backoff_s * 2**study.attempts
        # The journal's reason is shown by `dicomnode status`: log-safe, as the log line.
        reason = describe_error(exc)
        tag = uid_tag(study.study_instance_uid)
        if self.spool.retry_study(study, reason, delay_s=delay, max_attempts=studies.max_attempts):
            log.warning("study %s: %s; retry in %.0f s", tag, reason, delay)
        else:
            log.error("study %s failed after %d attempts: %s", tag, study.attempts + 1, reason)

    def _results_for(self, job: StudyJob) -> ResultSet:
        # The version taken here serves the whole study, even if a reload swaps it meanwhile.
        prompt_set = self.prompt_sets.get(job.prompt_set)
        log.info(
            "study %s: processing with prompt set %s version %s sha256 %s",
            uid_tag(job.study_instance_uid),
            prompt_set.name,
            prompt_set.version,
            prompt_set.sha256[:12],
        )
        with self.engine.using(prompt_set):
            return self._results_with(job, prompt_set)

    def _results_with(self, job: StudyJob, prompt_set: PromptSet) -> ResultSet:
        classified = classify(self.engine, prompt_set, [i.path for i in job.instances], self.pool)
        for instance in job.instances:
            if instance.path in classified.problems:
                log.warning(
                    "instance %s skipped: %s",
                    uid_tag(instance.sop_instance_uid),
                    classified.problems[instance.path],
                )
        if not classified.samples:
            # A slide's instances share one reason: say it once.
            reasons = dict.fromkeys(classified.problems.values())
            raise StudyFailed("no image could be prepared: " + "; ".join(reasons))
        return write_results(
            out_dir=self.spool.outbox_dir / job.study_instance_uid,
            sources=classified.sources,
            samples=classified.samples,
            predictions=classified.predictions,
            findings=prompt_set.findings,
            procedure=prompt_set.procedure,
            model=self.engine.identity(prompt_set),
            aggregation=prompt_set.aggregation,
            latest=self.spool.latest_report(job.study_instance_uid, prompt_set.name),
        )


class Node:
    """The running node: SCP, study worker and outbox workers, stopped together."""

    def __init__(self, cfg: NodeConfig, notifier: SystemdNotifier | None = None) -> None:
        self.cfg = cfg
        # First, before the model loads: a bad certificate or key fails start-up in a second,
        # and a destination's fails it too rather than its first delivery.
        check_tls(cfg)
        check_endpoints(cfg)
        self.stop_event = threading.Event()
        self.spool = Spool(cfg.state_dir, min_free_bytes=cfg.scp.min_free_mb << 20)
        self.routing = load_routing(cfg.routing)
        self.engine = Engine.from_config(cfg.model)
        # Fails at start-up, not on the first study, and warms each set up on every device.
        self.prompt_sets = PromptSetLibrary(
            cfg.prompts_dir,
            [rule.prompt_set for rule in self.routing.rules if rule.prompt_set is not None],
            check=self.engine.prepare,
            swapped=self.engine.serve_only,
            pins=cfg.prompt_set_versions,
        )
        self.monitor = Monitor(cfg, self.spool, notifier)
        self.pool: Executor | None = None
        self.threads: list[threading.Thread] = []
        self.server = None
        self.receivers: Receivers | None = None

    def start(self) -> None:
        """Resume interrupted work, then start receiving, processing and delivering."""
        restored = self.spool.restore_landed()
        if restored:
            log.info("restored %d instance files after an unclean stop", restored)
        recovered = self.spool.recover(self.cfg.studies.quiet_period_s)
        if recovered:
            log.info("resumed %d studies interrupted by the last stop", recovered)
        self.monitor.listen()
        self.spool.start_settling()
        self.server = self._start_receiving()
        self.prompt_sets.watch()
        self.pool = imaging_pool(self.cfg.studies.imaging_processes)
        self.threads = [
            StudyWorker(
                self.cfg,
                self.spool,
                self.routing,
                self.prompt_sets,
                self.engine,
                self.stop_event,
                self.pool,
                i,
            )
            for i in range(self.cfg.studies.workers)
        ]
        self.threads += [
            DestinationWorker(self.spool, d, self.cfg.scp.ae_title, self.stop_event)
            for d in self.cfg.destinations
        ]
        watchers = [self.prompt_sets.watcher, self.receivers and self.receivers.supervisor]
        self.monitor.start(self.server, self.engine, self.threads, [w for w in watchers if w])
        for thread in self.threads:
            thread.start()

    def _start_receiving(self) -> ThreadedAssociationServer:
        """The node's own SCP, and `scp.receivers` - 1 receiving processes beside it."""
        scp = self.cfg.scp
        processes = scp.receiving_processes()
        log.info(
            "receiving in %d process(es): scp.receivers %s, %d usable cores",
            processes, scp.receivers, usable_cores(),
        )  # fmt: skip
        if processes == 1:
            return start_scp(self.spool, scp, scp_context(self.cfg))
        setup = ReceiverSetup(
            scp,
            self.cfg.state_dir,
            tls_origin=f"{self.cfg.source}: scp.tls",
            log_level=self.cfg.log_level,
            count=self.cfg.metrics.enabled,
        )
        self.receivers = Receivers(setup, processes - 1, self.monitor.metrics.count)
        # The receivers first (connections wait in the socket's backlog until one accepts): the
        # node's own SCP is counted and watched only once this returns (Monitor.start), and
        # while the receivers start, about a second, it would be the only one accepting.
        clear_half_received(self.spool)  # before anyone receives into incoming/
        self.receivers.start()  # stops them all if one cannot start
        try:
            return start_scp(
                self.spool, scp, scp_context(self.cfg), share=self.receivers.share, clear_incoming=False
            )
        except BaseException:
            self.receivers.stop()
            raise

    def stop(self) -> None:
        """Stop accepting, let workers finish their current step, close the journal."""
        self.monitor.stopping()
        if self.server is not None:
            self.server.shutdown()
        if self.receivers is not None:
            self.receivers.stop()
        self.spool.stop_settling()
        self.stop_event.set()
        self.prompt_sets.stop()
        for thread in self.threads:
            thread.join(timeout=60)
        self.engine.stop()
        self.monitor.stop()
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        log.info("dicomnode stopped")


def settle_heap() -> int:
    """Collect what start-up left behind, then exempt every object alive from the cyclic
    garbage collector (gc.freeze); how many objects that is.

    torch, open_clip, highdicom and the model are about half a million objects that live as
    long as the node. Left in the collector, every full collection walks them all: 230 ms on
    the development VM, with every association waiting on the GIL, and pynetdicom's server
    forces one every 60 associations. Frozen, a collection walks only what the node allocated
    since. They are still freed by reference counting; a cycle among them that becomes garbage
    later (a prompt set replaced by a reload, if it holds one) is kept until the node restarts.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def serve(cfg: NodeConfig) -> None:
    """Run the node until SIGTERM or SIGINT."""
    os.umask(0o077)  # state, spool and logs are private to the service user
    try:
        configure_logging(cfg.state_dir, cfg.log_level, cfg.log_format, cfg.audit)
    except OSError as exc:  # the syslog socket; the log is not set up, so stderr it is
        message = f"{cfg.source}: audit.address: cannot reach syslog at {cfg.audit.address}: {exc}"
        print(f"cannot start: {message}", file=sys.stderr)
        raise StartupError(message) from None
    notifier = SystemdNotifier.from_environment()
    try:
        node = Node(cfg, notifier)
        log.info("start-up objects exempt from garbage collection: %d", settle_heap())
        # From here a stop waits for the start to finish, then stops as from serving: killed
        # midway, receiving processes and landing logs would be left to the next start.
        stopping = StopSignals()
        node.start()
    except (ConfigError, PromptSetError, BackboneError, EngineError, OSError, SpoolError) as exc:
        log.error("cannot start: %s", exc)
        raise StartupError(str(exc)) from None
    log.info("dicomnode ready: state in %s", cfg.state_dir)
    # Ready for systemd only now: the SCP listens and every served prompt set is warm.
    notifier.ready(f"serving: Storage SCP {cfg.scp.ae_title} on port {cfg.scp.port}")
    # Python runs signal handlers in the main thread only, and the kernel may deliver SIGTERM
    # to any thread: a main thread blocked in wait() without a timeout never woke for one
    # (a test's SIGTERM went unanswered for 90 s). It looks every half second.
    while not stopping.wait(0.5):
        pass
    log.info("stopping")
    notifier.stopping()
    node.stop()
