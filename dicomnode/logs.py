"""Log formats and destinations beyond the plain text files: JSON lines and the audit to syslog.

JSON lines are for log shippers (Fluent Bit, Vector, Promtail, journald's JSON consumers): one
object per line with the time in UTC, the level, the logger, the message, and the traceback
when there is one, so that a multi-line traceback never splits into several records. The
audit log may also go to syslog, where a hospital's SIEM already collects who connected to
what. The messages are the same ones the text logs hold: patient data never enters them.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import socket
from datetime import UTC, datetime

from dicomnode.config import AuditConfig
from dicomnode.privacy import withhold_warning_texts

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def set_levels(level: str) -> None:
    """dicomnode's loggers at `level`; the DICOM libraries' silenced: pynetdicom's debug output
    dumps datasets, pydicom and highdicom quote attribute values (names included) in their
    messages, highdicom's INFO lines raw UIDs. Python's warnings are logged without their text."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("dicomnode").setLevel(level)
    for library in ("pynetdicom", "pydicom", "highdicom"):
        logging.getLogger(library).setLevel(logging.CRITICAL)
    withhold_warning_texts()


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of the configured `log_format`: "text" or "json"."""
    return JsonLinesFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def syslog_handler(audit: AuditConfig) -> logging.handlers.SysLogHandler:
    """A handler that sends audit records to `audit.address`: a socket path (/dev/log), or
    udp://host:port or tcp://host:port. Raises OSError when a local socket cannot be reached."""
    facility = logging.handlers.SysLogHandler.facility_names[audit.facility]
    address = audit.address
    if address.startswith(("udp://", "tcp://")):
        host, _, port = address[6:].rpartition(":")
        kind = socket.SOCK_DGRAM if address.startswith("udp://") else socket.SOCK_STREAM
        handler = logging.handlers.SysLogHandler((host.strip("[]"), int(port)), facility, kind)
    else:
        _reachable(address)
        handler = logging.handlers.SysLogHandler(address, facility)
    # RFC 3164's TAG: syslog files it as the program, e.g. "dicomnode-audit: association ...".
    handler.ident = "dicomnode-audit: "
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    return handler


def _reachable(path: str) -> None:
    """Raise OSError unless a syslog daemon listens at the socket `path`.

    SysLogHandler ignores a socket it cannot connect to (as openlog() does) and would drop every
    audit record until the daemon appears; an audit configured to syslog must not vanish silently.
    """
    errors = []
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(path)
                return
            except OSError as exc:
                errors.append(exc)
    raise errors[0]
