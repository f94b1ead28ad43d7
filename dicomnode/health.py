"""Is the node well? Stage liveness, the disk floor, unreachable destinations, the watchdog.

Each stage (the SCP's accept loop, the study workers, the destination workers, one inference
worker per device) keeps a `Heartbeat`: a step of work is timed from its start, so a stage is stuck
when one step has lasted longer than `alerts.stuck_after_s`. A stage waiting for work is idle,
never stuck. The SCP's accept loop always has work: it is stuck when it stops going round. A
stage whose thread has ended while the node runs (an error its loop did not catch) is dead: it
will never move again.

The `Watchdog` thread looks every second: while no stage is stuck or dead it pings systemd's
watchdog (WATCHDOG=1); a stuck or dead stage withholds the pings, with one ERROR line naming it,
so systemd restarts a node that can no longer make progress. It also raises the alert for
destinations that accepted nothing for `alerts.unreachable_after_s`, once per outage. /healthz
(metrics.py) fails on a stuck or dead stage and on free space below the SCP's floor.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode.notify import SystemdNotifier
from dicomnode.privacy import where_raised

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class Heartbeat:
    """The heartbeat of one stage: when its current step of work began, and its last beat."""

    def __init__(self, name: str, *, always_working: bool = False, clock: Clock = time.monotonic) -> None:
        """`always_working`: the stage never waits for work (an accept loop), so it must keep beating."""
        self.name = name
        self.always_working = always_working
        self._clock = clock
        self._last_beat = clock()
        self._step_started: float | None = None
        #: The thread that runs the stage: set when it is known before it starts, else by its
        #: first beat or step (the stage is the thread that beats it).
        self.thread: threading.Thread | None = None

    def beat(self) -> None:
        """The stage went round its loop."""
        self._last_beat = self._clock()
        self.thread = self.thread or threading.current_thread()

    @contextmanager
    def step(self) -> Iterator[None]:
        """A step of work: from here until it ends, the stage is busy (and may become stuck)."""
        self.thread = self.thread or threading.current_thread()
        self._step_started = self._clock()
        try:
            yield
        finally:
            self._step_started = None
            self.beat()

    def busy_for(self, now: float | None = None) -> float:
        """Seconds the current step has lasted (for an accept loop: since its last beat); 0 when idle."""
        now = self._clock() if now is None else now
        if self.always_working:
            return max(now - self._last_beat, 0.0)
        started = self._step_started  # read once: the stage's thread may end the step meanwhile
        return 0.0 if started is None else max(now - started, 0.0)

    def dead(self) -> bool:
        """Whether the stage's thread ran and has ended."""
        thread = self.thread
        return thread is not None and thread.ident is not None and not thread.is_alive()


def beat_on_accept_loop(server: ThreadedAssociationServer, stage: Heartbeat) -> None:
    """Make the SCP's accept loop beat `stage` each time round (at least every half second)."""
    service_actions = server.service_actions

    def beat_then_serve() -> None:
        stage.beat()
        service_actions()

    # socketserver calls service_actions() from serve_forever() on every pass of its loop.
    server.service_actions = beat_then_serve


class Liveness:
    """The node's stages and the limit past which a step counts as stuck."""

    def __init__(self, stuck_after_s: float) -> None:
        self.stuck_after_s = stuck_after_s
        self.stages: list[Heartbeat] = []
        self._lock = threading.Lock()
        #: Set when the node stops: its stages' threads then end as they should.
        self.stopping = threading.Event()

    def track(self, stages: Sequence[Heartbeat]) -> None:
        """Watch these stages from now on."""
        with self._lock:
            self.stages.extend(stages)

    def busy(self) -> dict[str, float]:
        """Seconds each stage's current step has lasted, by stage name."""
        with self._lock:
            stages = list(self.stages)
        return {stage.name: stage.busy_for() for stage in stages}

    def stuck(self) -> dict[str, float]:
        """The stages stuck in one step for longer than the limit, and for how long."""
        return {name: busy for name, busy in self.busy().items() if busy > self.stuck_after_s}

    def dead(self) -> list[str]:
        """The stages whose thread ended while the node runs, by name."""
        if self.stopping.is_set():
            return []
        with self._lock:
            stages = list(self.stages)
        return sorted(stage.name for stage in stages if stage.dead())


class DiskFloor:
    """The free space the SCP keeps (`scp.min_free_mb`) on the spool's file system."""

    def __init__(self, folder: Path, floor_bytes: int) -> None:
        self.folder = folder
        self.floor_bytes = floor_bytes

    def free_bytes(self) -> int:
        """Free bytes where instances are stored."""
        return shutil.disk_usage(self.folder).free

    def problem(self) -> str | None:
        """Why the disk is not well, or None."""
        free = self.free_bytes()
        if free >= self.floor_bytes:
            return None
        return (
            f"free space {free >> 20} MiB is below the floor of {self.floor_bytes >> 20} MiB "
            "(scp.min_free_mb): new instances are refused"
        )


def problems(liveness: Liveness, disk: DiskFloor) -> list[str]:
    """Everything that makes the node unhealthy now, each a sentence naming the stage or the disk."""
    found = [
        f"stage {name} is dead: its thread ended with an error (logged); restart the node"
        for name in liveness.dead()
    ]
    found += [
        f"stage {name} stuck in one step for {busy:.0f} s (alerts.stuck_after_s {liveness.stuck_after_s:g})"
        for name, busy in sorted(liveness.stuck().items())
    ]
    disk_problem = disk.problem()
    if disk_problem is not None:
        found.append(disk_problem)
    return found


class Unreachable:
    """Destinations that accepted no delivery for longer than `after_s`, alerted once per outage."""

    def __init__(self, destinations: Sequence[str], after_s: float, clock: Clock = time.monotonic) -> None:
        self.destinations = tuple(destinations)
        self.after_s = after_s
        self._clock = clock
        self._failing_since: dict[str, float] = {}
        self._alerted: set[str] = set()
        self._lock = threading.Lock()

    def record(self, destination: str, state: str | None) -> None:
        """A delivery attempt ended with the outbox row in `state` (sent, pending: retry, dead)."""
        if state is None:  # the row is gone (purged): the attempt says nothing of the destination
            return
        now = self._clock()
        with self._lock:
            if state == "sent":
                since = self._failing_since.pop(destination, None)
                if destination in self._alerted:
                    self._alerted.discard(destination)
                    log.info("destination %s reachable again after %.0f s", destination, now - (since or now))
            else:
                self._failing_since.setdefault(destination, now)

    def failing_for(self) -> dict[str, float]:
        """Seconds since each destination last accepted a delivery, for those failing now."""
        now = self._clock()
        with self._lock:
            return {name: now - since for name, since in self._failing_since.items()}

    def unreachable(self) -> dict[str, float]:
        """The destinations failing for longer than the limit, and for how long."""
        return {name: age for name, age in self.failing_for().items() if age > self.after_s}

    def check(self) -> None:
        """Log one WARNING for each destination that has just passed the limit."""
        for name, age in sorted(self.unreachable().items()):
            with self._lock:
                if name in self._alerted:
                    continue
                self._alerted.add(name)
            log.warning(
                "ALERT destination %s unreachable: no delivery accepted for %.0f s "
                "(alerts.unreachable_after_s %g); results wait in its queue",
                name,
                age,
                self.after_s,
            )


def log_thread_death(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: a thread's uncaught error as one ERROR line naming the thread (the
    stage), with the places it passed through but not its text, which may quote patient data
    (Python's own hook prints the whole message to stderr)."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "unknown"
    log.error("ALERT thread %s died: %s", name, where_raised(args.exc_value))


class Watchdog(threading.Thread):
    """Pings systemd's watchdog while no stage is stuck or dead, and raises the alerts; every second."""

    def __init__(
        self,
        liveness: Liveness,
        unreachable: Unreachable,
        notifier: SystemdNotifier,
        stop: threading.Event,
        interval_s: float = 1.0,
    ) -> None:
        super().__init__(name="watchdog", daemon=True)
        self.liveness = liveness
        self.unreachable = unreachable
        self.notifier = notifier
        self.stop_event = stop
        # Never slower than half the watchdog timeout, whatever systemd was told.
        self.interval_s = min(interval_s, notifier.watchdog_interval_s or interval_s)
        self._stuck: set[str] = set()
        self._dead: set[str] = set()

    def run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # the watchdog must outlive any single failure, and say so
                log.exception("watchdog: unexpected error")
            if self.stop_event.wait(self.interval_s):
                return

    def tick(self) -> None:
        """One look: ping or withhold the ping, log each stage that sticks, moves again or dies, alert."""
        dead = self.liveness.dead()
        for name in sorted(set(dead) - self._dead):
            log.error(
                "ALERT stage dead: %s, its thread ended; systemd watchdog pings withheld "
                "so that the node is restarted",
                name,
            )
        self._dead = set(dead)
        stuck = self.liveness.stuck()
        for name in sorted(set(stuck) - self._stuck):
            log.error(
                "ALERT stage stuck: %s for %.0f s in one step (alerts.stuck_after_s %g); "
                "systemd watchdog pings withheld",
                name,
                stuck[name],
                self.liveness.stuck_after_s,
            )
        for name in sorted(self._stuck - set(stuck)):
            log.warning("stage %s moving again", name)
        if stuck or dead:
            said = [f"dead: {', '.join(dead)}"] if dead else []
            if stuck:
                stages = ", ".join(f"{name} for {busy:.0f} s" for name, busy in sorted(stuck.items()))
                said.append(f"stuck: {stages}")
            self.notifier.status("; ".join(said))
        else:
            if self._stuck:  # a dead stage never comes back: only a stuck one can
                self.notifier.status("serving")
            self.notifier.watchdog()
        self._stuck = set(stuck)
        self.unreachable.check()
