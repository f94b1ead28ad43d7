"""Delivery: every result reaches every destination at least once, or ends in the dead letter.

One worker thread per destination, so a destination that is down or misconfigured never
holds back the others. The queue lives in the journal: a restart resumes where it stopped.

The policy tells two kinds of failure apart. A destination that cannot be reached (connection
refused, timeout, association rejected or aborted, 0xA7xx out of resources) is retried with
exponential backoff up to `max_backoff_s`, for `retry_for_hours` after the first failure (and
at most `max_attempts` times if set): a PACS down for a weekend gets its results when it is
back. An object the destination refuses (its SOP class rejected, a status that judges the
object such as 0xA9xx or 0xCxxx) or a result file that cannot be sent will fail the same way
every time: it goes to the dead letter at once, with the reason, instead of hiding for days
among the retries. Dead letters show in `dicomnode status` until an operator runs `dicomnode
requeue`. A STOW-RS destination follows the same policy: no connection, timeouts, HTTP 5xx, 429
and authentication failures are retried; 400, 409 and the other answers that judge the object
are refused (net/stow.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.errors import InvalidDicomError

from dicomnode.config import DestinationConfig
from dicomnode.flow import Delivery
from dicomnode.health import Heartbeat
from dicomnode.net.scu import AssociationFailed, ContextsRejected, Peer, StoreOutcome, store
from dicomnode.net.stow import StowEndpoint, StowRefused, StowUnreachable, stow
from dicomnode.privacy import uid_tag, where_raised
from dicomnode.spool import Spool

log = logging.getLogger(__name__)


def retry_delay(destination: DestinationConfig, attempts_made: int) -> float:
    """Seconds to wait after the `attempts_made`-th failure: doubling, capped."""
    # The exponent is bounded so that days of attempts cannot overflow the float.
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
        # A C-STORE peer, or a STOW-RS endpoint (its secrets read here, at start-up).
        self.peer: Peer | StowEndpoint = (
            StowEndpoint.of(destination) if destination.stow_url is not None else Peer.of(destination)
        )
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
            except Exception as exc:  # the loop must outlive any single failure
                log.error("outbox %s: unexpected error: %s", self.destination.name, where_raised(exc))
                self.stop_event.wait(1.0)
        self.spool.close()

    def deliver(self, delivery: Delivery) -> bool:
        """One C-STORE or STOW-RS attempt; records success, a retry time, or the dead letter."""
        error, refused = self._attempt(delivery)
        if error is None:
            return True
        now = time.time()
        attempts = delivery.attempts + 1
        retry_for_s = self.destination.retry_for_hours * 3600.0
        window_end = (delivery.first_failed_at or now) + retry_for_s
        max_attempts = self.destination.max_attempts
        if refused:
            gave_up = f"refused by {self.destination.name}: {error}"
        elif now >= window_end:
            gave_up = f"unreachable for {self.destination.retry_for_hours:g} h ({attempts} attempts): {error}"
        elif max_attempts is not None and attempts >= max_attempts:
            gave_up = f"failed {attempts} attempts: {error}"
        else:
            # The last retry falls at the end of the window, not one backoff after it.
            delay = min(retry_delay(self.destination, attempts), window_end - now)
            self.spool.delivery_failed(delivery, error, retry_at=now + delay)
            log.warning(
                "delivery %d to %s failed (%s); retry in %.0f s",
                delivery.id,
                self.destination.name,
                error,
                delay,
            )
            return False
        self.spool.delivery_failed(delivery, gave_up, retry_at=None)
        log.error("dead letter: delivery %d to %s: %s", delivery.id, self.destination.name, gave_up)
        return False

    def _attempt(self, delivery: Delivery) -> tuple[str | None, bool]:
        """Send the file once: (None, False) when sent, else (the error, whether it is refused for good)."""
        if not delivery.path.is_file():
            return "result file is missing", True
        try:
            outcome = self._send(delivery.path)
        except (ContextsRejected, StowRefused) as exc:  # it will not take this SOP class or object
            return self._log_safe(str(exc), delivery), True
        except (AssociationFailed, StowUnreachable, OSError) as exc:
            # Unreachable, rejected or aborted: the destination may be back later.
            return self._log_safe(str(exc), delivery), False
        # A file that is not DICOM (or not sendable) will never be: the dead letter at once,
        # instead of escaping to run() and blocking this destination's queue forever.
        except (InvalidDicomError, ValueError) as exc:
            return self._log_safe(str(exc), delivery), True
        if outcome.ok:
            self.spool.delivery_sent(delivery)
            log.info("delivered %s to %s", uid_tag(delivery.path.stem), self.destination.name)
            return None, False
        if outcome.status is None:
            return self._log_safe(outcome.comment, delivery), outcome.refused
        return f"status 0x{outcome.status:04X} {outcome.comment}".rstrip(), outcome.refused

    def _send(self, path: Path) -> StoreOutcome:
        if isinstance(self.peer, StowEndpoint):
            return stow(self.peer, path)
        return store(self.peer, [path], calling_ae=self.calling_ae)[0]

    @staticmethod
    def _log_safe(error: str, delivery: Delivery) -> str:
        """Result paths are made of UIDs: the log and the journal get the tag instead."""
        return error.replace(str(delivery.path), f"result {uid_tag(delivery.path.stem)}")
