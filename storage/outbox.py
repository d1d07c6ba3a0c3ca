"""The outbox: result objects waiting for delivery, one row per (object, destination).

Claimed with a lease like jobs. Transient failures reschedule the row with an escalating delay;
permanent ones (and rows older than the maximum age) go to the dead letter state with the reason.
Only failed destinations are retried: each row is one destination.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import distinct, func, select, text, update

from storage.counters import increment
from storage.db import Database, utcnow
from storage.leases import claim_due, due
from storage.models import OutboxItem



@dataclass(frozen=True)
class Delivery:
    id: int
    destination: str
    path: str
    sop_instance_uid: str
    sop_class_uid: str
    kind: str
    attempts: int
    created_at: datetime


def _count_delivery(session, item_id: int, outcome: str, rowcount: int) -> None:  # type: ignore[no-untyped-def]
    """/metrics ``deliveries_total{outcome,destination}``, in the transaction that records the outcome."""
    if rowcount != 1:
        return  # the lease was lost: another sender records this row's outcome
    destination = session.scalar(select(OutboxItem.destination).where(OutboxItem.id == item_id))
    increment(session, "deliveries", {"outcome": outcome, "destination": destination or ""})


class Outbox:
    def __init__(self, database: Database) -> None:
        self.db = database
        self._postgres = database.engine.dialect.name == "postgresql"

    def claim(self, owner: str, lease_seconds: float, destination: str, limit: int,
              max_senders: int | None = None) -> list[Delivery]:
        """Claim up to ``limit`` due rows for one destination, most urgent first.

        ``max_senders`` bounds how many owners (sender processes) send to the destination at once: nothing is
        claimed while that many *other* owners hold live leases on its rows. The check is serialised per
        destination (a transaction-scoped advisory lock on PostgreSQL; on SQLite the claim's own write lock,
        which is why the count is taken after the rows are claimed), so two claimers never both pass it.
        """
        with self.db.session() as session:
            if max_senders is not None and self._postgres:
                session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                                {"key": f"msknode-outbox:{destination}"})
            items = claim_due(session, OutboxItem, owner, lease_seconds, limit,
                              where=[OutboxItem.destination == destination], skip_locked=self._postgres)
            if items and max_senders is not None and self._other_senders(session, owner, destination) >= max_senders:
                session.rollback()  # the claim never happened: no lease taken, no attempt counted
                return []
            return [Delivery(item.id, item.destination, item.path, item.sop_instance_uid, item.sop_class_uid,
                             item.kind, item.attempts, item.created_at) for item in items]

    @staticmethod
    def _other_senders(session, owner: str, destination: str) -> int:  # type: ignore[no-untyped-def]
        return session.scalar(
            select(func.count(distinct(OutboxItem.lease_owner))).where(
                OutboxItem.destination == destination, OutboxItem.state == "sending",
                OutboxItem.lease_expires_at >= utcnow(), OutboxItem.lease_owner != owner)
        ) or 0

    def renew(self, owner: str, item_ids: list[int], lease_seconds: float) -> list[int]:
        """Extend the leases ``owner`` still holds on ``item_ids``; returns the ids whose lease was lost."""
        if not item_ids:
            return []
        with self.db.session() as session:
            session.execute(
                update(OutboxItem)
                .where(OutboxItem.id.in_(item_ids), OutboxItem.lease_owner == owner, OutboxItem.state == "sending")
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
            )
            held = set(session.scalars(select(OutboxItem.id).where(
                OutboxItem.id.in_(item_ids), OutboxItem.lease_owner == owner, OutboxItem.state == "sending")))
        return [item_id for item_id in item_ids if item_id not in held]

    def destinations_due(self) -> list[str]:
        now = utcnow()
        with self.db.session() as session:
            return list(session.scalars(select(OutboxItem.destination).where(due(OutboxItem, now)).distinct()))

    def delivered(self, item_id: int, owner: str, status: str) -> None:
        with self.db.session() as session:
            result = session.execute(
                update(OutboxItem)
                .where(OutboxItem.id == item_id, OutboxItem.lease_owner == owner)
                .values(state="delivered", delivered_at=utcnow(), last_status=status, last_error=None, lease_owner=None)
            )
            _count_delivery(session, item_id, "delivered", result.rowcount)

    def retry_later(self, item_id: int, owner: str, status: str, error: str, delay_seconds: float) -> None:
        with self.db.session() as session:
            result = session.execute(
                update(OutboxItem)
                .where(OutboxItem.id == item_id, OutboxItem.lease_owner == owner)
                .values(
                    state="pending",
                    next_attempt_at=utcnow() + timedelta(seconds=delay_seconds),
                    last_status=status,
                    last_error=error,
                    lease_owner=None,
                )
            )
            _count_delivery(session, item_id, "retry", result.rowcount)

    def dead_letter(self, item_id: int, owner: str | None, status: str, error: str) -> None:
        with self.db.session() as session:
            conditions = [OutboxItem.id == item_id]
            if owner is not None:
                conditions.append(OutboxItem.lease_owner == owner)
            result = session.execute(
                update(OutboxItem)
                .where(*conditions)
                .values(state="dead", last_status=status, last_error=error, lease_owner=None)
            )
            _count_delivery(session, item_id, "dead", result.rowcount)

    # -- admin -------------------------------------------------------------------------------
    def retry(self, item_id: int) -> bool:
        """Send a dead letter again (admin action)."""
        with self.db.session() as session:
            result = session.execute(
                update(OutboxItem)
                .where(OutboxItem.id == item_id, OutboxItem.state == "dead")
                .values(state="pending", attempts=0, next_attempt_at=utcnow(), created_at=utcnow())
            )
            return result.rowcount == 1

    def discard(self, item_id: int) -> bool:
        with self.db.session() as session:
            result = session.execute(
                update(OutboxItem)
                .where(OutboxItem.id == item_id, OutboxItem.state.in_(("dead", "pending")))
                .values(state="discarded")
            )
            return result.rowcount == 1

    def counts(self) -> dict[str, int]:
        with self.db.session() as session:
            return {state: count for state, count in session.execute(
                select(OutboxItem.state, func.count()).group_by(OutboxItem.state)
            ).all()}
