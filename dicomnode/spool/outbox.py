"""The outbox queue and the status it reports: one row per file per destination.

Deliveries are queued by `StudyState.finish_study` in the transaction that finishes a study;
destination workers take them here, and `dicomnode status` reads the counts and problems.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dicomnode.flow import Delivery
from dicomnode.privacy import uid_tag
from dicomnode.spool.journal import Journal


@dataclass(frozen=True)
class QueueSummary:
    """One destination's queue as `dicomnode status` shows it."""

    destination: str
    pending: int
    sent: int
    dead: int
    #: Since when its longest-failing pending delivery has failed (None when none is failing).
    failing_since: float | None
    #: The latest error of a pending or dead delivery, if any.
    last_error: str | None


@dataclass(frozen=True)
class RecentStudy:
    """A study as `dicomnode status` lists it: hashed UID only, route, outcome and timing."""

    study: str
    state: str
    route: str
    received_at: float
    updated_at: float
    deliveries_sent: int
    deliveries: int


class OutboxQueue(Journal):
    """Deliveries: the next one due, its outcome, dead letters requeued; counts for status."""

    def next_delivery(self, destination: str, now: float | None = None) -> Delivery | None:
        """The oldest pending delivery to `destination` that is due."""
        now = time.time() if now is None else now
        row = (
            self._db()
            .execute(
                "SELECT * FROM outbox WHERE destination=? AND state='pending' AND next_attempt_at<=? "
                "ORDER BY next_attempt_at, id LIMIT 1",
                (destination, now),
            )
            .fetchone()
        )
        if row is None:
            return None
        return Delivery(
            id=row["id"],
            destination=row["destination"],
            path=Path(row["path"]),
            attempts=row["attempts"],
            first_failed_at=row["first_failed_at"],
        )

    def delivery_sent(self, delivery: Delivery) -> None:
        """Record a delivery the destination acknowledged."""
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET state='sent', attempts=attempts+1, last_error=NULL, updated_at=? "
                "WHERE id=?",
                (time.time(), delivery.id),
            )

    def delivery_failed(self, delivery: Delivery, error: str, *, retry_at: float | None) -> None:
        """Record a failed attempt; `retry_at` None sends the delivery to the dead letter.

        The first failure since the delivery was queued (or requeued) starts its retry window.
        """
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET state=?, attempts=attempts+1, last_error=?, next_attempt_at=?, "
                "first_failed_at=coalesce(first_failed_at, ?), updated_at=? WHERE id=?",
                (
                    "dead" if retry_at is None else "pending",
                    error,
                    retry_at if retry_at is not None else now,
                    now,
                    now,
                    delivery.id,
                ),
            )

    def delivery_state(self, delivery_id: int) -> str | None:
        """The state of a delivery (pending, sent, dead), or None once purged."""
        row = self._db().execute("SELECT state FROM outbox WHERE id=?", (delivery_id,)).fetchone()
        return None if row is None else row["state"]

    def requeue_dead(self, destination: str | None = None) -> int:
        """Give dead deliveries (to one destination, or all) a fresh set of attempts, now.

        The operator's answer to a dead letter once the destination is fixed; returns how many
        deliveries went back to the queue.
        """
        now = time.time()
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE outbox SET state='pending', attempts=0, next_attempt_at=?, first_failed_at=NULL, "
                "updated_at=? WHERE state='dead' AND (? IS NULL OR destination=?)",
                (now, now, destination, destination),
            )
            return cursor.rowcount

    def counts(self) -> dict[str, dict[str, int]]:
        """Counts of studies by state and of deliveries by destination and state."""
        db = self._db()
        studies = {r[0]: r[1] for r in db.execute("SELECT state, count(*) FROM studies GROUP BY state")}
        outbox: dict[str, int] = {}
        for destination, state, count in db.execute(
            "SELECT destination, state, count(*) FROM outbox GROUP BY destination, state"
        ):
            outbox[f"{destination}:{state}"] = count
        instances = db.execute("SELECT count(*) FROM instances").fetchone()[0]
        return {"studies": studies, "outbox": outbox, "instances": {"stored": instances}}

    def problems(self, limit: int = 20) -> list[tuple[str, str, str]]:
        """Recent failed, ignored and retrying studies and dead deliveries.

        Each as (kind, hashed UID, reason).
        """
        db = self._db()
        rows = [
            (
                "study retrying" if r["state"] == "receiving" else "study " + r["state"],
                uid_tag(r["study_instance_uid"]),
                r["reason"] or "",
            )
            for r in db.execute(
                "SELECT * FROM studies WHERE state IN ('failed', 'ignored') "
                "OR (state='receiving' AND attempts > 0) ORDER BY updated_at DESC LIMIT ?",
                (limit,),
            )
        ]
        rows += [
            (
                f"dead letter to {r['destination']}",
                uid_tag(r["study_instance_uid"]),
                r["last_error"] or "",
            )
            for r in db.execute(
                "SELECT * FROM outbox WHERE state='dead' ORDER BY updated_at DESC LIMIT ?", (limit,)
            )
        ]
        return rows

    def queues(self) -> list[QueueSummary]:
        """Every destination that has deliveries in the journal, by name."""
        db = self._db()
        rows = db.execute(
            "SELECT destination, sum(state='pending') AS pending, sum(state='sent') AS sent, "
            "sum(state='dead') AS dead, "
            "min(CASE WHEN state='pending' THEN first_failed_at END) AS failing_since, "
            "(SELECT last_error FROM outbox e WHERE e.destination=o.destination AND e.state!='sent' "
            "AND e.last_error IS NOT NULL ORDER BY e.updated_at DESC LIMIT 1) AS last_error "
            "FROM outbox o GROUP BY destination ORDER BY destination"
        )
        return [
            QueueSummary(
                r["destination"], r["pending"], r["sent"], r["dead"], r["failing_since"], r["last_error"]
            )
            for r in rows
        ]

    def recent_studies(self, limit: int = 10) -> list[RecentStudy]:
        """The studies last updated, newest first, with their route and deliveries."""
        rows = self._db().execute(
            "SELECT s.*, (SELECT count(*) FROM outbox o WHERE o.study_instance_uid=s.study_instance_uid"
            " AND o.state='sent') AS sent, (SELECT count(*) FROM outbox o"
            " WHERE o.study_instance_uid=s.study_instance_uid) AS deliveries"
            " FROM studies s ORDER BY updated_at DESC LIMIT ?",
            (limit,),
        )
        return [
            RecentStudy(
                study=uid_tag(r["study_instance_uid"]),
                state=r["state"],
                route=r["prompt_set"] or ("not routed" if r["state"] == "ignored" else ""),
                received_at=r["last_received_at"],
                updated_at=r["updated_at"],
                deliveries_sent=r["sent"],
                deliveries=r["deliveries"],
            )
            for r in rows
        ]
