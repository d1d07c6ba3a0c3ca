"""Reading studies back: the study lists of ``msknode studies`` and the dashboard, with their latest job.

Writes of intake are storage/intake.py; this module only reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import ImageResultRow, Instance, Job, OutboxItem, Series, Study


def studies_with_instance_counts(session: Session, order_by: Sequence[Any], limit: int) -> list[tuple[Study, int]]:
    """Studies with how many instances each holds, in ``order_by`` order (the CLI's and the dashboard's lists)."""
    counts = (
        select(Instance.study_instance_uid, func.count(Instance.id).label("instances"))
        .group_by(Instance.study_instance_uid)
        .subquery()
    )
    rows = session.execute(
        select(Study, func.coalesce(counts.c.instances, 0))
        .outerjoin(counts, counts.c.study_instance_uid == Study.study_instance_uid)
        .order_by(*order_by)
        .limit(limit)
    ).all()
    return [(study, int(instances)) for study, instances in rows]


def latest_job(session: Session, study_id: int) -> Job | None:
    """The study's most recent job (its results are the current ones)."""
    return session.scalar(
        select(Job).where(Job.study_id == study_id).order_by(Job.created_at.desc(), Job.id.desc()).limit(1)
    )


def studies_summary(database: Database, limit: int = 1000) -> list[dict[str, object]]:
    """One entry per study, newest first (used by ``msknode studies``)."""
    with database.session() as session:
        result: list[dict[str, object]] = []
        for study, instances in studies_with_instance_counts(session, [Study.last_received_at.desc()], limit):
            modalities = session.scalars(
                select(Series.modality).where(Series.study_id == study.id).distinct()
            ).all()
            result.append(
                {
                    "study_instance_uid": study.study_instance_uid,
                    "accession_number": study.accession_number,
                    "instances": instances,
                    "series": len(study.series),
                    "modalities": sorted(m for m in modalities if m),
                    "status": study.status,
                    "reason": study.status_reason,
                    "priority": ("routine", "high", "urgent")[max(0, min(study.priority or 0, 2))],
                    "priority_reason": study.priority_reason,  # the triage rule (or peer default) that set it
                    "first_received": study.first_received_at.isoformat(),
                    "last_received": study.last_received_at.isoformat(),
                    **_processing_summary(session, study),
                }
            )
        return result


def _processing_summary(session: Session, study: Study) -> dict[str, object]:
    """The latest job's per-image outcomes and the delivery state per destination."""
    job = latest_job(session, study.id)
    images: list[dict[str, object]] = []
    if job is not None:
        rows = session.execute(
            select(ImageResultRow, Instance.sop_instance_uid)
            .join(Instance, Instance.id == ImageResultRow.instance_id)
            .where(ImageResultRow.job_id == job.id)
            .order_by(ImageResultRow.id)
        ).all()
        images = [
            {"sop_instance_uid": uid, "frame": r.frame_index, "state": r.state, "reason": r.reason, "score": r.score}
            for r, uid in rows
        ]
    deliveries: dict[str, dict[str, int]] = {}
    for destination, state, count in session.execute(
        select(OutboxItem.destination, OutboxItem.state, func.count())
        .where(OutboxItem.study_instance_uid == study.study_instance_uid)
        .group_by(OutboxItem.destination, OutboxItem.state)
    ).all():
        deliveries.setdefault(destination, {})[state] = int(count)
    return {
        "job": None if job is None else {"id": job.id, "state": job.state, "attempts": job.attempts, "error": job.last_error},
        # MR studies: the chosen series per plane and every rejected one with its reasons (None: no selection made)
        "series_selection": None if job is None else job.series_selection,
        "images": images,
        "deliveries": deliveries,
    }
