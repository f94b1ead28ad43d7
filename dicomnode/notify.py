"""systemd's notify protocol: readiness, status, and the watchdog's pings.

Under `Type=notify` systemd names a unix datagram socket in NOTIFY_SOCKET; each message is
newline-separated KEY=VALUE lines (READY=1, STATUS=..., WATCHDOG=1, STOPPING=1). With
`WatchdogSec=` it also sets WATCHDOG_USEC (and WATCHDOG_PID, the process meant): a service
that sends no WATCHDOG=1 within that time is killed and restarted.

The protocol is a few lines; the `sdnotify` package has not been released since 2017, ignores
WATCHDOG_USEC and swallows every send error. Here a failed send is logged once, not hidden.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends notify messages to systemd; does nothing when not started by systemd."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        # An address starting with "@" is in the abstract namespace (a leading NUL byte).
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_usec = watchdog_usec
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self.address else None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """The notifier systemd asked for through NOTIFY_SOCKET and WATCHDOG_USEC/WATCHDOG_PID."""
        env = os.environ if environ is None else environ
        usec = None
        raw = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is for: a child that inherited it is not.
        if raw.isdigit() and int(raw) > 0 and (not pid or pid == str(os.getpid())):
            usec = int(raw)
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        """Whether systemd listens (NOTIFY_SOCKET was set)."""
        return self._socket is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def send(self, **fields: str) -> None:
        """Send one message of KEY=VALUE lines (STATUS is one line: newlines become spaces)."""
        if self._socket is None:
            return
        message = "\n".join(f"{key}={' '.join(str(value).splitlines())}" for key, value in fields.items())
        try:
            self._socket.sendto(message.encode("utf-8"), self.address)
        except OSError as exc:
            if not self._failed:  # once: a ping every few seconds must not flood the log
                log.warning("cannot notify systemd at NOTIFY_SOCKET: %s", exc.strerror or exc)
            self._failed = True
        else:
            self._failed = False

    def ready(self, status: str) -> None:
        """Start-up is complete: systemd considers the service started."""
        self.send(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        """A one-line status that `systemctl status` shows."""
        self.send(STATUS=status)

    def watchdog(self) -> None:
        """I am alive and none of my stages is stuck."""
        if self.watchdog_usec is not None:
            self.send(WATCHDOG="1")

    def stopping(self) -> None:
        """Shutdown has begun."""
        self.send(STOPPING="1", STATUS="stopping")

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class StopSignals:
    """SIGTERM and SIGINT, caught: `received` once either came.

    Python runs signal handlers in the main thread, between its bytecodes; the handler here
    only sets a flag for the main thread to look at. One that set a threading.Event deadlocked
    when the signal came while the main thread held that Event's lock in its own wait() (a
    receiver then did not stop for 30 s, until it was killed).
    """

    def __init__(self) -> None:
        self.received = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._receive)

    def _receive(self, signum: int, frame: object) -> None:
        self.received = True

    def wait(self, seconds: float) -> bool:
        """Sleep `seconds` (a signal does not cut it short); whether a stop signal came."""
        if not self.received:
            time.sleep(seconds)
        return self.received
