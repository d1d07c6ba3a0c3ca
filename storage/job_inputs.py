"""A claimed job's inputs: what a worker reads about it from the database (its instances and who sent them,
the job's creation time, the study's earlier SR). Not a DICOM Modality Worklist."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, or_, select

from storage.db import Database
from storage.models import Instance, Job, OutboxItem


@dataclass(frozen=True)
class JobInput:
    """One stored instance of the job's study."""

    instance_id: int
    sop_instance_uid: str
    spool_path: str
    sha256: str
    calling_ae_title: str
    modality: str | None = None  # as indexed at intake: the worker routes MR studies without reading headers


class JobInputs:
    """Reads a job's inputs (the worker's only way to the study's rows)."""

    def __init__(self, database: Database) -> None:
        self.db = database

    def inputs(self, study_instance_uid: str) -> list[JobInput]:
        with self.db.session() as session:
            rows = session.scalars(
                select(Instance)
                .where(Instance.study_instance_uid == study_instance_uid)
                # Results (ours echoed back, another AI's) are never inputs (node/dicom/provenance.py).
                .where(or_(Instance.intake_kind.is_(None), Instance.intake_kind.not_in(("own_result", "ai_result"))))
                .order_by(Instance.series_id, Instance.instance_number, Instance.sop_instance_uid)
            ).all()
            return [JobInput(r.id, r.sop_instance_uid, r.spool_path, r.sha256, r.calling_ae_title, r.modality)
                    for r in rows]

    def job_created_at(self, job_id: int):  # type: ignore[no-untyped-def]
        with self.db.session() as session:
            job = session.get(Job, job_id)
            return job.created_at if job else None

    def previous_sr_paths(self, study_instance_uid: str, current_job_id: int) -> list[str]:
        """Every SR built for this study by another job (delivered, on its way, dead-lettered), oldest first.

        A new SR names all of them as predecessors: a pending one may be cancelled by the new results while
        an older one already reached the PACS, and either way the new SR must be the only current one there.
        """
        with self.db.session() as session:
            rows = session.execute(
                select(OutboxItem.path, func.min(OutboxItem.id))
                .where(
                    OutboxItem.study_instance_uid == study_instance_uid,
                    OutboxItem.kind == "SR",
                    OutboxItem.job_id != current_job_id,
                    OutboxItem.state.in_(("delivered", "pending", "sending", "dead")),
                )
                .group_by(OutboxItem.path)
            ).all()
        return [path for path, _first in sorted(rows, key=lambda row: row[1])]
