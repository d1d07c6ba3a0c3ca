"""Notification rows: written with a job's results, claimed with a lease and delivered by the notifier.

The same lease pattern as the outbox (storage/outbox.py): a claim sets ``lease_owner`` /
``lease_expires_at``; a dead process's row is claimed again once the lease expired; failures reschedule the
row with a delay, and a row too old is given up (``dead``) with the reason kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage.db import Database, utcnow
from storage.leases import claim_due
from storage.models import Notification


@dataclass(frozen=True)
class NotificationEntry:
    """One announcement to queue: ``channel`` webhook or smtp, ``target`` the URL or the addresses."""

    channel: str
    target: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class PendingNotification:
    id: int
    channel: str
    target: str
    payload: dict[str, Any]
    attempts: int
    created_at: datetime


def add_for_job(session: Session, job_id: int, study_id: int, study_instance_uid: str, priority: int,
                entries: Sequence[NotificationEntry], now: datetime) -> int:
    """Queue ``entries`` inside the caller's (the job's result) transaction; once per (job, channel, target)."""
    existing = set(
        session.execute(select(Notification.channel, Notification.target).where(Notification.job_id == job_id)).all()
    )
    added = 0
    for entry in entries:
        if (entry.channel, entry.target) in existing:
            continue
        session.add(
            Notification(
                study_id=study_id, study_instance_uid=study_instance_uid, job_id=job_id, channel=entry.channel,
                target=entry.target, priority=priority, payload=entry.payload, state="pending", attempts=0,
                next_attempt_at=now, created_at=now,
            )
        )
        added += 1
    return added


class Notifications:
    def __init__(self, database: Database) -> None:
        self.db = database
        self._postgres = database.engine.dialect.name == "postgresql"

    def claim(self, owner: str, lease_seconds: float, limit: int = 16) -> list[PendingNotification]:
        """Claim up to ``limit`` due rows, most urgent first, then oldest."""
        with self.db.session() as session:
            rows = claim_due(session, Notification, owner, lease_seconds, limit, skip_locked=self._postgres)
            return [PendingNotification(row.id, row.channel, row.target, dict(row.payload), row.attempts,
                                        row.created_at) for row in rows]

    def sent(self, row_id: int, owner: str) -> None:
        with self.db.session() as session:
            session.execute(
                update(Notification)
                .where(Notification.id == row_id, Notification.lease_owner == owner)
                .values(state="sent", sent_at=utcnow(), last_error=None, lease_owner=None)
            )

    def retry_later(self, row_id: int, owner: str, error: str, delay_seconds: float) -> None:
        with self.db.session() as session:
            session.execute(
                update(Notification)
                .where(Notification.id == row_id, Notification.lease_owner == owner)
                .values(state="pending", next_attempt_at=utcnow() + timedelta(seconds=delay_seconds),
                        last_error=error, lease_owner=None)
            )

    def dead(self, row_id: int, owner: str, error: str) -> None:
        with self.db.session() as session:
            session.execute(
                update(Notification)
                .where(Notification.id == row_id, Notification.lease_owner == owner)
                .values(state="dead", last_error=error, lease_owner=None)
            )

    def retry(self, row_id: int) -> bool:
        """Announce a dead notification again (admin action): attempts and its age start from zero."""
        now = utcnow()
        with self.db.session() as session:
            result = session.execute(
                update(Notification)
                .where(Notification.id == row_id, Notification.state == "dead")
                .values(state="pending", attempts=0, next_attempt_at=now, created_at=now, lease_owner=None)
            )
            return result.rowcount == 1

    def discard(self, row_id: int) -> bool:
        """Give up on a dead or pending notification for good (kept, marked discarded)."""
        with self.db.session() as session:
            result = session.execute(
                update(Notification)
                .where(Notification.id == row_id, Notification.state.in_(("dead", "pending")))
                .values(state="discarded", lease_owner=None)
            )
            return result.rowcount == 1

    def counts(self) -> dict[str, int]:
        with self.db.session() as session:
            return {state: count for state, count in session.execute(
                select(Notification.state, func.count()).group_by(Notification.state)
            ).all()}
