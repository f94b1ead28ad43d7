"""pynetdicom's acceptor associations, woken by what they wait for instead of polling.

pynetdicom runs each association in two threads that poll. Its DUL thread, with nothing to
do, sleeps 1 ms and then looks at the socket and at the primitives queued to send; the
association thread sleeps 1 ms before every look for a decoded DIMSE message, a release or an
abort. A C-STORE crosses both: its request waits on the DUL thread's sleep to be read, then on
the association thread's to be served, its response on the DUL thread's again to be sent. At
DCMTK's pace (a 39 KB slice every 0.6 ms) those waits were a large part of the receive time.

Here the DUL thread blocks in select() on its socket and on a pipe that is written whenever a
primitive is queued to send or the thread is told to stop; a TLS socket's decrypted bytes
that select() cannot see (SSLSocket.pending()) are read before it blocks. The association
thread waits on an event the DUL thread sets after each state machine action that gives it
something to do (a message decoded, a release or abort received) and when it ends. Both
still wake at least every `MAX_WAIT_S` and at their timers' expiry (ARTIM, network idle), so
the timeouts keep their meaning, and a wake-up pynetdicom might need that this module does
not know of costs that much latency rather than a hang.

The loops below are pynetdicom's own (`DULServiceProvider.run_reactor`,
`Association._run_reactor`, `RequestHandler._create_association`) with the sleeps replaced,
so they are checked against the pynetdicom versions in `CHECKED_VERSIONS`; on any other
version `acceptor_association` builds pynetdicom's stock association.

`acceptor_association` also shares the server's presentation contexts with each association
instead of deep-copying them (about 35-70 ms of CPU per association for every storage SOP
class in every transfer syntax): an acceptor only reads them while it negotiates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import ssl
import struct
import threading
from datetime import datetime

import pynetdicom
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicomnode.net.storestream import ProtocolError, StoreStream

log = logging.getLogger(__name__)

#: pynetdicom versions whose reactor loops the ones below were compared with, line by line.
CHECKED_VERSIONS = frozenset({"3.0.4"})

#: PDU types of PS3.8 9.3 (A-ASSOCIATE-RQ to A-ABORT), and P-DATA-TF's.
_PDU_TYPES = frozenset(range(0x01, 0x08))
_P_DATA_TF = 0x04

#: Longest a thread waits without being woken, and so the longest a missed wake-up costs.
MAX_WAIT_S = 0.05

#: Longest the DUL thread waits, with a PDU to read, for its association thread to finish
#: establishing the association (EVT_ACCEPTED's handlers). Past it the PDU goes to pynetdicom.
ESTABLISHING_WAIT_S = 1.0


def event_driven() -> bool:
    """True when the installed pynetdicom is one whose loops this module replaces."""
    return pynetdicom.__version__ in CHECKED_VERSIONS


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DICOM Upper Layer thread, blocking in select() instead of sleeping."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        #: Set after a state machine action that gives the association thread something to
        #: do (a whole message, a primitive for its user, a change of state), and when the
        #: thread ends: the association thread waits on it.
        self.activity = threading.Event()
        self._wake_lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._wake_open = True
        #: Serves C-STORE requests off the P-DATA this thread reads (net.storestream); set by
        #: the SCP before the association starts. None: all PDUs go to pynetdicom.
        self.store_stream: StoreStream | None = None
        #: Largest PDU this thread reads into memory (a larger one closes the connection).
        self.max_pdu_read_bytes = 1 << 20
        self._buffer = bytearray()
        #: The last select() found the socket readable: no need to ask it again before reading.
        self._socket_readable = False

    def _wake(self) -> None:
        """Interrupt the thread's select(); a no-op once the thread ended and closed its pipe."""
        with self._wake_lock:
            if self._wake_open:
                with contextlib.suppress(BlockingIOError):  # full of unread wake-ups: it wakes anyway
                    os.write(self._wake_write, b"\0")

    def send_pdu(self, primitive) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        """As pynetdicom's: stop the thread if the state machine is idle (Sta1), and wait for it."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True

    def run_reactor(self) -> None:
        try:
            self._react()
        finally:
            if self.store_stream is not None:
                self.store_stream.close()
            with self._wake_lock:
                self._wake_open = False
                os.close(self._wake_read)
                os.close(self._wake_write)
            self.activity.set()

    def _react(self) -> None:
        """pynetdicom's run_reactor, with `_wait_for_work` where it sleeps."""
        self._idle_timer.start()
        wait = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                wait = True
            if wait:
                self._wait_for_work()
            if self._kill_thread:
                break
            # The ARTIM timer first, so that its event is queued ahead of any other.
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                # As pynetdicom: bypass the state machine, whose state can no longer be trusted.
                log.error("association aborted: its DICOM upper layer failed (%s)", exc.__class__.__name__)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                wait = True
                continue
            self.state_machine.do_action(event)
            # A P-DATA-TF in the middle of a message gives the association thread nothing to
            # do; waking it for each would cost a GIL hand-over per PDU.
            if event != "Evt10" or self.assoc.dimse.msg_queue.qsize() or self.to_user_queue.qsize():
                self.activity.set()
            wait = False

    def _is_transport_event(self) -> bool:
        """As pynetdicom's, without its second select() when the wait's select() just found the
        socket readable (one system call, and one GIL hand-over, fewer per PDU)."""
        if self._socket_readable and self.state_machine.current_state != "Sta13":
            self._socket_readable = False
            self._read_pdu_data()
            return True
        self._socket_readable = False
        return super()._is_transport_event()

    def _read_pdu_data(self) -> None:
        """Read one PDU; serve its C-STOREs where the stream takes them, else as pynetdicom would.

        Once the association is established (Sta6) a P-DATA-TF goes to `store_stream`, whose
        fragments for pynetdicom are handed to its DIMSE layer as its own DT-2 action does;
        other PDUs are decoded into their state machine events as pynetdicom's own read does.
        """
        if self.store_stream is None or self.state_machine.current_state != "Sta6":
            super()._read_pdu_data()
            return
        # The peer may send its first C-STORE as soon as it has the A-ASSOCIATE-AC, while the
        # association thread is still in EVT_ACCEPTED's handlers: the stream serves only an
        # established association's, so wait for it rather than leave this one to pynetdicom.
        self.assoc.established.wait(ESTABLISHING_WAIT_S)
        try:
            header = bytes(self._read_exactly(6))
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in _PDU_TYPES:
                log.error("association aborted: unknown PDU type 0x%02X received", pdu_type)
                self.event_queue.put("Evt19")
                return
            if length > self.max_pdu_read_bytes:
                peer = self.assoc.requestor.address
                log.warning("connection from %s closed: a PDU of %d bytes announced", peer, length)
                raise ConnectionError(f"PDU of {length} bytes exceeds {self.max_pdu_read_bytes}")
            body = self._read_exactly(length)
        except (OSError, EOFError):  # as pynetdicom: the transport connection is gone (Evt17)
            self.event_queue.put("Evt17")
            return
        if pdu_type != _P_DATA_TF:
            try:
                pdu, event = self._decode_pdu(bytearray(header) + body)
            except Exception as exc:
                log.error("association aborted: a PDU could not be decoded (%s)", exc.__class__.__name__)
                self.event_queue.put("Evt19")
                return
            self.event_queue.put(event)
            self._recv_pdu.put(pdu)
            return
        try:
            passed = self.store_stream.receive(body)
        except ProtocolError as exc:
            log.error("association aborted: %s", exc)
            self.event_queue.put("Evt19")
            return
        if passed:
            primitive = P_DATA()
            primitive.presentation_data_value_list = passed
            self.assoc.dimse.receive_primitive(primitive)
            self.activity.set()

    def _read_exactly(self, size: int) -> memoryview:
        """`size` bytes from the socket into the thread's buffer (valid until the next read)."""
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        view = memoryview(self._buffer)[:size]
        connection = self.socket.socket
        received = 0
        while received < size:
            count = connection.recv_into(view[received:], size - received)
            if not count:
                raise EOFError("the peer closed the connection inside a PDU")
            received += count
        return view

    def _wait_for_work(self) -> None:
        """Block until the socket is readable, a wake-up comes, or a timer may have expired."""
        if self._kill_thread or not self.event_queue.empty() or not self.to_provider_queue.empty():
            return
        connection = self.socket.socket if self.socket is not None and self.socket._is_connected else None
        if isinstance(connection, ssl.SSLSocket) and connection.pending():
            return  # decrypted bytes already read from the socket: select() would not see them
        timeout = min(MAX_WAIT_S, max(0.0, self.artim_timer.remaining))
        watched = [self._wake_read] if connection is None else [self._wake_read, connection]
        try:
            readable, _, _ = select.select(watched, [], [], timeout)
        except (OSError, ValueError):  # the socket was closed meanwhile: the loop's checks find out
            readable, _, _ = select.select([self._wake_read], [], [], timeout)
        self._socket_readable = connection is not None and connection in readable
        if self._wake_read in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_read, 4096)


class EventDrivenAssociation(Association):
    """pynetdicom's acceptor association, whose thread waits on its DUL instead of sleeping."""

    def __init__(self, ae, mode: str) -> None:
        #: Set once the association is first established, after EVT_ACCEPTED's handlers.
        self.established = threading.Event()
        super().__init__(ae, mode)
        self.dul = EventDrivenDUL(self)
        # pynetdicom's timeout setters configure the DUL's timers: configure the new one's.
        self.acse_timeout = self.ae.acse_timeout
        self.network_timeout = self.ae.network_timeout

    @property
    def is_established(self) -> bool:
        return self._is_established

    @is_established.setter
    def is_established(self, value: bool) -> None:
        self._is_established = value
        if value:
            self.established.set()

    def kill(self) -> None:
        """As pynetdicom's, waiting for the DUL thread to stop instead of polling every 10 ms."""
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        activity = self.dul.activity
        activity.set()
        while self.dul.is_alive() and not self.dul.stop_dul():
            activity.wait(MAX_WAIT_S)
            activity.clear()

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop, waiting on the DUL's activity where it sleeps 1 ms.

        The event is cleared before each look, and waited on only after a look that found no
        message, so that a message decoded at any moment is served without delay.
        """
        self._is_paused = False
        activity = self.dul.activity
        idle = False
        while not self._kill:
            if idle:
                activity.wait(min(MAX_WAIT_S, max(0.0, self.dul._idle_timer.remaining)))
            activity.clear()
            # Paused while a handler uses the association itself (pynetdicom's send_* methods).
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            idle = not msg
            if msg:
                self._serve_request(msg, context_id)

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                log.debug("association released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log.debug("association aborted")
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for its subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.info("association silent for the network timeout of %s s: ended", self.network_timeout)
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def acceptor_association(handler: RequestHandler) -> Association:
    """The association for a connection `handler` accepted: event-driven where checked.

    pynetdicom's RequestHandler._create_association, with the server's presentation contexts
    shared instead of deep-copied; pynetdicom's own on a version not checked.
    """
    if not event_driven():
        return RequestHandler._create_association(handler)
    server = handler.server
    assoc = EventDrivenAssociation(handler.ae, MODE_ACCEPTOR)
    assoc._server = server
    assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
    assoc.set_socket(AssociationSocket(assoc, client_socket=handler.request))
    acceptor = assoc.acceptor
    acceptor.maximum_length = handler.ae.maximum_pdu_size
    acceptor.ae_title = server.ae_title
    acceptor.address_info = handler.local
    acceptor.implementation_class_uid = handler.ae.implementation_class_uid
    acceptor.implementation_version_name = handler.ae.implementation_version_name
    acceptor.supported_contexts = list(server.contexts)
    assoc.requestor.address_info = handler.remote
    for event, handlers in server._handlers.items():
        if event.is_intervention and handlers:
            assoc.bind(event, *handlers)
        elif isinstance(event, evt.NotificationEvent):
            for handler_function, arguments in handlers:
                assoc.bind(event, handler_function, arguments)
    return assoc
