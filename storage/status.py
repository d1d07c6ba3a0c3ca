"""Database side of ``msknode status``, ``/healthz``, ``/metrics`` and ``msknode queue``.

Role heartbeats (each role process upserts its row every few seconds), queue depths by state, the age of
the oldest pending work, and the list of items needing an admin (failed jobs, dead letters).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete, func, select, text

from storage.db import Database, as_utc, utcnow
from storage.models import Job, Notification, OutboxItem, RoleHeartbeat, Study

# Which state counts as "waiting" in each queue, for the oldest-pending age.
PENDING_STATES = {
    "jobs": ("queued", "processing"),
    "outbox": ("pending", "sending"),
    "notifications": ("pending",),
}
_QUEUE_MODELS = {"jobs": Job, "outbox": OutboxItem, "notifications": Notification}


def ping(database: Database) -> None:
    """Raise if the database does not answer a trivial query."""
    with database.engine.connect() as connection:
        connection.execute(text("SELECT 1"))


class Heartbeats:
    """``role_heartbeats``: one row per running role process (``role@host:pid``)."""

    def __init__(self, database: Database) -> None:
        self.db = database

    def beat(self, owner: str, role: str, started_at: datetime, detail: dict[str, Any]) -> None:
        with self.db.session() as session:
            row = session.get(RoleHeartbeat, owner)
            if row is None:
                row = RoleHeartbeat(owner=owner, role=role, started_at=started_at)
                session.add(row)
            row.seen_at = utcnow()
            row.detail = dict(detail)

    def forget(self, owner: str) -> None:
        """A role that stops cleanly removes its row (a crashed one just stops being seen)."""
        with self.db.session() as session:
            session.execute(delete(RoleHeartbeat).where(RoleHeartbeat.owner == owner))

    def list(self) -> list[dict[str, Any]]:
        now = utcnow()
        with self.db.session() as session:
            rows = session.scalars(select(RoleHeartbeat).order_by(RoleHeartbeat.role, RoleHeartbeat.owner))
            return [
                {
                    "owner": row.owner,
                    "role": row.role,
                    "started_at": as_utc(row.started_at).isoformat(),
                    "seen_at": as_utc(row.seen_at).isoformat(),
                    "seen_seconds_ago": round((now - as_utc(row.seen_at)).total_seconds(), 1),
                    "detail": dict(row.detail or {}),
                }
                for row in rows
            ]


def queue_depths(database: Database) -> dict[str, dict[str, int]]:
    """``{"jobs": {"queued": 3, ...}, "outbox": {...}, "notifications": {...}}``."""
    depths: dict[str, dict[str, int]] = {}
    with database.session() as session:
        for queue, model in _QUEUE_MODELS.items():
            depths[queue] = {
                str(state): int(count)
                for state, count in session.execute(select(model.state, func.count()).group_by(model.state)).all()
            }
    return depths


def oldest_pending_seconds(database: Database) -> dict[str, float]:
    """Age in seconds of the oldest waiting item of each queue (0 when it is empty)."""
    now = utcnow()
    ages: dict[str, float] = {}
    with database.session() as session:
        for queue, model in _QUEUE_MODELS.items():
            oldest = session.scalar(
                select(func.min(model.created_at)).where(model.state.in_(PENDING_STATES[queue]))
            )
            ages[queue] = 0.0 if oldest is None else max(0.0, (now - as_utc(oldest)).total_seconds())
    return ages


def attention_items(database: Database, limit: int = 500) -> list[dict[str, Any]]:
    """Failed jobs, dead outbox letters and dead notifications; ``id`` is ``job:N``, ``out:N`` or ``note:N``."""
    items: list[dict[str, Any]] = []
    with database.session() as session:
        for job, study_uid in session.execute(
            select(Job, Study.study_instance_uid)
            .join(Study, Study.id == Job.study_id)
            .where(Job.state == "failed")
            .order_by(Job.id.desc())
            .limit(limit)
        ).all():
            items.append({
                "id": f"job:{job.id}",
                "kind": "job",
                "state": job.state,
                "study_instance_uid": study_uid,
                "destination": None,
                "attempts": job.attempts,
                "when": as_utc(job.finished_at or job.created_at).isoformat(),
                "reason": job.last_error,
            })
        for item in session.scalars(
            select(OutboxItem).where(OutboxItem.state == "dead").order_by(OutboxItem.id.desc()).limit(limit)
        ):
            items.append({
                "id": f"out:{item.id}",
                "kind": f"delivery {item.kind}",
                "state": item.state,
                "study_instance_uid": item.study_instance_uid,
                "destination": item.destination,
                "attempts": item.attempts,
                "when": as_utc(item.created_at).isoformat(),
                "reason": f"{item.last_status or ''} {item.last_error or ''}".strip(),
            })
        for note in session.scalars(
            select(Notification).where(Notification.state == "dead").order_by(Notification.id.desc()).limit(limit)
        ):
            items.append({
                "id": f"note:{note.id}",
                "kind": f"notification {note.channel}",
                "state": note.state,
                "study_instance_uid": note.study_instance_uid,
                # the host only: a webhook URL's path or query may carry a token
                "destination": urlsplit(note.target).netloc if note.channel == "webhook" else "smtp",
                "attempts": note.attempts,
                "when": as_utc(note.created_at).isoformat(),
                "reason": note.last_error,
            })
    return items
