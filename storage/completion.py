"""Study completion: when has a study stopped arriving?

DICOM gives no end-of-study signal over C-STORE, so completion is inferred (as every peer does):
a study revision is complete when the association that delivered its latest instance was *released*
(not aborted), no association still delivering to it is open, and nothing arrived for the settle period;
or, regardless, ``force_complete_seconds`` after the revision's first instance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select, update

from storage.db import Database, as_utc, utcnow
from storage.models import Association, Instance, Job, Study
from storage.queue import JobQueue



def starts_revision():  # type: ignore[no-untyped-def]
    """SQL condition: the instance is an image (rows from before migration 0004 have no kind: images)."""
    return or_(Instance.intake_kind.is_(None), Instance.intake_kind == "image")


@dataclass(frozen=True)
class CompletionDecision:
    study_id: int
    study_instance_uid: str
    revision: int
    complete: bool
    forced: bool
    waiting_reason: str | None
    calling_ae_title: str | None


def evaluate(
    database: Database,
    now: datetime,
    settle_seconds: Callable[[str | None], float],
    force_complete_seconds: float,
) -> list[CompletionDecision]:
    """Decide for every study with an unqueued revision; ``settle_seconds(calling_ae)`` gives per-peer values."""
    decisions: list[CompletionDecision] = []
    with database.session() as session:
        studies = session.scalars(
            select(Study).where(Study.revision > Study.queued_revision)
        ).all()
        for study in studies:
            last_job_created = session.scalar(
                select(func.max(Job.created_at)).where(Job.study_id == study.id)
            )
            # Only instances that start a revision count (node/dicom/provenance.py): our own results echoed back
            # and other non-image objects neither hold a revision open nor restart its settle period.
            revision_instances = select(Instance).where(Instance.study_instance_uid == study.study_instance_uid,
                                                        starts_revision())
            if last_job_created is not None:
                revision_instances = revision_instances.where(Instance.received_at > last_job_created)
            rows = session.scalars(revision_instances.order_by(Instance.received_at)).all()
            if not rows:
                rows = session.scalars(
                    select(Instance).where(Instance.study_instance_uid == study.study_instance_uid,
                                           starts_revision())
                    .order_by(Instance.received_at)
                ).all()
            if not rows:
                continue
            first = as_utc(rows[0].received_at)
            latest = rows[-1]
            association_ids = {row.association_id for row in rows}
            outcomes = dict(
                session.execute(
                    select(Association.id, Association.outcome).where(Association.id.in_(association_ids))
                ).all()
            )
            still_open = any(outcome == "open" for outcome in outcomes.values())
            latest_outcome = outcomes.get(latest.association_id)
            quiet = (now - as_utc(latest.received_at)).total_seconds()
            settle = settle_seconds(latest.calling_ae_title)
            settled = not still_open and latest_outcome == "released" and quiet >= settle
            timed_out = (now - first).total_seconds() >= force_complete_seconds
            if settled or timed_out:
                reason = None
            elif still_open:
                reason = "association still open"
            elif latest_outcome != "released":
                reason = f"last association {latest_outcome}; waiting for a complete send or the force timeout"
            else:
                reason = f"settling ({quiet:.0f}/{settle:.0f} s quiet)"
            decisions.append(
                CompletionDecision(
                    study_id=study.id,
                    study_instance_uid=study.study_instance_uid,
                    revision=study.revision,
                    complete=settled or timed_out,
                    forced=timed_out and not settled,
                    waiting_reason=reason,
                    calling_ae_title=latest.calling_ae_title,
                )
            )
    return decisions


def tick(
    database: Database,
    queue: JobQueue,
    settle_seconds: Callable[[str | None], float],
    force_complete_seconds: float,
    initial_priority: Callable[[str | None], int] = lambda _ae: 0,
    now: datetime | None = None,
) -> list[CompletionDecision]:
    """One scheduler pass: queue the complete studies, mark the others waiting with the reason.

    ``initial_priority`` gives the rank a study's job is queued with, as triage decided it for the sender
    (node/pipeline/scheduler.py); it is stored as given (routine when none is passed).
    """
    now = now or utcnow()
    decisions = evaluate(database, now, settle_seconds, force_complete_seconds)
    for decision in decisions:
        if decision.complete:
            queue.enqueue(decision.study_id, decision.revision, initial_priority(decision.calling_ae_title))
    waiting = [decision for decision in decisions if not decision.complete]
    if waiting:
        # One transaction for all, and only rows whose status changes: on SQLite every write commit is an
        # fsync under the database's single write lock, which the receiver needs for every C-STORE.
        with database.session() as session:
            for decision in waiting:
                status = "received" if decision.waiting_reason == "association still open" else "waiting"
                session.execute(
                    update(Study)
                    .where(Study.id == decision.study_id, Study.revision == decision.revision)
                    .where(or_(Study.status != status, Study.status_reason.is_distinct_from(decision.waiting_reason)))
                    .values(status=status, status_reason=decision.waiting_reason)
                )
    return decisions


