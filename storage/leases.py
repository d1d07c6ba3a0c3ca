"""Claiming rows of a leased delivery table (the outbox, notifications): one pattern, written once.

A row is due when it is ``pending`` and its ``next_attempt_at`` has come, or ``sending`` under a lease that
expired (its process died). A claim marks it ``sending`` for ``owner`` until the lease ends and counts the
attempt; the guarded UPDATE makes two claimers never get the same row (PostgreSQL also skips rows locked by
another claimer instead of waiting for them).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from storage.db import utcnow

Row = TypeVar("Row")


def due(table: Any, now: datetime) -> ColumnElement[bool]:
    """Pending and due, or sending under an expired lease."""
    return or_(
        and_(table.state == "pending", table.next_attempt_at <= now),
        and_(table.state == "sending", table.lease_expires_at < now),
    )


def claim_due(session: Session, table: type[Row], owner: str, lease_seconds: float, limit: int,
              where: Sequence[ColumnElement[bool]] = (), skip_locked: bool = False) -> list[Row]:
    """Claim up to ``limit`` due rows, most urgent first, then oldest; returns the claimed rows."""
    model: Any = table
    now = utcnow()
    query = (
        select(model.id)
        .where(due(model, now), *where)
        .order_by(model.priority.desc(), model.created_at, model.id)
        .limit(limit)
    )
    if skip_locked:
        query = query.with_for_update(skip_locked=True)
    claimed: list[Row] = []
    for (row_id,) in session.execute(query).all():
        result = session.execute(
            update(model)
            .where(model.id == row_id, due(model, now))
            .values(state="sending", lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds),
                    attempts=model.attempts + 1)
        )
        if result.rowcount == 1:
            row = session.get(model, row_id)
            assert row is not None
            claimed.append(row)
    return claimed
