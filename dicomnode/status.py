"""`dicomnode status`: the live node at a glance, read from its journal and its /healthz.

What an administrator reads at the console: the totals, the queue of each destination, the studies last
handled (hashed UIDs only, their route, outcome and timing), and the problems that need a
person. The journal is opened read-only, as it is (Journal.open_existing); `--json` gives the
same facts to monitoring.
"""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dicomnode.config import NodeConfig
from dicomnode.spool import Spool
from dicomnode.spool.outbox import QueueSummary, RecentStudy


def health(cfg: NodeConfig, timeout_s: float = 2.0) -> str:
    """What the node's /healthz says: "ok", its problems, or why it did not answer."""
    if not cfg.metrics.enabled:
        return "unknown (metrics.enabled is false: no /healthz)"
    url = f"http://{cfg.metrics.host}:{cfg.metrics.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - http from config
            return response.read().decode("utf-8").strip()
    except urllib.error.HTTPError as exc:  # 503: the reasons are the body
        return exc.read().decode("utf-8", errors="replace").strip().replace("\n", "; ")
    except OSError as exc:
        return f"not answering at {url} ({getattr(exc, 'reason', exc)}): is the node running?"


def queues(cfg: NodeConfig, spool: Spool) -> list[QueueSummary]:
    """Every configured destination (an empty queue too) and any other the journal still holds."""
    held = {q.destination: q for q in spool.queues()}
    configured = [held.pop(d.name, QueueSummary(d.name, 0, 0, 0, None, None)) for d in cfg.destinations]
    return configured + sorted(held.values(), key=lambda q: q.destination)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def _timing(study: RecentStudy, now: float) -> str:
    """From the last instance received to the outcome; how long it has waited when unfinished."""
    if study.state in ("receiving", "processing"):
        return f"waiting {_age(now - study.received_at)}"
    return _age(study.updated_at - study.received_at)


def render(cfg: NodeConfig, spool: Spool, console: Console | None = None, limit: int = 10) -> None:
    """Print the node's health, the queues and the last studies as tables, then the problems."""
    console = console or Console(width=max(shutil.get_terminal_size((120, 24)).columns, 100))
    now = time.time()
    state = health(cfg)
    console.print(
        f"[bold]node[/bold] {escape(cfg.scp.ae_title)} ({escape(str(cfg.source))}): health {escape(state)}",
        soft_wrap=True,
    )
    for section, values in spool.counts().items():  # the totals, one line each, as scripts grep them
        shown = ", ".join(f"{k}={v}" for k, v in sorted(values.items())) or "none"
        console.print(Text(f"{section}: {shown}"), soft_wrap=True)

    table = Table(title="Queues per destination", title_justify="left")
    for column in ("destination", "pending", "failing for", "sent", "dead", "last error"):
        table.add_column(column, justify="right" if column in ("pending", "sent", "dead") else "left")
    for queue in queues(cfg, spool):
        failing = None if queue.failing_since is None else now - queue.failing_since
        dead = f"[red]{queue.dead}[/red]" if queue.dead else "0"
        error = Text(queue.last_error or "")  # Text: a reason's brackets are not markup
        table.add_row(
            Text(queue.destination), str(queue.pending), _age(failing), str(queue.sent), dead, error
        )
    console.print(table)

    table = Table(title=f"Last {limit} studies", title_justify="left")
    for column in ("study", "outcome", "route", "last received", "time", "delivered"):
        table.add_column(column)
    for study in spool.recent_studies(limit):
        received = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(study.received_at))
        delivered = f"{study.deliveries_sent}/{study.deliveries}" if study.deliveries else ""
        table.add_row(study.study, study.state, Text(study.route), received, _timing(study, now), delivered)
    console.print(table)

    # Reasons are long sentences: one line each reads better than a wrapped table cell.
    problems = spool.problems()
    console.print("recent problems:" if problems else "no problems")
    for kind, study, reason in problems:
        console.print(Text(f"  {kind} study {study}: {reason}"), soft_wrap=True)
