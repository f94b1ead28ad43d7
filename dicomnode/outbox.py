"""Delivery: every result reaches every destination at least once, or ends in the dead letter.

One worker thread per destination, so a destination that is down or misconfigured never
holds back the others. The queue lives in the journal: a restart resumes where it stopped.
Retries back off exponentially up to `max_backoff_s`; after `max_attempts` a delivery is
dead and shows in `dicomnode status` until an operator runs `dicomnode requeue`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pydicom.errors import InvalidDicomError

from dicomnode.config import DestinationConfig
from dicomnode.flow import Delivery
from dicomnode.health import Heartbeat
from dicomnode.net.scu import AssociationFailed, Peer, store
from dicomnode.privacy import uid_tag
from dicomnode.spool import Spool

log = logging.getLogger(__name__)


def retry_delay(destination: DestinationConfig, attempts_made: int) -> float:
    """Seconds to wait after the `attempts_made`-th failure: doubling, capped."""
    # The exponent is bounded so that a large max_attempts cannot overflow the float.
    doublings = min(max(attempts_made - 1, 0), 64)
    return min(destination.backoff_s * 2**doublings, destination.max_backoff_s)


class DestinationWorker(threading.Thread):
    """Sends the pending deliveries of one destination, in order, until stopped."""

    def __init__(
        self, spool: Spool, destination: DestinationConfig, calling_ae: str, stop: threading.Event
    ) -> None:
        super().__init__(name=f"outbox-{destination.name}", daemon=True)
        self.spool = spool
        self.destination = destination
        self.calling_ae = calling_ae
        self.stop_event = stop
        self.peer = Peer(destination.host, destination.port, destination.ae_title, destination.timeout_s)
        #: Liveness, and who learns the outbox state each attempt left (the node's metrics).
        self.heartbeat = Heartbeat(self.name)
        self.observe: Callable[[str, str | None], None] = lambda destination, state: None

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                with self.heartbeat.step():
                    delivery = self.spool.next_delivery(self.destination.name)
                    if delivery is not None:
                        self.deliver(delivery)
                        self.observe(self.destination.name, self.spool.delivery_state(delivery.id))
                if delivery is None:
                    self.stop_event.wait(0.5)
            except Exception:  # the loop must outlive any single failure
                log.exception("outbox %s: unexpected error", self.destination.name)
                self.stop_event.wait(1.0)
        self.spool.close()

    def deliver(self, delivery: Delivery) -> bool:
        """One C-STORE attempt; records success, a retry time, or the dead letter."""
        error = None
        if not delivery.path.is_file():
            error = "result file is missing"
        else:
            try:
                outcome = store(self.peer, [delivery.path], calling_ae=self.calling_ae)[0]
                if outcome.ok:
                    self.spool.delivery_sent(delivery)
                    log.info("delivered %s to %s", uid_tag(delivery.path.stem), self.destination.name)
                    return True
                error = (
                    f"status 0x{outcome.status:04X} {outcome.comment}"
                    if outcome.status is not None
                    else outcome.comment
                )
            # A file that is not DICOM fails like an unreachable peer: retried, then dead letter,
            # instead of escaping to run() and blocking this destination's queue forever.
            except (AssociationFailed, InvalidDicomError, OSError, ValueError) as exc:
                # Result paths are made of UIDs: the log and the journal get the tag instead.
                error = str(exc).replace(str(delivery.path), f"result {uid_tag(delivery.path.stem)}")
        attempts = delivery.attempts + 1
        if attempts >= self.destination.max_attempts:
            self.spool.delivery_failed(delivery, error, retry_at=None)
            log.error(
                "dead letter: delivery %d to %s after %d attempts: %s",
                delivery.id,
                self.destination.name,
                attempts,
                error,
            )
        else:
            delay = retry_delay(self.destination, attempts)
            self.spool.delivery_failed(delivery, error, retry_at=time.time() + delay)
            log.warning(
                "delivery %d to %s failed (%s); retry in %.0f s",
                delivery.id,
                self.destination.name,
                error,
                delay,
            )
        return False
