"""Connections spread over the receiving processes (scp.receivers) by how many each has open.

The node listens on one socket and its receiving processes accept from that same socket, each
in its own accept loop. A connection wakes every loop; a process takes it only when no live
process has fewer associations open, else it leaves it to one that has, for at most DEFER_S
(a process whose interpreter is busy, or one that hangs, must not keep a sender waiting).

Why not SO_REUSEPORT, with a socket per process: the kernel then picks the process by a hash
of the connection's addresses, at random as far as load goes. Measured with 2,000 tries of
four connections to two sockets, the busier one got 3 or 4 of them in 63% of tries; to four
sockets, one got 2 or more in 91%. On a 16-core host, two receiving processes were no faster
than one for four senders (0.34x storescp both), four were 0.49x. A connection queued on a
socket whose process then died was also reset; on the one shared socket it waits for another.

`Share.open[i]` counts what process i (0 is the node's own) has accepted and not yet finished:
raised when a connection is accepted, lowered when its association ends, or when it ends
without one (a failed TLS handshake, a refused thread). A process not listening (not started
yet, dead, restarting) counts as ABSENT, so nobody waits for it.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from multiprocessing.context import BaseContext

from dicomnode.config import ScpConfig
from dicomnode.net.tls import HandshakingServer

#: Longest a process leaves a waiting connection to a process with fewer associations open.
DEFER_S = 0.02

#: Between two looks at the counts while leaving a connection to another process.
_DEFER_STEP_S = 0.0005

#: The count of a process that is not listening: never the fewest.
ABSENT = 1 << 30


def cannot_listen(scp: ScpConfig, exc: OSError) -> OSError:
    """The error of an SCP that cannot listen on its address, naming it."""
    return OSError(f"Storage SCP cannot listen on {scp.host}:{scp.port}: {exc.strerror}")


class Share:
    """The listening socket the node and its receiving processes accept from, and each
    process's count of open associations; made by the node and passed to each receiver.

    The counts are shared memory without a lock between processes: a process killed while
    holding one would stop every other from accepting. Each process writes only its own count
    (under a lock of its threads), and the node's supervisor that of a process that died; the
    others read them, an aligned int at a time.
    """

    def __init__(self, listening: socket.socket, open_counts) -> None:
        self.socket = listening
        self.open = open_counts
        self._writing = threading.Lock()

    def __getstate__(self) -> dict:
        return {"socket": self.socket, "open": self.open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["socket"], state["open"])

    @classmethod
    def listen(cls, scp: ScpConfig, processes: int, context: BaseContext) -> Share:
        """Listen on the SCP's address for `processes` processes; OSError naming the address
        if it is taken (no process sets SO_REUSEPORT: a second node cannot share it silently)."""
        family = socket.AF_INET6 if ":" in scp.host else socket.AF_INET
        listening = socket.socket(family, socket.SOCK_STREAM)
        try:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pynetdicom's
            listening.bind((scp.host, scp.port))
            listening.listen(max(socket.SOMAXCONN, 128))
        except OSError as exc:
            listening.close()
            raise cannot_listen(scp, exc) from exc
        # Shared by every process's copy: an accept that another process won raises at once.
        listening.setblocking(False)
        counts = context.RawArray("i", [ABSENT] * processes)
        return cls(listening, counts)

    def set(self, index: int, value: int) -> None:
        """Set process `index`'s count: its own, or a dead one's (by the node)."""
        with self._writing:
            self.open[index] = value

    def add(self, index: int, change: int) -> None:
        """Change this process's count, `index`."""
        with self._writing:
            self.open[index] += change

    def others_have_fewer(self, index: int) -> bool:
        """Whether a live process other than `index` has fewer associations open. The node's own
        (0), which also decodes and runs inference, counts half an association more: it takes a
        connection only when every receiver has more open than it has, so a lone sender goes to
        a receiver. Half, so that the node and a receiver never tie and both defer."""
        load = [2 * count + (process == 0) for process, count in enumerate(self.open[:])]
        return min(load) < load[index]

    def close(self) -> None:
        """Close this process's copy of the listening socket (the others keep theirs)."""
        self.socket.close()


def _readable(listening: socket.socket) -> bool:
    return bool(select.select([listening], [], [], 0)[0])


class BalancedServer(HandshakingServer):
    """The SCP of one of the node's receiving processes: accepts from the shared socket when no
    live process has fewer associations open. `share` and `index` are set by `balanced_server`."""

    share: Share
    index: int

    def server_bind(self) -> None:
        """Take a copy of the node's listening socket instead of binding one."""
        self.socket.close()
        # Not socket.dup(): its settimeout would make the descriptor, shared by every process,
        # blocking for a moment, and an accept in another process could then wait for the next
        # connection. A socket made from a descriptor leaves its flags as they are.
        shared = self.share.socket
        self.socket = socket.socket(shared.family, shared.type, shared.proto, fileno=os.dup(shared.fileno()))
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        #: Accepted connections counted in this process's count and not yet handed to an
        #: association: whoever takes one out (association_started, _release) gives it back.
        self._opened: set[object] = set()
        self._opened_lock = threading.Lock()

    def server_activate(self) -> None:
        """The shared socket listens already; this process now counts as live."""
        self.share.set(self.index, 0)

    def get_request(self):
        deadline = time.monotonic() + DEFER_S
        while self.share.others_have_fewer(self.index) and time.monotonic() < deadline:
            if not _readable(self.socket):
                raise BlockingIOError("taken by another receiving process")
            time.sleep(_DEFER_STEP_S)
        client, address = super().get_request()  # BlockingIOError if another took it first
        with self._opened_lock:
            self._opened.add(client)
        self.share.add(self.index, 1)
        return client, address

    def association_started(self, request, assoc) -> None:
        """Count `request`'s connection until `assoc`'s thread ends, however it ends."""
        if not self._take(request):
            return
        run = assoc.run

        def run_then_release() -> None:
            try:
                run()
            finally:
                self.share.add(self.index, -1)

        assoc.run = run_then_release

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)  # ended without an association (else that has it now)

    def shutdown_request(self, request) -> None:
        self._release(request)
        super().shutdown_request(request)

    def _release(self, request) -> None:
        if self._take(request):
            self.share.add(self.index, -1)

    def _take(self, request) -> bool:
        """Take `request` out of the connections not yet handed on; whether it was there."""
        with self._opened_lock:
            if request not in self._opened:
                return False
            self._opened.remove(request)
            return True

    def server_close(self) -> None:
        """Close this process's copy only: pynetdicom's shutdown(SHUT_RDWR) of a listening
        socket would stop it listening for every process."""
        self.share.set(self.index, ABSENT)
        self.socket.close()


def balanced_server(share: Share, index: int) -> type[BalancedServer]:
    """The server class for process `index` (0: the node's own) of `share`."""
    return type("BalancedServer", (BalancedServer,), {"share": share, "index": index})
