"""Monotonic event counters for ``/metrics``, kept in the database because every role is its own process.

Each role increments a row in the same transaction as the event it counts (an instance indexed, an
association audited, a delivery recorded), so a counter never runs ahead of or behind what happened.
The web role reads the table at scrape time. ``labels`` is stored as a canonical ``k=v,k=v`` string
(keys sorted) so the same label set always hits the same row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import Counter

# Upper bounds (seconds) of the inference duration histogram; +Inf is implicit.
INFERENCE_SECONDS_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def encode_labels(labels: Mapping[str, object] | None) -> str:
    """``{"b": 1, "a": "x"}`` → ``"a=x,b=1"``; commas and equals signs in values are replaced."""
    if not labels:
        return ""
    parts = []
    for key in sorted(labels):
        value = str(labels[key]).replace(",", "_").replace("=", "_")
        parts.append(f"{key}={value}")
    return ",".join(parts)[:200]


def decode_labels(text: str) -> dict[str, str]:
    if not text:
        return {}
    return dict(part.split("=", 1) for part in text.split(","))


# The same upsert statement is valid on SQLite (3.24+) and PostgreSQL (9.5+). Plain SQL on purpose: building
# the SQLAlchemy insert().on_conflict_do_update() construct per call cost more than running it.
_UPSERT = text(
    "INSERT INTO counters (name, labels, value) VALUES (:name, :labels, :amount) "
    "ON CONFLICT (name, labels) DO UPDATE SET value = counters.value + excluded.value"
)


def increment(session: Session, name: str, labels: Mapping[str, object] | None = None, amount: float = 1) -> None:
    """Add ``amount`` to a counter inside the caller's transaction (an upsert on SQLite and PostgreSQL)."""
    session.execute(_UPSERT, {"name": name, "labels": encode_labels(labels), "amount": float(amount)})


def observe(
    session: Session,
    name: str,
    value: float,
    buckets: Sequence[float] = INFERENCE_SECONDS_BUCKETS,
    labels: Mapping[str, object] | None = None,
) -> None:
    """Record one observation of a histogram: ``<name>_bucket{le=…}`` (cumulative), ``_sum`` and ``_count``."""
    base = dict(labels or {})
    for bound in buckets:
        if value <= bound:
            increment(session, f"{name}_bucket", {**base, "le": _format_bound(bound)})
    increment(session, f"{name}_bucket", {**base, "le": "+Inf"})
    increment(session, f"{name}_sum", base, value)
    increment(session, f"{name}_count", base)


def _format_bound(bound: float) -> str:
    return repr(float(bound))


class Counters:
    """Counters for callers that have no transaction of their own (the worker's inference timing)."""

    def __init__(self, database: Database) -> None:
        self.db = database

    def increment(self, name: str, labels: Mapping[str, object] | None = None, amount: float = 1) -> None:
        with self.db.session() as session:
            increment(session, name, labels, amount)

    def observe(self, name: str, value: float, buckets: Sequence[float] = INFERENCE_SECONDS_BUCKETS) -> None:
        with self.db.session() as session:
            observe(session, name, value, buckets)

    def all(self) -> list[tuple[str, dict[str, str], float]]:
        """Every counter as ``(name, labels, value)``."""
        with self.db.session() as session:
            rows: Iterable[Counter] = session.scalars(select(Counter).order_by(Counter.name, Counter.labels))
            return [(row.name, decode_labels(row.labels), float(row.value)) for row in rows]


class BeatFailures:
    """Failures of a periodic database write (a role heartbeat, a lease renewal), reported without the database.

    A failed beat is logged by the caller and recorded here: ``detail[key]`` (the role's heartbeat detail, shown
    by ``msknode status``) says how many beats failed, the last error and since when it has been failing; once
    a beat succeeds again the failures are added to the ``heartbeat_failures{role,kind}`` counter (``/metrics``)
    — while the database is down there is nowhere to count them.
    """

    def __init__(self, counters: Counters | None, detail: dict[str, Any], key: str, role: str, kind: str) -> None:
        self.counters = counters
        self.detail = detail
        self.key = key
        self.labels = {"role": role, "kind": kind}
        self.total = 0
        self.consecutive = 0
        self.unflushed = 0
        self.failing_since: str | None = None

    def failed(self, error: BaseException) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.total += 1
        self.consecutive += 1
        self.unflushed += 1
        self.failing_since = self.failing_since or now
        message = (str(error).strip().splitlines() or [""])[0][:200]  # first line: never the SQL parameters
        self._publish(last_error=f"{type(error).__name__}: {message}", last_error_at=now)

    def succeeded(self) -> None:
        if self.consecutive:
            self.consecutive = 0
            self.failing_since = None
            self._publish()
        if self.unflushed and self.counters is not None:
            try:
                self.counters.increment("heartbeat_failures", self.labels, self.unflushed)
                self.unflushed = 0
            except Exception:  # counted at the next successful beat
                pass

    def _publish(self, **fields: Any) -> None:
        report = dict(self.detail.get(self.key) or {})
        report.update(failures=self.total, consecutive=self.consecutive, failing_since=self.failing_since, **fields)
        self.detail[self.key] = report  # one assignment: a concurrent reader sees the old or the new report
