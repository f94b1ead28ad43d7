"""Receiving in several processes: the Storage SCP's port served by `scp.receivers` of them.

One Python process receives about 1,000 CT slices a second however many associations send:
its threads take turns at one interpreter lock. DCMTK's storescp forks a process per
association. Here the node runs its own SCP and starts `receivers - 1` more processes, each an
SCP and spool on the node's state folder, all accepting from the one socket the node listens
on; a connection goes to a process with the fewest associations open (net.balance).

What the processes share goes through the state folder, made for several processes: the
journal (its writers take turns on `journal.sqlite-writer`), each study (a byte of
`studies.lock`, so that the node's purge never deletes a study a receiver is storing into) and
the association limit (a slot of `associations.lock` per association). Their log records (the
audit included) and their counts of associations and C-STOREs come to the node over a queue and
are written and counted there as its own. A receiver that dies is started again; it stops when
told to (SIGTERM, SIGINT: under systemd the whole service gets it), or when the node is gone,
as the node's own SCP does: a C-STORE not yet acknowledged is the sender's to send again.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import queue
import sys
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from dicomnode.config import ScpConfig
from dicomnode.logs import set_levels
from dicomnode.net.balance import ABSENT, Share
from dicomnode.notify import StopSignals
from dicomnode.privacy import describe_error, where_raised

log = logging.getLogger(__name__)

#: Seconds a receiver gets to start listening (importing pydicom and pynetdicom takes about one).
START_TIMEOUT_S = 60.0

#: Seconds a receiver gets to stop before it is killed.
STOP_TIMEOUT_S = 30.0

#: Seconds between a receiver's counts sent to the node, and between its looks at the node.
REPORT_INTERVAL_S = 0.5


@dataclass(frozen=True)
class ReceiverSetup:
    """What a receiver process needs to know: the SCP, where the state lives, how to log."""

    scp: ScpConfig
    state_dir: Path
    #: Where the SCP's TLS settings come from, for errors ("conf/x.yaml: scp.tls").
    tls_origin: str = "scp.tls"
    log_level: str = "INFO"
    #: Whether associations and C-STOREs are counted (the node serves metrics).
    count: bool = True


class Receivers:
    """The node's receiving processes beside its own SCP: started, watched, started again, stopped.

    `count(family, outcome, times)` is called in the node for the receivers' SCP outcomes
    (metrics.NodeMetrics.count). Made, it listens on the SCP's port (OSError naming the address
    if that is taken); `share` is what the node's own SCP accepts from, as process 0.
    """

    def __init__(
        self, setup: ReceiverSetup, processes: int, count: Callable[[str, str, int], None] | None = None
    ) -> None:
        self.setup = setup
        self.count = count or (lambda family, outcome, times: None)
        self._context = multiprocessing.get_context("spawn")  # no threads, locks or torch inherited
        self.share = Share.listen(setup.scp, processes + 1, self._context)
        self._messages = self._context.Queue()
        self._processes: dict[int, multiprocessing.process.BaseProcess] = {}
        self._wanted = processes
        self._stopping = threading.Event()
        #: Watches the processes and starts a dead one again; the node's liveness tracks it.
        self.supervisor = threading.Thread(target=self._supervise, name="receivers", daemon=True)
        self._listener = threading.Thread(target=self._listen, name="receivers-log", daemon=True)

    @property
    def pids(self) -> list[int]:
        """The receivers' process IDs, by index (1, 2, ...)."""
        return [process.pid for _, process in sorted(self._processes.items())]

    def start(self) -> None:
        """Start every receiver and return once each listens; OSError (and none left running)
        if one cannot."""
        self._listener.start()
        try:
            for index in range(1, self._wanted + 1):
                self._processes[index] = self._spawn(index, wait_s=START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        self.supervisor.start()
        log.info("%d receiving processes beside the node's own: %s", self._wanted, self.pids)

    def _spawn(self, index: int, wait_s: float | None = None) -> multiprocessing.process.BaseProcess:
        ready, says_ready = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=receive,
            args=(self.setup, self.share, index, self._messages, says_ready, os.getpid()),
            name=f"receiver-{index}",
            daemon=False,
        )
        process.start()
        says_ready.close()
        with ready:
            started = wait_s is None or (wait([process.sentinel, ready], wait_s) and _said_ready(ready))
            if not started:
                process.join(1.0)
                if process.is_alive():
                    process.kill()
                    process.join()
                raise OSError(
                    f"receiver {index} did not start (exit code {process.exitcode}); its log lines say why"
                )
        return process

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            sentinels = {process.sentinel: index for index, process in self._processes.items()}
            for sentinel in wait(list(sentinels), timeout=REPORT_INTERVAL_S):
                index = sentinels[sentinel]
                process = self._processes[index]
                process.join()
                self.share.set(index, ABSENT)  # its associations died with it: wait for nobody
                if self._stopping.is_set() or process.exitcode == 0:
                    continue  # told to stop (the service is stopping): not a failure
                log.error(
                    "receiver %d (pid %s) ended with exit code %s; starting it again",
                    index,
                    process.pid,
                    process.exitcode,
                )
                self._stopping.wait(1.0)  # one that dies at once does not spin
                if self._stopping.is_set():
                    continue
                try:
                    self._processes[index] = self._spawn(index)
                except Exception as exc:  # tried again on the next round: the dead one stays listed
                    log.error("receiver %d cannot be started: %s", index, describe_error(exc))

    def _listen(self) -> None:
        """Write the receivers' log records and count their outcomes, as the node's own."""
        while True:
            try:
                message = self._messages.get(timeout=REPORT_INTERVAL_S)
            except queue.Empty:
                if self._stopping.is_set() and not any(p.is_alive() for p in self._processes.values()):
                    return
                continue
            except (EOFError, OSError):
                return
            if isinstance(message, logging.LogRecord):
                logging.getLogger(message.name).handle(message)
            else:
                for (family, outcome), times in message.items():
                    self.count(family, outcome, times)

    def stop(self) -> None:
        """Stop every receiver, killing any that outlasts STOP_TIMEOUT_S; their last records and
        counts are written before this returns."""
        self._stopping.set()
        processes = list(self._processes.values())
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                log.error("receiver %s did not stop in %.0f s; killed", process.name, STOP_TIMEOUT_S)
                process.kill()
                process.join()
        if self.supervisor.is_alive():
            self.supervisor.join()
        if self._listener.is_alive():
            self._listener.join(STOP_TIMEOUT_S)
        self.share.close()
        self._messages.close()


def _said_ready(ready) -> bool:
    """Whether the receiver wrote that it listens (a pipe closed by its death reads as EOF)."""
    try:
        return bool(ready.poll() and ready.recv())
    except EOFError:
        return False


def receive(setup: ReceiverSetup, share: Share, index: int, messages, ready, node: int) -> None:
    """A receiver process: an SCP and spool on the node's state folder until told to stop.

    Exits 0 when told to stop (SIGTERM, SIGINT) or when the node (process `node`, its parent)
    is gone, and not 0 on failure. The node's process ID comes from the node: this process
    starts in about a second (it imports pydicom and pynetdicom), and a node killed meanwhile
    would leave it the parent of init's, a receiver of no node holding the port for ever.
    """
    from dicomnode.metrics import count_scp
    from dicomnode.net.scp import start_scp
    from dicomnode.net.tls import server_context
    from dicomnode.spool import Spool

    os.umask(0o077)
    _log_to(messages, setup.log_level)
    stop = StopSignals()
    if os.getppid() != node:
        sys.exit(0)  # the node is gone already: nobody to receive for, nor to tell
    try:
        spool = Spool.open_existing(
            setup.state_dir, read_only=False, min_free_bytes=setup.scp.min_free_mb << 20
        )
        tls = None if setup.scp.tls is None else server_context(setup.scp.tls, setup.tls_origin)
        spool.start_settling(str(index))  # its own landing log, made durable first
        server = start_scp(spool, setup.scp, tls, share=share, index=index, clear_incoming=False)
    except Exception as exc:
        log.error("receiver %d cannot start: %s (%s)", index, describe_error(exc), where_raised(exc))
        _last_messages(messages, node)
        sys.exit(1)
    counts: Counter[tuple[str, str]] = Counter()
    counting = threading.Lock()

    def count(family: str, outcome: str) -> None:
        with counting:
            counts[family, outcome] += 1

    def report() -> None:
        with counting:
            if counts:
                messages.put(dict(counts))
                counts.clear()

    if setup.count:
        count_scp(server, count)
    with suppress(BrokenPipeError):  # a receiver started again is not waited for
        ready.send(True)
    ready.close()
    log.debug("receiver %d listening", index)
    while not stop.wait(REPORT_INTERVAL_S) and os.getppid() == node:
        report()
    server.shutdown()
    server.server_close()
    spool.stop_settling()
    report()
    spool.close()
    _last_messages(messages, node)


def _last_messages(messages, node: int) -> None:
    """Send what is queued for the node before the process exits; not if the node is gone:
    nobody reads the queue then, and since every receiver holds its reading end, waiting for
    the last records to be written could wait for ever."""
    messages.close()
    if os.getppid() != node:
        messages.cancel_join_thread()
    messages.join_thread()


def _log_to(messages, level: str) -> None:
    """Log as the node does (dicomnode at `level`, the DICOM libraries silenced), to the node."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    # Each record is sent with its message (and traceback) formatted, its arguments dropped.
    root.addHandler(logging.handlers.QueueHandler(messages))
    set_levels(level)
