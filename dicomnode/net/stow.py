"""STOW-RS as a client: the outbox's delivery to a DICOMweb destination (PS3.18 10.5).

dicomweb-client builds the multipart request; this module adds what a hospital's endpoint asks
of us (HTTPS verified as net.tls verifies DICOM TLS, bearer or basic authentication) and sorts
the answer into the outbox's two kinds of failure. The endpoint's own retries are turned off:
retries and the dead letter are the outbox's, the same for every destination.

Credentials live only in the session's auth object, never in a header dict or a URL, so that
neither dicomweb-client's debug log nor an error message can carry them.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from requests.adapters import HTTPAdapter

from dicomnode.config import ConfigError, DestinationConfig, NodeConfig, Secret
from dicomnode.net.scu import StoreOutcome
from dicomnode.net.tls import ClientTls, check_private, destination_tls

log = logging.getLogger(__name__)

# dicomweb-client logs UIDs (INFO "store instances of study <UID>", ERROR "storage of instance
# <UID> failed"): patient data in our logs' terms. The outbox logs each delivery itself.
logging.getLogger("dicomweb_client").setLevel(logging.CRITICAL)
# Its retry decorator logs each failed request with a traceback even when retries are off; the
# outbox logs the failure once, with what it will do about it.
logging.getLogger("retrying").setLevel(logging.ERROR)

#: HTTP answers that say "not now" rather than "not this": the endpoint is down, overloaded, or
#: not (yet) letting us in (credentials or URL being fixed); the outbox retries them.
_TRANSIENT_HTTP = {401, 403, 404, 407, 408, 425, 429}


class StowUnreachable(ConnectionError):
    """The endpoint did not take the instance this time; it may later. Names the endpoint."""


class StowRefused(Exception):
    """The endpoint refused the instance itself: sending it again cannot succeed."""


class _Rereading:
    """A secret as the configuration gives it; one in a file is read again whenever the file
    changes (a token or password rotated on disk), so that a rotation needs no restart.

    The first read is at start-up, where a problem is a ConfigError naming the key. A changed
    file that cannot be used (missing, not private, empty) makes the delivery wait for its next
    attempt, with the error naming the key; the old secret is not sent in its place.
    """

    def __init__(self, secret: Secret, where: str) -> None:
        self._secret = secret
        self._where = where
        self._seen = self._stamp()  # before reading: a change in between is read again next time
        self._value = _reveal(secret, where)

    def _stamp(self) -> tuple[int, int, int] | None:
        if self._secret.file is None:
            return None
        try:
            status = self._secret.file.stat()
        except OSError:
            return None
        return status.st_ino, status.st_mtime_ns, status.st_size

    def __call__(self) -> str:
        if self._secret.file is None:
            return self._value
        stamp = self._stamp()
        if stamp != self._seen:
            try:
                value = _reveal(self._secret, self._where)
            except ConfigError as exc:
                raise StowUnreachable(str(exc)) from None
            self._value, self._seen = value, stamp
            log.info("%s.file changed: the secret is read again", self._where)
        return self._value


class _Bearer(requests.auth.AuthBase):
    """`Authorization: Bearer <token>`, added when the request is prepared and never stored elsewhere."""

    def __init__(self, token: _Rereading) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token()}"
        return request

    def __repr__(self) -> str:
        return "Bearer(***)"


class _Basic(requests.auth.AuthBase):
    """HTTP basic authentication with the password as it is now."""

    def __init__(self, username: str, password: _Rereading) -> None:
        self._username = username
        self._password = password

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        return requests.auth.HTTPBasicAuth(self._username, self._password())(request)

    def __repr__(self) -> str:
        return f"Basic({self._username}, ***)"


class _ContextAdapter(HTTPAdapter):
    """An adapter whose connections use our ssl context: the destination's CAs, minimum version,
    client certificate and host name check, as for DICOM TLS."""

    def __init__(self, tls: ClientTls) -> None:
        self._tls = tls
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs) -> None:
        context = self._tls.context()
        kwargs["ssl_context"] = context
        if not context.check_hostname:
            kwargs["assert_hostname"] = False
        super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn, url, verify, cert) -> None:
        # requests would load its own CA bundle into our context: trust only what tls names.
        conn.cert_reqs = ssl.CERT_REQUIRED
        conn.ca_certs = None
        conn.ca_cert_dir = None


@dataclass(frozen=True)
class StowEndpoint:
    """A DICOMweb service that receives results by STOW-RS."""

    url: str
    timeout_s: float
    tls: ClientTls | None
    auth: requests.auth.AuthBase | None

    @classmethod
    def of(cls, destination: DestinationConfig, where: str | None = None) -> StowEndpoint:
        """The endpoint a destination describes; its secrets are read now (ConfigError naming the key),
        those in files again whenever the file changes."""
        where = where or f"destinations[{destination.name}]"
        auth: requests.auth.AuthBase | None = None
        if destination.auth is not None and destination.auth.bearer is not None:
            auth = _Bearer(_Rereading(destination.auth.bearer, f"{where}.auth.bearer"))
        elif destination.auth is not None:
            basic = destination.auth.basic
            auth = _Basic(basic.username, _Rereading(basic.password, f"{where}.auth.basic.password"))
        tls = destination_tls(destination, f"{where}.tls")
        if tls is not None:
            tls.check()
        return cls(destination.stow_url, destination.timeout_s, tls, auth)

    def __str__(self) -> str:
        return self.url

    def client(self) -> DICOMwebClient:
        session = requests.Session()
        session.auth = self.auth
        session.trust_env = False  # no proxy or .netrc credentials picked up from the environment
        if self.tls is not None:
            # A fresh context per delivery: certificates renewed on disk are used without a restart.
            session.mount("https://", _ContextAdapter(self.tls))
        client = DICOMwebClient(self.url, session=session, timeout=self.timeout_s)
        client.set_http_retry_params(retry=False)
        return client


def _reveal(secret: Secret, where: str) -> str:
    """The secret; a file holding it must be as private as a TLS key."""
    if secret.file is not None and secret.file.exists():
        check_private(secret.file, f"{where}.file", "a file holding a secret")
    return secret.reveal(where)


def check_endpoints(cfg: NodeConfig) -> list[str]:
    """Read every STOW-RS destination's secrets and TLS files; one line per endpoint.

    Raises ConfigError, one line per endpoint that cannot be used, naming the file and the key
    (never the secret): start-up and `dicomnode config` fail on them, not the first delivery.
    """
    lines, problems = [], []
    for index, destination in enumerate(cfg.destinations):
        if destination.stow_url is None:
            continue
        try:
            endpoint = StowEndpoint.of(destination, f"{cfg.source}: destinations.{index}")
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        auth = "no authentication" if endpoint.auth is None else f"{_scheme(destination)} authentication"
        lines.append(f"destination {destination.name}: STOW-RS to {endpoint.url}, {auth}")
    if problems:
        raise ConfigError("\n".join(problems))
    return lines


def _scheme(destination: DestinationConfig) -> str:
    return "bearer" if destination.auth.bearer is not None else "basic"


def stow(endpoint: StowEndpoint, path: Path) -> StoreOutcome:
    """POST one file to the endpoint's /studies; its answer for the instance as a StoreOutcome.

    Raises StowUnreachable when it may take the file later (no connection, timeout, 5xx, 429,
    authentication), StowRefused when it judged the file (4xx such as 400 or 409, or a failure
    reason that refuses it), and pydicom's errors when the file is not DICOM.
    """
    dataset = pydicom.dcmread(path)
    try:
        answer = endpoint.client().store_instances([dataset])
    except requests.HTTPError as exc:
        response = exc.response
        reason = _failure_reason(response)
        detail = f"HTTP {response.status_code} {response.reason}" + (
            f", failure reason 0x{reason:04X}" if reason is not None else ""
        )
        if response.status_code >= 500 or response.status_code in _TRANSIENT_HTTP:
            raise StowUnreachable(f"{endpoint}: {detail}") from None
        raise StowRefused(f"{endpoint}: {detail}") from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise StowUnreachable(f"{endpoint}: {_cause(exc)}") from None
    for item in answer.get("FailedSOPSequence", []):
        if item.get("ReferencedSOPInstanceUID") == dataset.SOPInstanceUID:
            reason = int(item.get("FailureReason", 0x0110))
            outcome = StoreOutcome(path, reason, f"failure reason 0x{reason:04X}")
            if outcome.refused:
                raise StowRefused(f"{endpoint}: {outcome.comment}")
            raise StowUnreachable(f"{endpoint}: {outcome.comment}")
    return StoreOutcome(path, 0x0000)


def _failure_reason(response: requests.Response) -> int | None:
    """The Failure Reason of a STOW-RS error answer, when it sends one as DICOM JSON."""
    try:
        answer = pydicom.Dataset.from_json(response.json())
        failed = answer.get("FailedSOPSequence", [])
        return int(failed[0].FailureReason) if failed and "FailureReason" in failed[0] else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _cause(exc: Exception) -> str:
    """The reason of a requests error (refused, timed out, certificate), without urllib3's object names."""
    reason = exc.args[0] if exc.args else exc
    text = str(getattr(reason, "reason", reason))  # urllib3's MaxRetryError wraps the cause
    return text.split(">: ", 1)[-1]
