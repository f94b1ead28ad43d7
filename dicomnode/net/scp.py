"""The Storage SCP: DIMSE events in, spool calls and DICOM status codes out.

Handlers only translate. C-STORE answers success (0x0000) only after the spool made the
instance durable; anything else gets the DICOM status that tells the sender what to do
(0xA700 retry later, 0xC000 do not resend as is), with an Error Comment that says why.
Association outcomes go to the audit log, without patient data: who is refused is decided
by the access policy at the association request, and the audit states that decision's reason.

Datasets are received to disk, not memory: each is written, as it arrives, to a file in
the spool's `incoming/` folder, the handler reads its header only (net.header), and the
spool moves the file into place. Receiving a whole-slide level of a gigabyte needs no more
memory than receiving a CT slice. The writing is done by the association's reading thread
(net.storestream), which serves C-STOREs itself, or, for the messages it passes on, by
pynetdicom; both end in `StorageHandlers.store`.
"""

from __future__ import annotations

import errno
import logging
import os
import ssl
import tempfile
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, dimse_messages, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicomnode.config import ScpConfig
from dicomnode.identity import NODE_MANUFACTURER
from dicomnode.locks import take_slot
from dicomnode.net.access import SERVICE_PROVIDER_PRESENTATION, AccessPolicy, Rejection, describe_rejection
from dicomnode.net.balance import BalancedServer, Share, balanced_server, cannot_listen
from dicomnode.net.header import Header, Unusual, read_header
from dicomnode.net.reactor import EventDrivenDUL, acceptor_association
from dicomnode.net.storestream import StoreRequest, StoreStream
from dicomnode.net.tls import HandshakingServer
from dicomnode.net.uids import remember_uids
from dicomnode.privacy import uid_tag, where_raised
from dicomnode.spool import Spool, SpoolFull, is_valid_uid

log = logging.getLogger(__name__)
audit = logging.getLogger("dicomnode.audit")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

#: Largest PDU the SCP receives. pynetdicom's default (16 KiB) makes a 7 MB radiograph 440
#: PDUs, each a trip through its state machine; at DCMTK's largest (128 KiB) the radiographs
#: of `dicomnode bench receive` arrive about a third faster. A PDU is held in memory whole.
MAX_PDU_BYTES = 128 << 10

#: Largest PDU of any type the SCP reads. pynetdicom reads a PDU whole into memory, whatever
#: length its header announces (up to 4 GiB) and whatever maximum was negotiated; a peer's
#: association request (many presentation contexts, a user identity token) stays far below.
MAX_PDU_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class Refusal:
    """A C-STORE the node refused: the status and the reason sent back as Error Comment."""

    status: int
    reason: str

    def as_dataset(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = self.reason[:64]  # LO: at most 64 characters
        return ds


#: Values longer than this stay on disk when the handler reads a received dataset.
_HEADER_VALUE_BYTES = 64 << 10


class TruncatedDataset(ValueError):
    """The received stream ends before the last element it announces."""


def _read_header(path: Path) -> Dataset:
    """Parse the received file's elements with pydicom, leaving long values (pixel data) on disk.

    For the streams net.header's quick walk does not read (it reads the common ones).

    The parse walks every top-level element, seeking past long values, so a malformed stream
    fails here. A stream cut short is found at its end: the last element must end where the
    file does, or, of undefined length (encapsulated pixel data, a sequence), the file must
    end with its sequence delimiter (pydicom only warns when that is missing). A deflated
    dataset is inflated by pydicom (in memory: deflate is for small objects such as SR),
    whose zlib refuses a stream cut short. Raises on any of these.
    """
    ds = pydicom.dcmread(path, defer_size=_HEADER_VALUE_BYTES)
    if not len(ds):  # also what pydicom returns when it reached the end before a delimiter
        raise TruncatedDataset("no element could be read")
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_deflated:
        _check_complete(
            path, ds.get_item(next(reversed(ds.keys())), keep_deferred=True), syntax.is_little_endian
        )
    return ds


def _header_of(ds: Dataset) -> Header:
    """The attributes the SCP decides on, from a data set pydicom read."""
    return Header(
        sop_class_uid=str(ds.get("SOPClassUID", "")).strip(),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")).strip(),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")).strip(),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")).strip(),
        manufacturer=str(ds.get("Manufacturer", "")).strip(),
    )


#: Sequence Delimitation Item (FFFE,E0DD) with its zero length, by byte order.
_SEQUENCE_DELIMITER = {True: bytes.fromhex("feffdde000000000"), False: bytes.fromhex("fffee0dd00000000")}


def _check_complete(path: Path, last: RawDataElement | DataElement, little_endian: bool) -> None:
    """Raise TruncatedDataset unless the file ends where its last element says it does."""
    size = path.stat().st_size
    if isinstance(last, RawDataElement) and last.length != 0xFFFFFFFF:
        if last.value_tell + last.length != size:
            raise TruncatedDataset(
                f"last element {last.tag} ends at byte {last.value_tell + last.length}, file has {size}"
            )
        return
    with path.open("rb") as handle:
        handle.seek(max(size - 8, 0))
        if handle.read(8) != _SEQUENCE_DELIMITER[little_endian]:
            raise TruncatedDataset(
                f"last element {last.tag} has undefined length and the file no delimiter at its end"
            )


def _is_own_result(header: Header, spool: Spool) -> bool:
    """True for an object this node wrote, as a PACS that forwards everything sends it back.

    Two signatures, either enough: the Manufacturer the results are signed with, and a SOP
    Instance UID the node wrote into its outbox (a PACS may coerce attributes, but it keeps
    the UID it stores an instance under).
    """
    if header.manufacturer == NODE_MANUFACTURER:
        return True
    return spool.wrote_result(header.study_instance_uid, header.sop_instance_uid)


def _receive_to_disk() -> None:
    """Have pynetdicom write every received dataset to a file, in the spool's `incoming/`.

    pynetdicom's switch is process-wide and its temporary file takes no folder, so its file
    factory is replaced by one that asks the association which spool it serves.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _received_file


def _received_file(*args, **kwargs):
    """pynetdicom's temporary file for a dataset being received (private: created 0600)."""
    return tempfile.NamedTemporaryFile(*args, dir=_incoming_dir(), prefix=".received-", **kwargs)


def _incoming_dir() -> Path | None:
    """The `incoming/` folder of the spool that the current association stores into.

    pynetdicom decodes P-DATA in the association's DUL thread, which knows its association,
    whose C-STORE handler is bound to our handlers. None (the system's temporary folder) for
    an SCP that is not ours: the spool then copies instead of renaming.
    """
    assoc = getattr(threading.current_thread(), "assoc", None)
    owner = _storage_handlers(assoc) if assoc is not None else None
    return owner.spool.incoming_dir if owner is not None else None


def _storage_handlers(assoc) -> StorageHandlers | None:
    """The StorageHandlers the association's C-STORE handler is bound to; None for another SCP's."""
    bound = assoc.get_handlers(evt.EVT_C_STORE)
    owner = getattr(bound[0], "__self__", None) if isinstance(bound, tuple) else None
    return owner if isinstance(owner, StorageHandlers) else None


def _discard_partial(assoc) -> None:
    """Delete the file of a dataset whose association ended before it was complete."""
    message = getattr(assoc.dimse, "message", None)
    received = getattr(message, "_data_set_file", None)
    if received is not None:
        received.close()
        Path(received.name).unlink(missing_ok=True)


def _check_identity(header: Header, affected_sop_instance_uid: str) -> Refusal | None:
    for keyword, value in (
        ("SOPInstanceUID", header.sop_instance_uid),
        ("StudyInstanceUID", header.study_instance_uid),
        ("SeriesInstanceUID", header.series_instance_uid),
        ("SOPClassUID", header.sop_class_uid),
    ):
        if not value:
            return Refusal(CANNOT_UNDERSTAND, f"{keyword} missing")
        if not is_valid_uid(value):
            return Refusal(CANNOT_UNDERSTAND, f"{keyword} is not a valid UID")
    if header.sop_instance_uid != affected_sop_instance_uid:
        return Refusal(CANNOT_UNDERSTAND, "SOPInstanceUID differs from Affected SOP Instance UID")
    return None


#: A-ASSOCIATE-RJ of an SCP at its association limit, as pynetdicom sends it: rejected
#: transient, by the service provider (presentation), local limit exceeded.
_AT_LIMIT = (0x02, SERVICE_PROVIDER_PRESENTATION, 0x02)


def clear_half_received(spool: Spool) -> None:
    """Delete what `incoming/` holds, left half-received by the last run: only before any SCP
    on the state folder receives (a receiving process's files in flight are there too)."""
    cleared = spool.clear_incoming()
    if cleared:
        log.info("deleted %d instances a previous run left half-received", cleared)


class StorageHandlers:
    """The SCP's event handlers, bound to one spool.

    `clear_incoming`: delete what `incoming/` holds, left half-received by the last run. Only
    the first SCP on a state folder may: a receiver started beside it (net.receivers) would
    delete files other processes are receiving.

    The association limit holds for every SCP on the state folder together: each accepted
    association holds one of `max_associations` slots of `associations.lock` until its thread
    ends (the kernel frees a dead process's).
    """

    def __init__(self, spool: Spool, scp: ScpConfig, *, clear_incoming: bool = True) -> None:
        self.spool = spool
        self.scp = scp
        self.policy = AccessPolicy(scp)
        self.slots_path = spool.state_dir / "associations.lock"
        os.close(os.open(self.slots_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._counts: defaultdict[int, Counter[str]] = defaultdict(Counter)
        self._refusals: dict[int, str] = {}
        self._lock = threading.Lock()
        _receive_to_disk()
        remember_uids()
        if clear_incoming:
            clear_half_received(spool)

    def _count(self, assoc, outcome: str) -> None:
        with self._lock:
            self._counts[id(assoc)][outcome] += 1

    def on_echo(self, event: evt.Event) -> int:
        """C-ECHO: always success while the node is up."""
        return SUCCESS

    def on_store(self, event: evt.Event) -> int | Dataset:
        """C-STORE as pynetdicom serves it (see `store`)."""
        refusal = self.store(event.assoc, str(event.request.AffectedSOPInstanceUID), event.dataset_path)
        return SUCCESS if refusal is None else refusal.as_dataset()

    def on_streamed_store(self, assoc, request: StoreRequest) -> tuple[int, str | None]:
        """C-STORE as net.storestream serves it (see `store`): its status and Error Comment."""
        if request.write_error is not None:
            log.error(
                "refused instance %s: cannot write the received data (%s)",
                uid_tag(request.sop_instance_uid),
                request.write_error.strerror,
            )
            self._count(assoc, "refused")
            reason = f"node cannot write received data: {request.write_error.strerror}"
            return OUT_OF_RESOURCES, reason[:64]
        refusal = self.store(assoc, request.sop_instance_uid, request.path, content=request.content)
        return (SUCCESS, None) if refusal is None else (refusal.status, refusal.reason[:64])

    def store(self, assoc, affected: str, received: Path, content: bytes | None = None) -> Refusal | None:
        """Parse the header, make durable, then acknowledge (None); else the refusal and its reason.

        `content`: the file's bytes, when the receiver kept them, to read the header from.
        Once acknowledged, the file is the node's: moved into the spool, or deleted.

        The node's own results, forwarded back by a PACS, are acknowledged (or the PACS would
        retry them forever) but not stored: they must never re-open their study.
        """
        try:
            header = read_header(received, content)
        except Unusual:  # pydicom judges what the quick walk does not read
            header = None
        except OSError as exc:
            log.error("cannot read received instance %s: %s", uid_tag(affected), exc.strerror)
            self._count(assoc, "refused")
            return Refusal(OUT_OF_RESOURCES, f"node cannot read received data: {exc.strerror}")
        try:
            header = header or _header_of(_read_header(received))
        except Exception as exc:  # pydicom raises many types for a bad stream; all mean the same
            log.warning("refused instance %s: cannot parse (%s)", uid_tag(affected), exc.__class__.__name__)
            self._count(assoc, "refused")
            return Refusal(CANNOT_UNDERSTAND, "dataset cannot be parsed")
        refusal = _check_identity(header, affected)
        if refusal is None and _is_own_result(header, self.spool):
            audit.info(
                "own result not stored peer=%s calling=%s instance=%s study=%s",
                assoc.requestor.address,
                assoc.requestor.ae_title,
                uid_tag(affected),
                uid_tag(header.study_instance_uid),
            )
            self._count(assoc, "own results")
            received.unlink(missing_ok=True)
            return None
        if refusal is None:
            try:
                self.spool.store(
                    received,
                    sop_instance_uid=header.sop_instance_uid,
                    sop_class_uid=header.sop_class_uid,
                    study_instance_uid=header.study_instance_uid,
                    series_instance_uid=header.series_instance_uid,
                    calling_ae=assoc.requestor.ae_title,
                    held=content,
                )
            except SpoolFull as exc:
                refusal = Refusal(OUT_OF_RESOURCES, f"node storage full: {exc}")
            except Exception as exc:  # the spool failed; the sender must retry later
                log.error("spool failed for instance %s: %s", uid_tag(affected), where_raised(exc))
                refusal = Refusal(OUT_OF_RESOURCES, f"node cannot store: {exc.__class__.__name__}")
        if refusal is not None:
            log.warning("refused instance %s: %s", uid_tag(affected), refusal.reason)
            self._count(assoc, "refused")
            return refusal
        # Per instance only when debugging: the audit line of the association counts what it
        # stored, and a CT study of 2,000 slices would write 2,000 lines (30 us each) at INFO.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("stored instance %s of study %s", uid_tag(affected), uid_tag(header.study_instance_uid))
        self._count(assoc, "stored")
        return None

    def on_requested(self, event: evt.Event) -> None:
        """Decide, before pynetdicom negotiates, whether this peer may associate; refuse if not.

        pynetdicom's own checks know AE titles only and leave no reason behind; the policy also
        knows addresses, and the reason it gives is kept for the audit line of on_rejected.
        """
        assoc = event.assoc
        request = assoc.requestor.primitive
        try:
            rejection = self.policy.check(
                request.calling_ae_title.strip(), request.called_ae_title.strip(), assoc.requestor.address
            )
        except Exception as exc:  # pynetdicom swallows a handler's exception and would accept: fail closed
            log.error("access check failed: %s", where_raised(exc))
            rejection = Rejection(f"access check failed ({exc.__class__.__name__}); refused to be safe")
        if rejection is None:
            rejection = self._take_slot(assoc)
        if rejection is None:
            return
        with self._lock:
            self._refusals[id(assoc)] = rejection.reason
        # As pynetdicom does when it refuses: reject, tell the handlers, end the association.
        assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _take_slot(self, assoc) -> Rejection | None:
        """Give the association a slot of the limit, kept until its thread ends; else refuse it."""
        try:
            slot = take_slot(self.slots_path, self.scp.max_associations)
        except OSError as exc:
            log.error("association slots unavailable: %s", exc.strerror)
            reason = f"association slots unavailable ({exc.strerror}); refused to be safe"
            return Rejection(reason, *_AT_LIMIT)
        if slot is None:
            return Rejection(f"association limit of {self.scp.max_associations} reached", *_AT_LIMIT)
        assoc.dicomnode_slot = slot
        return None

    def on_accepted(self, event: evt.Event) -> None:
        """Audit the peer of every accepted association, and how it is secured."""
        requestor = event.assoc.requestor
        audit.info(
            "association accepted peer=%s:%s calling=%s called=%s %s",
            requestor.address,
            requestor.port,
            requestor.ae_title,
            event.assoc.acceptor.ae_title,
            _transport(event.assoc),
        )

    def on_rejected(self, event: evt.Event) -> None:
        """Audit why an association was refused: such refusals look like timeouts to the peer.

        The reason is the policy's, recorded when it decided; failing that, pynetdicom decided,
        and the codes of the A-ASSOCIATE-RJ it sent say why.
        """
        assoc = event.assoc
        with self._lock:
            reason = self._refusals.pop(id(assoc), None)
        if reason is None:
            sent = assoc.acceptor.primitive
            source, diagnostic = sent.result_source, sent.diagnostic
            if (source, diagnostic) == (SERVICE_PROVIDER_PRESENTATION, 0x02):
                reason = f"association limit of {self.scp.max_associations} reached"
            else:
                reason = f"refused by pynetdicom: {describe_rejection(sent.result, source, diagnostic)}"
        request = assoc.requestor.primitive
        audit.warning(
            "association rejected peer=%s:%s calling=%s called=%s: %s",
            assoc.requestor.address,
            assoc.requestor.port,
            request.calling_ae_title.strip(),
            request.called_ae_title.strip(),
            reason,
        )

    def on_ended(self, event: evt.Event) -> None:
        """Audit how an association ended and what it delivered."""
        with self._lock:
            counts = self._counts.pop(id(event.assoc), Counter())
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        if how == "aborted":
            _discard_partial(event.assoc)
        # An association that broke down without an abort leaves its file behind; pynetdicom
        # gives up on a peer silent for network_timeout_s, so one untouched for twice that
        # belongs to no association.
        self.spool.clear_incoming(untouched_for_s=2 * self.scp.network_timeout_s)
        audit.info(
            "association %s peer=%s calling=%s stored=%d refused=%d",
            how,
            event.assoc.requestor.address,
            event.assoc.requestor.ae_title,
            counts["stored"],
            counts["refused"],
        )

    def bindings(self) -> list[tuple]:
        """The (event, handler) pairs for pynetdicom's start_server."""
        return [
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_ended),
            (evt.EVT_ABORTED, self.on_ended),
        ]


class BoundedPduRequestHandler(RequestHandler):
    """pynetdicom's per-connection handler, whose association refuses to read an oversized PDU.

    The association is event-driven (net.reactor). The refusal is an OSError from the socket's
    read, which pynetdicom treats as the connection closed: the association ends and nothing
    of the PDU's body is held.
    """

    def _create_association(self):
        assoc = acceptor_association(self)
        _stream_stores(assoc)
        _free_slot_at_end(assoc)
        if isinstance(self.server, BalancedServer):
            self.server.association_started(self.request, assoc)
        sock = assoc.dul.socket
        read = sock.recv

        def bounded_read(nr_bytes: int):
            if nr_bytes > MAX_PDU_READ_BYTES:
                peer = assoc.requestor.address
                log.warning("connection from %s closed: a PDU of %d bytes announced", peer, nr_bytes)
                raise OSError(errno.EMSGSIZE, f"PDU of {nr_bytes} bytes exceeds {MAX_PDU_READ_BYTES}")
            return read(nr_bytes)

        sock.recv = bounded_read
        return assoc


def _free_slot_at_end(assoc) -> None:
    """Give back the association's slot of the limit (StorageHandlers._take_slot) when its thread
    ends, however the association ended: released, aborted, rejected or broken off."""
    run = assoc.run

    def run_then_free_slot() -> None:
        try:
            run()
        finally:
            slot = getattr(assoc, "dicomnode_slot", None)
            if slot is not None:
                assoc.dicomnode_slot = None
                os.close(slot)

    assoc.run = run_then_free_slot


def _stream_stores(assoc) -> None:
    """Have the association's DUL thread serve C-STOREs itself (net.storestream), where it can.

    It can when the association is event-driven (net.reactor) and its C-STORE handler is a
    StorageHandlers': C-STOREs then take one thread and no queue, everything else pynetdicom's
    path. The stream reads PDUs no larger than the handler's bound.
    """
    owner = _storage_handlers(assoc)
    if not isinstance(assoc.dul, EventDrivenDUL) or owner is None:
        return
    assoc.dul.max_pdu_read_bytes = MAX_PDU_READ_BYTES
    assoc.dul.store_stream = StoreStream(
        assoc, owner.on_streamed_store, owner.spool.incoming_dir, assoc.dul.socket.send
    )


def _transport(assoc) -> str:
    """How the association is carried, for the audit: TLS version and client certificate."""
    connection = getattr(assoc.dul.socket, "socket", None)
    if not isinstance(connection, ssl.SSLSocket):
        return "tls=no"
    certificate = connection.getpeercert() or {}
    subject = dict(pair for rdn in certificate.get("subject", ()) for pair in rdn)
    return f"tls={connection.version()} client_certificate={subject.get('commonName', 'none')}"


def start_scp(
    spool: Spool,
    scp: ScpConfig,
    ssl_context: ssl.SSLContext | None = None,
    *,
    share: Share | None = None,
    index: int = 0,
    clear_incoming: bool = True,
) -> ThreadedAssociationServer:
    """Start listening in the background; every storage SOP class, every transfer syntax.

    With `ssl_context` (net.tls.scp_context) only DICOM TLS is spoken on the port.
    `share`: one of several receiving processes (net.receivers), number `index` (0: the node's
    own), accepting from the shared socket (net.balance); `clear_incoming`: see StorageHandlers.
    """
    ae = AE(ae_title=scp.ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.maximum_associations = scp.max_associations
    ae.maximum_pdu_size = MAX_PDU_BYTES
    # AE titles and addresses are the access policy's to decide (StorageHandlers.on_requested).
    ae.require_called_aet = False
    ae.require_calling_aet = []
    ae.acse_timeout = scp.acse_timeout_s
    ae.dimse_timeout = scp.dimse_timeout_s
    ae.network_timeout = scp.network_timeout_s
    handlers = StorageHandlers(spool, scp, clear_incoming=clear_incoming)
    try:
        server = ae.make_server(
            (scp.host, scp.port),
            ssl_context=ssl_context,
            evt_handlers=handlers.bindings(),
            server_class=HandshakingServer if share is None else balanced_server(share, index),
            request_handler=BoundedPduRequestHandler,
        )
    except OSError as exc:
        raise cannot_listen(scp, exc) from exc
    # What ae.start_server(block=False) does with its server: serve from a daemon thread, and
    # keep it in the AE's list that server.shutdown() removes it from.
    threading.Thread(target=server.serve_forever, name=f"scp-{scp.port}", daemon=True).start()
    ae._servers.append(server)
    security = "DICOM TLS" if ssl_context else "plain TCP"
    log.info("Storage SCP %s listening on %s:%d (%s)", scp.ae_title, scp.host, scp.port, security)
    return server
