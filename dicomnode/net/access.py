"""Who may open an association with the SCP: the called AE title, the calling AE title, and the
address the calling AE connects from.

The decision and its reason are made in one place, so the audit line states the reason the
association was refused rather than a guess made afterwards. The reason goes to the audit log
only; the peer gets the standard A-ASSOCIATE-RJ codes (DICOM PS3.8 9.3.4), which have no word
for a wrong address: it is told that its calling AE title is not recognised, as it is not from there.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from dicomnode.config import ScpConfig

PERMANENT, TRANSIENT = 0x01, 0x02
SERVICE_USER, SERVICE_PROVIDER_ACSE, SERVICE_PROVIDER_PRESENTATION = 0x01, 0x02, 0x03

# (result source, diagnostic) of an A-ASSOCIATE-RJ, as PS3.8 Table 9-21 names them.
DIAGNOSTICS = {
    (SERVICE_USER, 0x01): "no reason given",
    (SERVICE_USER, 0x02): "application context name not supported",
    (SERVICE_USER, 0x03): "calling AE title not recognised",
    (SERVICE_USER, 0x07): "called AE title not recognised",
    (SERVICE_PROVIDER_ACSE, 0x01): "no reason given (ACSE)",
    (SERVICE_PROVIDER_ACSE, 0x02): "protocol version not supported",
    (SERVICE_PROVIDER_PRESENTATION, 0x01): "temporary congestion",
    (SERVICE_PROVIDER_PRESENTATION, 0x02): "local limit exceeded",
}


@dataclass(frozen=True)
class Rejection:
    """Why an association is refused (for the audit) and what the peer is told."""

    reason: str
    result: int = PERMANENT
    source: int = SERVICE_USER
    diagnostic: int = 0x03


def peer_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The peer's address; an IPv4 peer seen through a dual-stack socket (::ffff:a.b.c.d) as IPv4."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class AccessPolicy:
    """The SCP's access rules from `scp`: called AE title, calling AE titles and their addresses."""

    def __init__(self, scp: ScpConfig) -> None:
        self.ae_title = scp.ae_title
        self.require_called_ae = scp.require_called_ae
        self.any_address = frozenset(scp.allowed_calling_aes)
        self.networks = dict(scp.allowed_peers)

    @property
    def restricted(self) -> bool:
        """True when only listed calling AE titles are accepted."""
        return bool(self.any_address or self.networks)

    def check(self, calling_ae: str, called_ae: str, host: str) -> Rejection | None:
        """None when the association may proceed, else the Rejection that says why not."""
        if self.require_called_ae and called_ae != self.ae_title:
            reason = f"called AE title {called_ae!r} is not ours ({self.ae_title!r})"
            return Rejection(reason, diagnostic=0x07)
        if not self.restricted or calling_ae in self.any_address:
            return None
        networks = self.networks.get(calling_ae)
        if networks is None:
            return Rejection(
                f"calling AE title {calling_ae!r} is not in scp.allowed_calling_aes or scp.allowed_peers"
            )
        address = peer_address(host)
        if not any(address in network for network in networks):
            allowed = ", ".join(str(n) for n in networks)
            return Rejection(
                f"calling AE title {calling_ae!r} is not allowed from {address}"
                f" (scp.allowed_peers lists {allowed})"
            )
        return None


def describe_rejection(result: int | None, source: int | None, diagnostic: int | None) -> str:
    """The words of an A-ASSOCIATE-RJ that pynetdicom itself sent, from its three codes."""
    words = DIAGNOSTICS.get((source, diagnostic), "unknown diagnostic")
    kind = {PERMANENT: "permanent", TRANSIENT: "transient"}.get(result, "unknown result")
    return f"{words} ({kind}, source {source}, diagnostic {diagnostic})"
