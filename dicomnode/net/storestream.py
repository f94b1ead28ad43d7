"""C-STORE requests read straight off an association's P-DATA, in the thread that reads them.

pynetdicom turns each P-DATA-TF into PDU and primitive objects, queues the decoded message for
the association thread, parses its command set with pydicom, serves it there, encodes the
response with pydicom and queues it back for the DUL thread to send. For a CT slice that was
about 1 ms of Python and two thread hand-overs, as much as DCMTK's storescp spends on the
whole instance (py-spy of `dicomnode bench receive`). Here the DUL thread reads a P-DATA-TF
into one buffer, writes the data set's fragments to the received file as they come, parses
the few command elements a C-STORE has, asks the node to store the file, and sends the
response itself.

Only the common case takes this path: a C-STORE-RQ with a data set, on an accepted
presentation context of an established association. Any other message (a C-ECHO, a C-STORE
that arrives before pynetdicom marked the association established, a command set this module
cannot read) goes to pynetdicom's DIMSE layer unchanged, fragment for fragment, and so do all
other PDUs (release, abort). Negotiation, timers, release and abort stay pynetdicom's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom.dimse_messages import C_STORE_RSP as C_STORE_RSP_MESSAGE
from pynetdicom.dsutils import decode

log = logging.getLogger(__name__)

#: Command Field (0000,0100) of a C-STORE-RQ and a C-STORE-RSP.
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
#: Command Data Set Type (0000,0800) of a message without a data set.
NO_DATA_SET = 0x0101
#: Message Control Header bits (PS3.8 E.2): command (else data set), last fragment.
_COMMAND, _LAST = 0x01, 0x02
#: Status sent when the node's store raises instead of answering (pynetdicom's for a failed handler).
HANDLER_FAILED = 0xC211
SUCCESS = 0x0000

_PDU_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length
_PDV_HEADER = struct.Struct(">LBB")  # item length, presentation context ID, message control header
_ELEMENT_HEADER = struct.Struct("<HHL")  # implicit VR little endian: group, element, length
_US = struct.Struct("<H")
_ELEMENT_EXPLICIT_SHORT = struct.Struct("<HH2sH")  # explicit VR, 2-byte length (UI, SH, UL)
_ELEMENT_EXPLICIT_LONG = struct.Struct("<HH2sHL")  # explicit VR, reserved, 4-byte length (OB)
_PREAMBLE = b"\0" * 128 + b"DICM"
_UNTIL_DATA_SET_ENDS, _FOR_GOOD = "until its data set ends", "for good"
#: Largest instance whose bytes are kept in memory while it is written (a CT or MR slice is
#: 40-520 KB), so that the node reads its header without opening and mapping the file again.
HELD_BYTES = 1 << 20


class ProtocolError(ValueError):
    """The peer broke the P-DATA rules (PS3.8 9.3.5, E.2): the association must be aborted."""


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE-RQ whose data set was received whole into `path` (a DICOM file, with file meta,
    not yet synced).

    `write_error` is set when the file could not be written: the data set was read
    to its end and dropped, and the request must be refused with a status that asks for a retry.
    """

    message_id: int
    context_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    path: Path
    write_error: OSError | None = None
    #: The file's bytes as written, for an instance of at most HELD_BYTES (its header is then
    #: read from memory, not the file); None for a larger one.
    content: bytes | None = None


#: The node's store: (association, request) to (status, Error Comment or None). On success it
#: owns the file (moves it into the spool, or deletes it); after a refusal the stream deletes it.
Store = Callable[[object, StoreRequest], tuple[int, "str | None"]]


@dataclass
class _Receiving:
    """The C-STORE whose data set is arriving into `request.path`, open as `fd`."""

    request: StoreRequest
    fd: int
    error: OSError | None = None
    #: What was written, while it is at most HELD_BYTES; None once it grew larger.
    held: bytearray | None = None


class StoreStream:
    """One association's P-DATA, C-STOREs served from it, everything else passed on.

    `receive` takes the variable field of each P-DATA-TF PDU and returns the fragments that
    belong to pynetdicom, as its P-DATA primitives hold them: (context ID, control header
    byte + fragment). `send` writes bytes to the association's socket.
    """

    def __init__(self, assoc, store: Store, incoming_dir: Path | None, send: Callable[[bytes], None]) -> None:
        self.assoc = assoc
        self._store = store
        self._incoming_dir = incoming_dir
        self._send = send
        self._command = bytearray()
        self._command_fragments: list[list] = []
        #: Whether fragments are pynetdicom's: up to the last fragment of the data set of the
        #: message in transit (_UNTIL_DATA_SET_ENDS), or from now on (_FOR_GOOD).
        self._passing_on: str | None = None
        self._receiving: _Receiving | None = None

    def receive(self, pdvs: memoryview) -> list[list]:
        """Serve the presentation data values of one P-DATA-TF; return pynetdicom's."""
        passed: list[list] = []
        offset, end = 0, len(pdvs)
        while offset < end:
            if end - offset < _PDV_HEADER.size:
                raise ProtocolError("a presentation data value item is cut short")
            length, context_id, control = _PDV_HEADER.unpack_from(pdvs, offset)
            if length < 2 or offset + 4 + length > end:
                raise ProtocolError(f"a presentation data value item announces {length} bytes")
            self._fragment(context_id, control, pdvs[offset + 6 : offset + 4 + length], passed)
            offset += 4 + length
        return passed

    def _fragment(self, context_id: int, control: int, fragment: memoryview, passed: list) -> None:
        if self._passing_on is not None:
            passed.append([context_id, bytes((control,)) + fragment])
            if self._passing_on == _UNTIL_DATA_SET_ENDS and control & _LAST and not control & _COMMAND:
                self._passing_on = None
            return
        receiving = self._receiving
        if receiving is not None:
            if control & _COMMAND:
                raise ProtocolError("a command arrived before the last fragment of a data set")
            if context_id != receiving.request.context_id:
                raise ProtocolError("a data set fragment arrived on another presentation context")
            self._write(receiving, fragment)
            if control & _LAST:
                self._receiving = None
                self._complete(receiving)
            return
        if not control & _COMMAND:
            passed.append([context_id, bytes((control,)) + fragment])  # pynetdicom's to judge
            return
        self._command += fragment
        self._command_fragments.append([context_id, bytes((control,)) + fragment])
        if control & _LAST:
            command, fragments = bytes(self._command), self._command_fragments
            self._command, self._command_fragments = bytearray(), []
            if not self._start(context_id, command):
                passed.extend(fragments)

    def _start(self, context_id: int, command: bytes) -> bool:
        """Begin receiving a C-STORE's data set; False (the message is pynetdicom's) for anything else."""
        try:
            elements = _elements(command)
            field = _US.unpack(elements[0x0100])[0]
            has_data_set = _US.unpack(elements[0x0800])[0] != NO_DATA_SET
        except (KeyError, ValueError, struct.error):
            # Whether a data set follows is not known: pynetdicom decodes this and all that follows.
            self._passing_on = _FOR_GOOD
            return False
        context = self.assoc._accepted_cx.get(context_id)
        if field != C_STORE_RQ or not has_data_set or context is None or not self.assoc.is_established:
            self._passing_on = _UNTIL_DATA_SET_ENDS if has_data_set else None
            return False
        try:
            message_id = _US.unpack(elements[0x0110])[0]
            sop_class_uid = _uid(elements[0x0002])
            sop_instance_uid = _uid(elements[0x1000])
        except (KeyError, ValueError, struct.error):
            self._passing_on = _UNTIL_DATA_SET_ENDS
            return False
        transfer_syntax = str(context.transfer_syntax[0])
        fd, name = tempfile.mkstemp(dir=self._incoming_dir, prefix=".received-", suffix=".dcm")
        request = StoreRequest(
            message_id, context_id, sop_class_uid, sop_instance_uid, transfer_syntax, Path(name)
        )
        receiving = _Receiving(request, fd, held=bytearray())
        self._write(receiving, file_meta(sop_class_uid, sop_instance_uid, transfer_syntax))
        self._receiving = receiving
        return True

    @staticmethod
    def _write(receiving: _Receiving, data: bytes | memoryview) -> None:
        """Append to the received file; after a failure, read on and drop (the request is refused)."""
        if receiving.error is not None:
            return
        if receiving.held is not None:
            if len(receiving.held) + len(data) <= HELD_BYTES:
                receiving.held += data
            else:
                receiving.held = None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(receiving.fd, view) :]
        except OSError as exc:
            receiving.error = exc

    def _complete(self, receiving: _Receiving) -> None:
        """Close the file, have the node store it, answer; delete the file if refused.

        The node syncs the file once it is in its place in the spool (see InstanceStore._place).
        A stored instance's file is the node's: deleting it here would take the write lock of
        `incoming/` that the next file's creation waits on.
        """
        os.close(receiving.fd)
        held = receiving.held
        request = replace(
            receiving.request,
            write_error=receiving.error,
            content=bytes(held) if held is not None and receiving.error is None else None,
        )
        status, comment = HANDLER_FAILED, None
        try:
            status, comment = self._store(self.assoc, request)
        except Exception as exc:  # as pynetdicom answers a handler that raised
            log.error("C-STORE handler failed (%s)", exc.__class__.__name__)
        finally:
            if status != SUCCESS:
                request.path.unlink(missing_ok=True)
        response = c_store_response(
            request.message_id, request.sop_class_uid, request.sop_instance_uid, status, comment
        )
        self._send(p_data(request.context_id, response, self.assoc.requestor.maximum_length))
        self._tell_observers(request.context_id, response)

    def _tell_observers(self, context_id: int, response: bytes) -> None:
        """Trigger EVT_DIMSE_SENT with the response as sent, as pynetdicom does for its messages.

        Only when someone other than pynetdicom's own debug logger listens (the node's metrics
        count C-STORE outcomes from it): decoding the response back costs about 60 us.
        """
        handlers = self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        if all(handler is standard_dimse_sent_handler for handler, _ in handlers):
            return
        message = C_STORE_RSP_MESSAGE()
        message.context_id = context_id
        message.command_set = decode(BytesIO(response), True, True)
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})

    def close(self) -> None:
        """Delete the file of a data set the association ended in the middle of."""
        receiving, self._receiving = self._receiving, None
        if receiving is not None:
            with contextlib.suppress(OSError):
                os.close(receiving.fd)
            receiving.request.path.unlink(missing_ok=True)


def _elements(command: bytes) -> dict[int, bytes]:
    """The command set's elements (group 0000, implicit VR little endian) by element number."""
    elements, offset = {}, 0
    while offset < len(command):
        group, element, length = _ELEMENT_HEADER.unpack_from(command, offset)
        offset += _ELEMENT_HEADER.size
        if group != 0 or offset + length > len(command):
            raise ValueError("not a command set")
        elements[element] = command[offset : offset + length]
        offset += length
    return elements


def _uid(value: bytes) -> str:
    return value.rstrip(b"\0 ").decode("ascii")


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and file meta group, as pynetdicom writes them before a received data set.

    Encoded here (explicit VR little endian, PS3.10 7.1) because pydicom's writer took a
    tenth of a CT slice's receive time; test_storestream compares the two byte for byte.
    """
    elements = b"".join(
        (
            _ELEMENT_EXPLICIT_LONG.pack(2, 0x0001, b"OB", 0, 2) + b"\0\1",
            _explicit(0x0002, b"UI", _even(sop_class_uid.encode("ascii"), b"\0")),
            _explicit(0x0003, b"UI", _even(sop_instance_uid.encode("ascii"), b"\0")),
            _explicit(0x0010, b"UI", _even(transfer_syntax.encode("ascii"), b"\0")),
            _explicit(0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID.encode("ascii"), b"\0")),
            _explicit(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" ")),
        )
    )
    group_length = _explicit(0x0000, b"UL", struct.pack("<L", len(elements)))
    return _PREAMBLE + group_length + elements


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    """A group 0002 element with a 2-byte length (explicit VR little endian)."""
    return _ELEMENT_EXPLICIT_SHORT.pack(2, element, vr, len(value)) + value


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(0, element, len(value)) + value


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def c_store_response(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int, comment: str | None
) -> bytes:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2), implicit VR little endian.

    `comment`, for a status other than success, is sent as Error Comment (LO, 64 characters).
    """
    elements = [
        _element(0x0002, _even(sop_class_uid.encode("ascii"), b"\0")),
        _element(0x0100, _US.pack(C_STORE_RSP)),
        _element(0x0120, _US.pack(message_id)),
        _element(0x0800, _US.pack(NO_DATA_SET)),
        _element(0x0900, _US.pack(status)),
    ]
    if comment:
        elements.append(_element(0x0902, _even(comment[:64].encode("ascii", "replace"), b" ")))
    elements.append(_element(0x1000, _even(sop_instance_uid.encode("ascii"), b"\0")))
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def p_data(context_id: int, command: bytes, maximum_length: int | None) -> bytes:
    """P-DATA-TF PDUs carrying a command set, in fragments the peer's maximum PDU length admits."""
    step = len(command) if not maximum_length else max(1, maximum_length - _PDV_HEADER.size)
    pdus = []
    for start in range(0, len(command), step):
        fragment = command[start : start + step]
        control = _COMMAND | (_LAST if start + step >= len(command) else 0)
        item = _PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
        pdus.append(_PDU_HEADER.pack(0x04, 0, len(item)) + item)
    return b"".join(pdus)
