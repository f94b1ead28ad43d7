"""C-ECHO and C-STORE as a client: used by the outbox and by `dicomnode echo` / `send`.

Files are sent as they are on disk, in their own transfer syntax (pynetdicom streams them
from the file without decoding), so what we send is byte for byte what we wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ
from pynetdicom.sop_class import Verification

from dicomnode.config import DestinationConfig
from dicomnode.net.tls import ClientTls, destination_tls

# Send files as stored, without decoding and re-encoding them (pynetdicom's documented switch).
_config.STORE_SEND_CHUNKED_DATASET = True


class AssociationFailed(ConnectionError):
    """The peer could not be reached or refused the association; names the peer."""


class ContextsRejected(AssociationFailed):
    """The peer answered but accepted none of the SOP classes offered: it will not take them."""


@dataclass(frozen=True)
class Peer:
    """A remote DICOM application entity."""

    host: str
    port: int
    ae_title: str
    timeout_s: float = 30.0
    tls: ClientTls | None = None

    @classmethod
    def of(cls, destination: DestinationConfig) -> Peer:
        """The peer a destination describes, with its TLS settings."""
        return cls(
            destination.host,
            destination.port,
            destination.ae_title,
            destination.timeout_s,
            destination_tls(destination),
        )

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class StoreOutcome:
    """The answer of the peer for one file: status 0x0000 is success."""

    path: Path
    status: int | None
    comment: str = ""
    context_rejected: bool = False

    @property
    def ok(self) -> bool:
        """True when the peer took the instance (success, or a warning status)."""
        return self.status is not None and (
            self.status == 0 or self.status in (0x0001, 0x0107, 0x0116) or (self.status & 0xF000) == 0xB000
        )

    @property
    def refused(self) -> bool:
        """True when the peer refused this object for good: sending it again cannot succeed.

        It rejected the object's SOP class or transfer syntax in association negotiation, or
        answered with a status that judges the object itself (PS3.4 B.2.3 and PS3.7 C):
        0xA9xx data set does not match SOP class, 0xCxxx cannot understand, 0x0117 invalid
        object instance, 0x0122 SOP class not supported, 0x0124 not authorised. Every other
        failure (0xA7xx out of resources, 0x0110 processing failure, no answer) may pass.
        """
        if self.context_rejected:
            return True
        if self.status is None or self.ok:
            return False
        return (
            (self.status & 0xFF00) == 0xA900
            or (self.status & 0xF000) == 0xC000
            or self.status in (0x0117, 0x0122, 0x0124)
        )


def _client(calling_ae: str, peer: Peer) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = peer.timeout_s
    ae.dimse_timeout = peer.timeout_s
    ae.network_timeout = peer.timeout_s
    ae.connection_timeout = peer.timeout_s
    return ae


def _associate(ae: AE, peer: Peer, contexts: list | None = None):
    # pynetdicom can read a peer's A-ASSOCIATE-RJ and then, when the peer closes the socket
    # before its requestor thread looks, report an abort instead of the rejection. The PDU
    # itself is the evidence: a rejection is reported as one whatever the race did.
    rejections: list[A_ASSOCIATE_RJ] = []
    acceptances: list[A_ASSOCIATE_AC] = []

    def received(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)
        elif isinstance(event.pdu, A_ASSOCIATE_AC):
            acceptances.append(event.pdu)

    # A fresh context per association: certificates renewed on disk are used without a restart.
    context = peer.tls.context() if peer.tls is not None else None
    assoc = ae.associate(
        peer.host,
        peer.port,
        contexts=contexts,
        ae_title=peer.ae_title,
        evt_handlers=[(evt.EVT_PDU_RECV, received)],
        tls_args=(context, peer.host) if context is not None else None,
    )
    if not assoc.is_established:
        if assoc.is_rejected or rejections:
            raise AssociationFailed(f"{peer} rejected the association")
        if context is not None and context.handshake_error:
            raise AssociationFailed(f"{peer}: TLS handshake failed: {context.handshake_error}")
        if acceptances:  # accepted, then aborted by pynetdicom: no presentation context was
            offered = ", ".join(sorted({str(c.abstract_syntax.name) for c in contexts or []}))
            raise ContextsRejected(f"{peer} accepted none of the SOP classes offered ({offered})")
        raise AssociationFailed(f"{peer} did not accept an association (unreachable or aborted)")
    _leave_responses_to_the_caller(assoc)
    return assoc


def _leave_responses_to_the_caller(assoc) -> None:
    """Keep pynetdicom's reactor thread from taking the answer a send_c_store waits for.

    Beside the caller, a requestor's association runs a reactor that takes each decoded DIMSE
    message off the queue and serves it if it is a request, dropping anything else with
    "Received unexpected C-STORE service message". A send pauses the reactor first, but the
    pause can be read as taken while the reactor is already past it (pynetdicom 3.0.4); when
    the peer answers in that moment, the reactor drops the answer and the send waits out its
    DIMSE timeout, then aborts the association. Seen under load: one store of 1,500 timed out
    and the rest of its association was lost. The reactor is now only shown requests; an
    answer stays queued for the send that waits on it.
    """
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False):
        if not block:  # the reactor's look; a send waits (block=True)
            _, msg = dimse.peek_msg()
            if msg is None or not msg.is_valid_request:
                return None, None
        return take(block)

    dimse.get_msg = get_msg


def echo(peer: Peer, calling_ae: str = "DICOMNODE") -> int:
    """C-ECHO the peer and return its status (0x0000 when it is alive)."""
    ae = _client(calling_ae, peer)
    assoc = _associate(ae, peer, [build_context(Verification)])
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        raise AssociationFailed(f"{peer} sent no C-ECHO response")
    return int(status.Status)


def _context_for(path: Path) -> tuple[str, str]:
    """SOP class and transfer syntax from the file meta alone: the body is not our business."""
    meta = read_file_meta_info(path)
    if "MediaStorageSOPClassUID" not in meta or "TransferSyntaxUID" not in meta:
        raise InvalidDicomError(f"{path}: file meta lacks the SOP class or transfer syntax")
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def store(
    peer: Peer,
    paths: Sequence[Path],
    calling_ae: str = "DICOMNODE",
    sent: Callable[[StoreOutcome], None] | None = None,
) -> list[StoreOutcome]:
    """C-STORE each file in one association; a file's failure does not stop the others.

    `sent` is called with each file's outcome as it comes (a progress bar's step).
    """
    wanted: dict[str, set[str]] = {}
    for path in paths:
        sop_class, syntax = _context_for(Path(path))
        wanted.setdefault(sop_class, set()).add(syntax)
    contexts = [build_context(sop_class, sorted(syntaxes)) for sop_class, syntaxes in wanted.items()]
    if len(contexts) > 128:
        raise ValueError(
            f"{len(contexts)} SOP classes exceed the 128 presentation contexts of one association"
        )
    ae = _client(calling_ae, peer)
    assoc = _associate(ae, peer, contexts)
    outcomes = []
    try:
        for path in paths:
            if not assoc.is_established:
                outcomes.append(StoreOutcome(Path(path), None, "association lost"))
                continue
            try:
                response = assoc.send_c_store(Path(path))
            except ValueError as exc:  # pynetdicom: no accepted context for this file
                outcomes.append(StoreOutcome(Path(path), None, str(exc), context_rejected=True))
                continue
            status = int(response.Status) if "Status" in response else None
            comment = str(response.get("ErrorComment", "")) if status else ""
            if status is None:
                comment = "no response (timeout or abort)"
            outcomes.append(StoreOutcome(Path(path), status, comment))
            if sent is not None:
                sent(outcomes[-1])
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes
