"""The node's configuration: YAML files validated once, at start-up, into typed objects.

Every error names the file and the key that is wrong, so an administrator editing
/etc/dicomnode/dicomnode.yaml at night knows exactly what to fix. Relative paths in a file
are resolved against the folder of that file, so a checkout and an installed node read the
same configuration the same way.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from dicomnode.environment import VariableError, apply, environment_overrides

DEFAULT_CONFIG = Path("conf/dicomnode.yaml")

_PACKAGE = Path(__file__).resolve().parent
#: Where an installed package keeps conf/, prompts/ and systemd/ (pyproject.toml maps them there).
_INSTALLED = _PACKAGE / "shipped"


def shipped(folder: str) -> Path:
    """A folder shipped with dicomnode (conf, prompts, systemd): the checkout's when dicomnode
    runs from one, else the copy inside the installed package."""
    return (_INSTALLED if _INSTALLED.is_dir() else _PACKAGE.parent) / folder


def inside_installed_package(path: Path) -> bool:
    """Whether `path` lies inside the installed package, where nothing should be written."""
    return path.resolve().is_relative_to(_INSTALLED)


def default_config() -> Path:
    """The configuration to use when none is named: conf/dicomnode.yaml of the working directory
    when there is one, else the embedded default shipped with dicomnode."""
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else shipped("conf") / "dicomnode.yaml"


AETitle = Annotated[
    str,
    Field(
        min_length=1,
        max_length=16,
        pattern=r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]*[\x21-\x5b\x5d-\x7e])?$",
    ),
]
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
TlsVersion = Literal["TLSv1.2", "TLSv1.3"]


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    # ipaddress says what is wrong ("has host bits set", "does not appear to be ..."); pydantic's
    # own network type only says "not a valid network". Host names are refused: a name is
    # resolved by whoever controls DNS, an address is what the connection came from.
    if not isinstance(value, str):
        raise ValueError(f"give an address or network as text, e.g. 10.1.2.0/24, not {value!r}")
    try:
        return ipaddress.ip_network(value)
    except ValueError as exc:
        raise ValueError(f"{exc} (give an IP address or network such as 10.1.2.0/24)") from None


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network)]


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message names file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScpTlsConfig(_Strict):
    """DICOM TLS on the SCP: our certificate and key, and the CAs whose client certificates we
    require (when `ca_certificates` is set, a peer without such a certificate is refused)."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    min_version: TlsVersion = "TLSv1.2"


class DestinationTlsConfig(_Strict):
    """DICOM TLS towards a destination: the CAs that may sign its certificate (the system's
    trust store when not set), and our client certificate and key when it asks for one."""

    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    verify_hostname: bool = True
    min_version: TlsVersion = "TLSv1.2"

    @model_validator(mode="after")
    def _certificate_with_key(self) -> DestinationTlsConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("give both certificate and private_key, or neither")
        return self


#: The most receiving processes "auto" starts: on a 16-core host four senders went at 0.72x of
#: storescp's pace with four processes, 0.36x with one (README, Performance); one sender gains
#: nothing from more than two, and eight processes were measured to pay little over four.
AUTO_RECEIVERS_MAX = 4


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as taskset or systemd's
    CPUAffinity= set it), else the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ScpConfig(_Strict):
    """The Storage SCP that the PACS forwards studies to.

    Access: with neither `allowed_calling_aes` nor `allowed_peers`, any calling AE title is
    accepted; otherwise only those listed, an AE of `allowed_peers` only from its addresses.
    """

    host: str = "0.0.0.0"
    port: Port = 11112
    ae_title: AETitle = "DICOMNODE"
    allowed_calling_aes: tuple[AETitle, ...] = ()
    allowed_peers: dict[AETitle, tuple[Network, ...]] = Field(default_factory=dict)
    tls: ScpTlsConfig | None = None
    require_called_ae: bool = True
    max_associations: int = Field(default=10, ge=1, le=1000)
    #: Processes that receive on the port, the node's own included (net.receivers): one takes
    #: about 1,000 CT slices/s however many associations send; more use more cores. "auto":
    #: one per core this process may run on, at most 4 (`receiving_processes`).
    receivers: int | Literal["auto"] = "auto"
    min_free_mb: int = Field(default=500, ge=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)

    def receiving_processes(self) -> int:
        """How many processes receive: `receivers`, or for "auto" one per usable core, at most
        AUTO_RECEIVERS_MAX. The node's own process also decodes and runs inference, and leaves
        a lone sender to a receiver: even on two cores shared with the senders, two processes
        took one sender's 500 CT slices at 0.71x of storescp (0.64x with one), four senders'
        at 0.50x (0.44x; README, Performance, "The default, auto")."""
        if self.receivers != "auto":
            return self.receivers
        return max(1, min(AUTO_RECEIVERS_MAX, usable_cores()))

    @field_validator("receivers", mode="before")
    @classmethod
    def _processes_or_auto(cls, value: Any) -> Any:
        if value == "auto" or (type(value) is int and 1 <= value <= 64):
            return value
        raise ValueError("give a number of processes from 1 to 64, or auto")

    @field_validator("allowed_peers")
    @classmethod
    def _each_peer_has_an_address(cls, value: dict[str, tuple]) -> dict[str, tuple]:
        empty = sorted(ae for ae, networks in value.items() if not networks)
        if empty:
            raise ValueError(f"no address listed for {', '.join(empty)}: an empty list would refuse it")
        return value

    @model_validator(mode="after")
    def _one_list_per_ae(self) -> ScpConfig:
        both = sorted(set(self.allowed_calling_aes) & set(self.allowed_peers))
        if both:
            raise ValueError(
                f"{', '.join(both)} in both allowed_calling_aes (any address) and allowed_peers"
                " (listed addresses only): keep each AE title in one of them"
            )
        return self


class StudiesConfig(_Strict):
    """When a study counts as complete (no new instance for `quiet_period_s` seconds), how
    often processing is tried again after a failure that may pass (disk, memory, device), and
    how long a finished study's files are kept (None: for ever)."""

    quiet_period_s: float = Field(default=30.0, ge=0)
    poll_interval_s: float = Field(default=1.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    retry_backoff_s: float = Field(default=30.0, ge=0)
    retention_days: float | None = Field(default=7.0, gt=0)
    # Studies processed side by side (their images share the engine's batches), and the
    # processes that decode and prepare images for them (0: in the study worker itself).
    workers: int = Field(default=2, ge=1, le=64)
    imaging_processes: int = Field(default=2, ge=0, le=64)


class ModelConfig(_Strict):
    """The frozen backbone: an open_clip architecture and, for clinical use, a local checkpoint."""

    architecture: str = "ViT-B-16"
    architecture_config: Path | None = None
    checkpoint: Path | None = None
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # On CUDA: the weights cast to bf16 (measured 1.5x faster on an H100, probabilities within
    # 0.005 of fp32), or bf16 autocast over fp32 weights (layer norms in fp32, within 0.004).
    # The CPU always runs fp32.
    precision: Literal["autocast", "bf16"] = "bf16"
    max_batch: int = Field(default=16, ge=1)
    # How long the engine waits for more studies' images before running a partial batch.
    max_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    # torch.compile the image passes (CUDA): slower start-up, faster batches.
    compile: bool = False


class Secret(_Strict):
    """A password or token: written in the configuration (`value`), or read at start-up from a
    file (`file`; read again whenever it changes) or an environment variable (`env`). Never
    logged, never shown back in an error."""

    value: SecretStr | None = None
    file: Path | None = None
    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @model_validator(mode="after")
    def _one_source(self) -> Secret:
        if sum(source is not None for source in (self.value, self.file, self.env)) != 1:
            raise ValueError("give exactly one of value, file or env")
        return self

    def reveal(self, where: str) -> str:
        """The secret itself; ConfigError naming `where` when its file or variable is missing or empty."""
        if self.value is not None:
            secret = self.value.get_secret_value()
        elif self.file is not None:
            try:
                secret = self.file.read_bytes().decode("utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"{where}.file: cannot read {self.file}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{where}.file: {self.file} is not UTF-8 text") from None
        else:
            secret = os.environ.get(self.env, "").strip()
            if not secret:
                raise ConfigError(f"{where}.env: environment variable {self.env} is not set or empty")
        if not secret:
            raise ConfigError(f"{where}: the secret is empty")
        return secret


class BasicAuth(_Strict):
    username: str = Field(min_length=1, pattern=r"^[^:]+$")
    password: Secret


class WebAuthConfig(_Strict):
    """HTTP authentication towards a STOW-RS endpoint: a bearer token or a user and password."""

    bearer: Secret | None = None
    basic: BasicAuth | None = None

    @model_validator(mode="after")
    def _one_scheme(self) -> WebAuthConfig:
        if (self.bearer is None) == (self.basic is None):
            raise ValueError("give exactly one of bearer or basic")
        return self


class DestinationConfig(_Strict):
    """Where the results go: a DICOM node by C-STORE (`host`, `port`, `ae_title`) or a DICOMweb
    service by STOW-RS (`stow_url`, the service's base URL, e.g. https://pacs/dicom-web, with
    optional `auth`). `tls` is DICOM TLS for the former and HTTPS verification for the latter.

    A destination that cannot be reached (or is out of resources) is retried, backing off from
    `backoff_s` to `max_backoff_s`, for `retry_for_hours` after the first failure (three days by
    default: a PACS down over a weekend gets its results on Monday), and also at most
    `max_attempts` times when that is set. An object the destination refuses goes to the dead
    letter at once.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    host: str | None = Field(default=None, min_length=1)
    port: Port | None = None
    ae_title: AETitle | None = None
    stow_url: str | None = None
    auth: WebAuthConfig | None = None
    retry_for_hours: float = Field(default=72.0, gt=0)
    max_attempts: int | None = Field(default=None, ge=1)
    backoff_s: float = Field(default=5.0, gt=0)
    max_backoff_s: float = Field(default=600.0, gt=0)
    timeout_s: float = Field(default=30.0, gt=0)
    tls: DestinationTlsConfig | None = None

    @field_validator("stow_url")
    @classmethod
    def _web_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("give the DICOMweb base URL, e.g. https://pacs.example.org/dicom-web")
        if url.username is not None or url.password is not None:
            # A URL is shown in logs and status; credentials belong in auth, which never is.
            raise ValueError("credentials in the URL would be logged: put them in auth")
        if url.query or url.fragment:
            raise ValueError("the base URL takes no query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _dicom_or_web(self) -> DestinationConfig:
        dicom = [key for key in ("host", "port", "ae_title") if getattr(self, key) is not None]
        if self.stow_url is not None:
            if dicom:
                raise ValueError(f"stow_url sends by STOW-RS: remove {', '.join(dicom)} (C-STORE settings)")
            if self.tls is not None and not self.stow_url.startswith("https://"):
                raise ValueError("tls is set but stow_url is not https://")
        elif len(dicom) != 3:
            missing = sorted({"host", "port", "ae_title"} - set(dicom))
            raise ValueError(
                f"give host, port and ae_title (C-STORE) or stow_url (STOW-RS); missing: {', '.join(missing)}"
            )
        elif self.auth is not None:
            raise ValueError("auth is for stow_url; a DICOM destination is identified by its AE title")
        return self


class MetricsConfig(_Strict):
    """The Prometheus endpoint: /metrics for the scraper, /healthz for probes and load balancers.

    Loopback by default: the counters describe the node's work, and only the local Prometheus
    (or an SSH tunnel) should read them.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 9464


class AlertsConfig(_Strict):
    """When a condition raises its metric and a WARNING or ERROR log line.

    A destination that accepted no delivery for `unreachable_after_s`, and a stage whose current
    step has lasted `stuck_after_s` (an idle stage is never stuck): the latter also fails
    /healthz and withholds the systemd watchdog's pings, so systemd restarts the node.
    """

    unreachable_after_s: float = Field(default=600.0, gt=0)
    stuck_after_s: float = Field(default=900.0, gt=0)


class AuditConfig(_Strict):
    """The audit log (associations accepted and refused, with the reasons): always to
    logs/audit.log, and also to syslog when `syslog` is true, at `address` (a socket path such as
    /dev/log, or udp://host:514 or tcp://host:601) with `facility`."""

    syslog: bool = False
    address: str = "/dev/log"
    facility: str = "auth"

    @field_validator("address")
    @classmethod
    def _syslog_address(cls, value: str) -> str:
        if value.startswith(("udp://", "tcp://")):
            host, _, port = value[6:].rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("give udp://host:port or tcp://host:port, e.g. udp://siem.example.org:514")
        elif not value.startswith("/"):
            raise ValueError("give a socket path such as /dev/log, or udp://host:port or tcp://host:port")
        return value

    @field_validator("facility")
    @classmethod
    def _known_facility(cls, value: str) -> str:
        from logging.handlers import SysLogHandler

        if value not in SysLogHandler.facility_names:
            raise ValueError(
                f"unknown syslog facility; one of {', '.join(sorted(SysLogHandler.facility_names))}"
            )
        return value


class NodeConfig(_Strict):
    """The whole node, as read from dicomnode.yaml."""

    source: Path
    state_dir: Path = Path("../var")
    prompts_dir: Path = Path("../prompts")
    routing: Path = Path("routing.yaml")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # json: one JSON object per line on stderr and in logs/, for log shippers.
    log_format: Literal["text", "json"] = "text"
    audit: AuditConfig = AuditConfig()
    scp: ScpConfig = ScpConfig()
    studies: StudiesConfig = StudiesConfig()
    model: ModelConfig = ModelConfig()
    destinations: tuple[DestinationConfig, ...] = ()
    metrics: MetricsConfig = MetricsConfig()
    alerts: AlertsConfig = AlertsConfig()
    # A prompt set serves its newest valid learned version (prompts/<name>/<version>/) unless
    # pinned here to one version folder, e.g. {cxr: 20261125-101500}.
    prompt_set_versions: dict[str, Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")]] = Field(
        default_factory=dict
    )

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: tuple[DestinationConfig, ...]) -> tuple[DestinationConfig, ...]:
        names = [d.name for d in value]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"destination names must be unique, repeated: {', '.join(duplicated)}")
        return value


class MatchCondition(_Strict):
    """One attribute condition of a routing rule; exactly one of its four kinds is given.

    `values`: any value equals one of these (case-insensitively). `regex`: any value contains a
    match. `present`: the attribute has a non-empty value (true) or has none (false). `codes`:
    a code sequence (View Code Sequence, ...) holds an item with one of these code values,
    given per coding scheme designator, e.g. `{SCT: [399348003]}`.
    """

    values: tuple[str, ...] | None = None
    regex: str | None = None
    present: Annotated[bool, Field(strict=True)] | None = None
    codes: dict[str, tuple[str, ...]] | None = None

    @field_validator("codes", mode="before")
    @classmethod
    def _code_strings(cls, value: Any) -> Any:
        """SNOMED CT codes are numbers, so YAML reads them as integers; a code is a string.

        Scheme designators are compared in upper case, as devices write them (SCT, SRT, DCM).
        """
        if not isinstance(value, dict):
            return value
        return {
            str(scheme).strip().upper(): [str(v).strip() for v in codes]
            if isinstance(codes, list)
            else [str(codes)]
            for scheme, codes in value.items()
        }

    @model_validator(mode="after")
    def _one_of(self) -> MatchCondition:
        given = [self.values, self.regex, self.present, self.codes]
        if sum(kind is not None for kind in given) != 1:
            raise ValueError("give one of a list of values, {regex: ...}, {present: ...} or {codes: ...}")
        if self.values is not None and not self.values:
            raise ValueError("an empty list of values never matches; give at least one value")
        if self.codes is not None and not any(self.codes.values()):
            raise ValueError("no codes given: never matches; give {SCHEME: [code, ...]}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"invalid regex {self.regex!r}: {exc}") from exc
        return self


class RoutingRule(_Strict):
    """A rule: when every condition matches, send the study to `prompt_set` or ignore it."""

    name: str = Field(min_length=1)
    match: dict[str, MatchCondition]
    # A folder name under prompts_dir: no leading dot, so "." and ".." cannot leave it.
    prompt_set: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    ignore: str | None = Field(default=None, min_length=1)

    @field_validator("match", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        """Accept `Modality: CR`, `Modality: [CR, DX]` and `SeriesDescription: {regex: ...}`."""
        if not isinstance(value, dict) or not value:
            raise ValueError("match must be a non-empty mapping of attribute keyword to values")
        out = {}
        for key, cond in value.items():
            # YAML 1.1 reads unquoted YES/NO/ON/OFF as booleans: `BurnedInAnnotation: NO` would
            # silently become "False" and never match the DICOM code string NO.
            if isinstance(cond, bool) or (isinstance(cond, list) and any(isinstance(v, bool) for v in cond)):
                raise ValueError(
                    f"{key}: YAML read an unquoted yes/no/on/off/true/false; quote it, e.g. 'NO'"
                )
            if isinstance(cond, str | int | float):
                cond = {"values": [str(cond)]}
            elif isinstance(cond, list):
                cond = {"values": [str(v) for v in cond]}
            out[key] = cond
        return out

    @model_validator(mode="after")
    def _one_action(self) -> RoutingRule:
        if (self.prompt_set is None) == (self.ignore is None):
            raise ValueError(f"rule {self.name!r} needs exactly one of prompt_set or ignore")
        return self


class RoutingConfig(_Strict):
    """Ordered routing rules; the first rule that matches decides."""

    source: Path
    rules: tuple[RoutingRule, ...]


def read_bytes(path: Path, what: str) -> bytes:
    """The bytes of a file, or a ConfigError naming it and the reason it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from exc


def _parse_yaml(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from exc
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if content is None:
        content = {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, not {type(content).__name__}")
    return content


def _named(content: Any, loc: tuple[Any, ...]) -> str:
    """`in 'NAME': ` for the innermost named entry (rule, destination) on the way to `loc`.

    The file's own top-level `name` (a prompt set's) is not an entry: the path names the file.
    """
    name = None
    for depth, step in enumerate(loc):
        if depth and isinstance(content, dict) and isinstance(content.get("name"), str):
            name = content["name"]
        try:
            content = content[step]
        except (KeyError, IndexError, TypeError):
            break
    return "" if name is None else f"in {name!r}: "


def _explain(
    path: Path, exc: ValidationError, content: Any = None, origins: Mapping[str, str] | None = None
) -> ConfigError:
    """One line per error, `file: key: message`; a key set by an environment variable (`origins`:
    dotted key -> variable) names the variable instead of the file."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        given = err.get("input")
        # A whole mapping or list quoted back would bury the message (and is the file itself).
        shown = "" if err["type"] == "missing" or isinstance(given, dict | list) else f" (got {given!r})"
        where = next(
            (f"environment variable {name}" for set_key, name in (origins or {}).items()
             if key == set_key or key.startswith(set_key + ".")),
            str(path),
        )  # fmt: skip
        lines.append(f"{where}: {key}: {_named(content, err['loc'])}{err['msg']}{shown}")
    return ConfigError("\n".join(lines))


def _resolve(base: Path, value: Path | None) -> Path | None:
    if value is None:
        return None
    value = value.expanduser()
    return value if value.is_absolute() else (base / value).resolve()


Schema = TypeVar("Schema", bound=BaseModel)


def read_validated(
    path: Path,
    schema: type[Schema],
    error: type[ValueError] = ConfigError,
    what: str = "configuration",
    **extra: Any,
) -> Schema:
    """Read a YAML file into `schema`; any problem raises `error` naming the file and the key."""
    try:
        return parse_validated(path, read_bytes(path, what), schema, error, **extra)
    except ConfigError as exc:
        raise error(str(exc)) from None


def parse_validated(
    path: Path,
    raw: bytes,
    schema: type[Schema],
    error: type[ValueError] = ConfigError,
    **extra: Any,
) -> Schema:
    """Validate YAML bytes read from `path` into `schema`, errors naming the file and the key.

    For callers that must hash and parse the very same bytes (prompt sets).
    """
    try:
        content = _parse_yaml(path, raw)
        content.update(extra)
        return schema.model_validate(content)
    except ConfigError as exc:
        raise error(str(exc)) from None
    except ValidationError as exc:
        raise error(str(_explain(path, exc, content))) from None


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read and validate dicomnode.yaml with the DICOMNODE_* overrides of `environ` (the process's
    environment by default); relative paths become absolute against the file's folder.

    A file inside the installed package (its embedded default) keeps its state in ./var of the
    working directory, unless a variable sets state_dir: the package's folder is no place for
    patient data, and may not be writable.
    """
    path = Path(path)
    content = _parse_yaml(path, read_bytes(path, "configuration"))
    try:
        overrides = environment_overrides(os.environ if environ is None else environ, NodeConfig)
        for name, (keys, value) in overrides.items():
            apply(content, keys, value, name)
    except VariableError as exc:
        raise ConfigError(str(exc)) from None
    try:
        cfg = NodeConfig.model_validate(content | {"source": path})
    except ValidationError as exc:
        origins = {".".join(map(str, keys)): name for name, (keys, _) in overrides.items()}
        raise _explain(path, exc, content, origins) from None
    base = path.resolve().parent
    state_dir = _resolve(base, cfg.state_dir)
    if inside_installed_package(base) and not any(keys == ("state_dir",) for keys, _ in overrides.values()):
        state_dir = Path.cwd() / "var"
    model = cfg.model.model_copy(
        update={
            "architecture_config": _resolve(base, cfg.model.architecture_config),
            "checkpoint": _resolve(base, cfg.model.checkpoint),
        }
    )
    for key, value in (
        ("model.architecture_config", model.architecture_config),
        ("model.checkpoint", model.checkpoint),
    ):
        if value is not None and not value.is_file():
            raise ConfigError(f"{path}: {key}: file {value} does not exist")
    return cfg.model_copy(
        update={
            "state_dir": state_dir,
            "prompts_dir": _resolve(base, cfg.prompts_dir),
            "routing": _resolve(base, cfg.routing),
            "model": model,
            "scp": cfg.scp.model_copy(update={"tls": _resolve_files(base, cfg.scp.tls)}),
            "destinations": tuple(
                d.model_copy(
                    update={"tls": _resolve_files(base, d.tls), "auth": _resolve_secrets(base, d.auth)}
                )
                for d in cfg.destinations
            ),
        }
    )


TlsSettings = TypeVar("TlsSettings", ScpTlsConfig, DestinationTlsConfig)


def _resolve_files(base: Path, tls: TlsSettings | None) -> TlsSettings | None:
    """TLS file paths made absolute; whether the files are usable is net.tls's check, made only
    where they are used (`serve`, `dicomnode config`): `status` needs no key to read."""
    if tls is None:
        return None
    keys = ("certificate", "private_key", "ca_certificates")
    return tls.model_copy(update={key: _resolve(base, getattr(tls, key)) for key in keys})


def _resolve_secrets(base: Path, auth: WebAuthConfig | None) -> WebAuthConfig | None:
    """Secret files made absolute; they are read where they are used (`serve`, `dicomnode config`)."""
    if auth is None:
        return None

    def resolved(secret: Secret) -> Secret:
        return secret.model_copy(update={"file": _resolve(base, secret.file)})

    if auth.bearer is not None:
        return auth.model_copy(update={"bearer": resolved(auth.bearer)})
    return auth.model_copy(
        update={"basic": auth.basic.model_copy(update={"password": resolved(auth.basic.password)})}
    )


def load_routing(path: Path) -> RoutingConfig:
    """Read and validate routing.yaml; attribute keywords must be DICOM keywords.

    UIDs may be given by the keyword of a standard UID (`OphthalmicTomographyImageStorage`);
    they are turned into the UID here, so routing compares UIDs only.
    """
    path = Path(path)
    routing = read_validated(path, RoutingConfig, source=path)
    rules = tuple(
        rule.model_copy(
            update={
                "match": {
                    keyword: _checked_condition(
                        f"{path}: rules.{index}.match.{keyword}: in {rule.name!r}: ", keyword, cond
                    )
                    for keyword, cond in rule.match.items()
                }
            }
        )
        for index, rule in enumerate(routing.rules)
    )
    return routing.model_copy(update={"rules": rules})


def _checked_condition(where: str, keyword: str, cond: MatchCondition) -> MatchCondition:
    """The condition, if its kind suits the attribute, with UID keywords turned into UIDs."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    if keyword == "CallingAETitle":
        if cond.codes is not None:
            raise ConfigError(f"{where}the calling AE title is not a code sequence")
        return cond
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ConfigError(f"{where}not a DICOM attribute keyword")
    if tag >> 16 == 0x0002:
        raise ConfigError(f"{where}file meta attributes cannot be matched")
    vr = dictionary_VR(tag)
    if vr == "SQ" and (cond.values is not None or cond.regex is not None):
        raise ConfigError(
            f"{where}sequences cannot be matched by value; use {{codes: ...}} or {{present: ...}}"
        )
    if vr != "SQ" and cond.codes is not None:
        raise ConfigError(f"{where}{{codes: ...}} needs a code sequence (such as ViewCodeSequence), not {vr}")
    if vr == "UI" and cond.values is not None:
        return cond.model_copy(update={"values": tuple(_uid(where, v) for v in cond.values)})
    return cond


def _uid(where: str, value: str) -> str:
    """A UID as given, or the UID a standard keyword names (`CTImageStorage`)."""
    from pydicom.uid import UID_dictionary

    if re.fullmatch(r"[0-9]+(\.[0-9]+)*", value):
        return value
    for uid, entry in UID_dictionary.items():
        if entry[4] == value:
            return uid
    raise ConfigError(f"{where}{value!r} is neither a UID nor the keyword of a standard UID")
