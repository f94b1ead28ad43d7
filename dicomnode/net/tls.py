"""DICOM TLS for both sides: ssl contexts built from the configuration, and handshakes that say why.

Every certificate and key is checked where it is configured, and a problem is a ConfigError
that names the configuration file, the key and the file it points to, never the key material.
A private key must be private: like PostgreSQL, the node refuses a key file that others may
read (only its owner, or a root-owned key with group read for the service's group: 0600, or
0640 root:dicomnode). The SCP's handshake runs in the connection's own thread, not in
pynetdicom's accept loop, so a peer that stalls in it cannot hold up every other peer, and
its failure is audited with the reason instead of vanishing silently.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.config import (
    ConfigError,
    DestinationConfig,
    DestinationTlsConfig,
    NodeConfig,
    ScpTlsConfig,
    TlsVersion,
)

audit = logging.getLogger("dicomnode.audit")

_VERSIONS: dict[TlsVersion, ssl.TLSVersion] = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}

# OpenSSL's reasons for the handshake failures an administrator meets, in their words.
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "peer sent no client certificate, and one is required",
    "TLSV1_ALERT_UNKNOWN_CA": "peer does not trust our certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "peer refused our certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "peer requires a client certificate and we sent none",
    "WRONG_VERSION_NUMBER": "peer does not speak TLS (plain DICOM on a TLS port?)",
    "HTTP_REQUEST": "peer does not speak TLS (plain DICOM on a TLS port?)",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common (see min_version)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common (see min_version)",
    "NO_SHARED_CIPHER": "no cipher suite in common",
    "UNEXPECTED_EOF_WHILE_READING": "peer closed the connection during the TLS handshake",
}


def handshake_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, in words, with OpenSSL's reason code for searching."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message} (CERTIFICATE_VERIFY_FAILED)"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        explained = _REASONS.get(exc.reason)
        return f"{explained} ({exc.reason})" if explained else f"TLS error {exc.reason}"
    if isinstance(exc, TimeoutError):
        return "no TLS handshake within the ACSE timeout"
    if isinstance(exc, ssl.SSLEOFError | ConnectionError):
        return "peer closed the connection during the TLS handshake"
    return f"{exc.__class__.__name__}: {exc}"


class _RecordingSocket(ssl.SSLSocket):
    """An SSLSocket that keeps why its handshake failed on its context: pynetdicom's requestor
    only logs it and reports the association as not established."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:
            self.context.handshake_error = handshake_failure(exc)  # type: ignore[attr-defined]
            raise


class ClientContext(ssl.SSLContext):
    """The ssl context of one association to a destination; `handshake_error` says why it failed."""

    sslsocket_class = _RecordingSocket
    handshake_error: str | None = None


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from exc


def check_private(path: Path, where: str, what: str = "a private key") -> None:
    """Raise ConfigError naming `where` unless only the service user (or root's group) may read `path`."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from exc
    allowed = stat.S_IRWXU | (stat.S_IRGRP if info.st_uid == 0 else 0)
    if stat.S_IMODE(info.st_mode) & ~allowed & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{where}: others may access {path} (mode {stat.S_IMODE(info.st_mode):04o}): {what}"
            f" must be 0600, owned by the service user (or 0640 owned by root, group of the service)"
        )
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{where}: cannot read {path}: permission denied")


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path, where: str) -> None:
    """Our certificate and its key into `context`; each problem named by the key that has it."""
    if b"-----BEGIN CERTIFICATE-----" not in _read(certificate, f"{where}.certificate"):
        raise ConfigError(f"{where}.certificate: {certificate} holds no PEM certificate")
    check_private(private_key, f"{where}.private_key")
    key = _read(private_key, f"{where}.private_key")
    if b"ENCRYPTED" in key:
        raise ConfigError(
            f"{where}.private_key: {private_key} is protected by a passphrase, which an unattended"
            " service cannot type: store it unencrypted and readable only by the service user"
        )
    if b"PRIVATE KEY-----" not in key:
        raise ConfigError(f"{where}.private_key: {private_key} holds no PEM private key")

    def no_passphrase() -> bytes:  # never let OpenSSL prompt on the terminal
        raise ConfigError(f"{where}.private_key: {private_key} asks for a passphrase")

    try:
        context.load_cert_chain(certificate, private_key, password=no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"{where}.private_key: {private_key} is not the key of the certificate {certificate}"
            ) from None
        raise ConfigError(
            f"{where}: {certificate} with {private_key} cannot be used ({exc.reason or exc})"
        ) from None


def _load_authorities(context: ssl.SSLContext, ca_certificates: Path, where: str) -> None:
    if b"-----BEGIN CERTIFICATE-----" not in _read(ca_certificates, f"{where}.ca_certificates"):
        raise ConfigError(f"{where}.ca_certificates: {ca_certificates} holds no PEM certificate")
    try:
        context.load_verify_locations(cafile=ca_certificates)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{where}.ca_certificates: {ca_certificates} cannot be used ({exc.reason or exc})"
        ) from None


def server_context(tls: ScpTlsConfig, where: str) -> ssl.SSLContext:
    """The SCP's context: our certificate, the minimum version and, with `ca_certificates`, a
    client certificate required from every peer and checked against those CAs.

    `where` prefixes every error: the configuration file and the key, e.g. "dicomnode.yaml: scp.tls".
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    _load_chain(context, tls.certificate, tls.private_key, where)
    if tls.ca_certificates is not None:
        _load_authorities(context, tls.ca_certificates, where)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass(frozen=True)
class ClientTls:
    """TLS towards one destination. A fresh context per association, so renewed certificates
    are picked up without a restart; `check()` at start-up makes a bad file fail early."""

    settings: DestinationTlsConfig
    where: str

    def context(self) -> ClientContext:
        """A context that verifies the peer's certificate (and host name unless turned off)."""
        context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = _VERSIONS[self.settings.min_version]
        if self.settings.ca_certificates is not None:
            _load_authorities(context, self.settings.ca_certificates, self.where)
        else:
            context.load_default_certs()
        context.check_hostname = self.settings.verify_hostname
        if self.settings.certificate is not None and self.settings.private_key is not None:
            _load_chain(context, self.settings.certificate, self.settings.private_key, self.where)
        return context

    def check(self) -> None:
        """Raise ConfigError, naming the file and the key, if the context cannot be built."""
        self.context()


def destination_tls(destination: DestinationConfig, where: str | None = None) -> ClientTls | None:
    """TLS towards `destination`, or None for plain TCP; errors name `where` (its key by default)."""
    if destination.tls is None:
        return None
    return ClientTls(destination.tls, where or f"destinations[{destination.name}].tls")


def scp_context(cfg: NodeConfig) -> ssl.SSLContext | None:
    """The SCP's TLS context from scp.tls, or None for plain TCP."""
    return None if cfg.scp.tls is None else server_context(cfg.scp.tls, f"{cfg.source}: scp.tls")


def check_tls(cfg: NodeConfig) -> list[str]:
    """Build every TLS context the configuration asks for; one line per side that uses TLS.

    Raises ConfigError, one line per side that cannot be used, naming the file, the key and the
    certificate or key file: start-up and `dicomnode config` fail on them, not the first delivery.
    """
    lines, problems = [], []
    try:
        if scp_context(cfg) is not None:
            verify = (
                "client certificates required" if cfg.scp.tls.ca_certificates else "no client certificates"
            )
            lines.append(f"scp: DICOM TLS, {cfg.scp.tls.min_version} or newer, {verify}")
    except ConfigError as exc:
        problems.append(str(exc))
    for index, destination in enumerate(cfg.destinations):
        tls = destination_tls(destination, f"{cfg.source}: destinations.{index}.tls")
        if tls is None:
            continue
        try:
            tls.check()
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        kind = "HTTPS" if destination.stow_url is not None else "DICOM TLS"
        lines.append(f"destination {destination.name}: {kind}, {destination.tls.min_version} or newer")
    if problems:
        raise ConfigError("\n".join(problems))
    return lines


class HandshakingServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved into the connection's thread.

    pynetdicom wraps and handshakes in its accept loop: one peer that connects and says nothing
    stalls every other, and a failed handshake is dropped without a word. Here the accept loop
    only wraps; the handshake runs, bounded by the ACSE timeout, where the association would.

    An accepted socket does not inherit the listening socket's timeout (Python makes it
    blocking), and pynetdicom reads a PDU to its end in one blocking call: a peer that sends
    part of a PDU and then nothing would hold its connection and thread for ever, out of reach
    of the ACSE and network timers. Each connection's reads and writes are bounded by the
    network timeout instead; a peer silent that long in the middle of a PDU is disconnected.
    """

    def get_request(self):
        client, address = self.socket.accept()
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request, client_address) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.ae.acse_timeout)
                request.do_handshake()
                request.settimeout(self.ae.network_timeout)
            except OSError as exc:
                audit.warning(
                    "TLS handshake failed peer=%s:%s: %s",
                    client_address[0],
                    client_address[1],
                    handshake_failure(exc),
                )
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)
