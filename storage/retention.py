"""Retention: delete finished studies' inputs and outputs after a number of days, and in an emergency
(free disk below the watermark) the oldest finished ones first. Undelivered work is never deleted: a study
qualifies only when it is done / not_analysed and every outbox row is delivered or discarded.

Candidates are chosen in one transaction and each is purged in its own, so the purge checks again, holding the
study: on PostgreSQL its row is locked (``SELECT ... FOR UPDATE``; intake, the queue and ``record_results`` all
write that row, so they wait), on SQLite the transaction starts ``BEGIN IMMEDIATE`` (the database's write
lock). A study that an instance reached in the meantime no longer qualifies and is left alone. The files are
removed before the commit, while the study is held: intake's commit of an identical re-send (which finds the
file already in place) then comes after the removal, and the receiver, seeing its file gone, refuses the
C-STORE instead of acknowledging it (node/dicom/receiver.py). A crash between removal and commit leaves the
rows of a study that still qualifies; the next pass purges them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, delete, exists, select

from storage.db import Database, utcnow
from storage.models import (
    Association,
    ImageResultRow,
    Instance,
    InstanceReplacement,
    Job,
    Notification,
    OutboxItem,
    Series,
    Study,
)
from storage.spool import Spool

log = logging.getLogger("msknode.retention")

# "stored": a study of non-image objects only (results echoed back, a KO...), which never gets a job.
FINISHED = ("done", "not_analysed", "stored")


class Retention:
    def __init__(self, database: Database, spool: Spool) -> None:
        self.db = database
        self.spool = spool

    @staticmethod
    def _qualifies(older_than: datetime | None) -> list[ColumnElement[bool]]:
        """A study retention may delete: finished, every revision processed, nothing undelivered or queued."""
        undelivered = exists().where(
            OutboxItem.study_instance_uid == Study.study_instance_uid,
            OutboxItem.state.not_in(("delivered", "discarded", "superseded")),
        )
        active_job = exists().where(Job.study_id == Study.id, Job.state.in_(("queued", "processing")))
        conditions = [Study.status.in_(FINISHED), Study.revision <= Study.queued_revision, ~undelivered, ~active_job]
        if older_than is not None:
            conditions.append(Study.last_received_at < older_than)
        return conditions

    def _candidates(self, session, older_than: datetime | None, limit: int):  # type: ignore[no-untyped-def]
        query = select(Study).where(*self._qualifies(older_than)).order_by(Study.last_received_at).limit(limit)
        return session.scalars(query).all()

    def purge_study(self, study_instance_uid: str, older_than: datetime | None = None) -> int | None:
        """Delete one study's files and rows if it still qualifies; returns the number of files removed, or None
        when the study is gone or no longer qualifies (kept)."""
        removed = 0
        with self.db.locked_session() as session:
            # Hold the study first (PostgreSQL: row lock; SQLite: BEGIN IMMEDIATE), then check again in a new
            # statement, which sees everything committed before the lock was granted.
            locking = select(Study.id).where(Study.study_instance_uid == study_instance_uid)
            if self.db.engine.dialect.name == "postgresql":
                locking = locking.with_for_update()
            study_id = session.scalar(locking)
            if study_id is None:
                return None
            study = session.scalar(select(Study).where(Study.id == study_id, *self._qualifies(older_than)))
            if study is None:
                log.info("retention: a study changed since it was chosen (a new instance or job); kept")
                return None
            paths = list(session.scalars(select(Instance.spool_path).where(Instance.study_instance_uid == study_instance_uid)))
            paths += list(session.scalars(select(OutboxItem.path).where(OutboxItem.study_instance_uid == study_instance_uid).distinct()))
            job_ids = select(Job.id).where(Job.study_id == study.id)
            session.execute(delete(ImageResultRow).where(ImageResultRow.job_id.in_(job_ids)))
            session.execute(delete(OutboxItem).where(OutboxItem.study_instance_uid == study_instance_uid))
            session.execute(delete(Job).where(Job.study_id == study.id))
            session.execute(delete(Instance).where(Instance.study_instance_uid == study_instance_uid))
            session.execute(delete(Series).where(Series.study_id == study.id))
            session.delete(study)
            session.flush()
            for path in set(paths):  # before the commit, while the study is held (see the module docstring)
                if self.spool.absolute(path).exists():
                    self.spool.remove(path)
                    removed += 1
        return removed

    def run(self, days: float, has_room: Callable[[], bool], emergency: bool = True, now: datetime | None = None) -> int:
        """Purge expired studies, then (if still short of space) the oldest finished ones; returns studies purged."""
        now = now or utcnow()
        purged = 0
        with self.db.session() as session:
            expired = [s.study_instance_uid for s in self._candidates(session, now - timedelta(days=days), 500)]
        for uid in expired:
            if self.purge_study(uid, now - timedelta(days=days)) is not None:
                purged += 1
        if purged:
            log.info("retention: purged %d study(ies) older than %.1f days", purged, days)
        while emergency and not has_room():
            with self.db.session() as session:
                oldest = [s.study_instance_uid for s in self._candidates(session, None, 10)]
            if not oldest:
                log.error("disk below watermark and nothing finished left to delete (undelivered work is kept)")
                break
            count = sum(1 for uid in oldest if self.purge_study(uid) is not None)
            purged += count
            if not count:
                continue  # every one changed since it was chosen: choose again
            log.warning("emergency clean-up: purged %d oldest finished study(ies)", count)
        return purged

    def purge_records(self, days: float, now: datetime | None = None) -> dict[str, int]:
        """Delete notification payloads and audit rows older than ``days``; returns the rows deleted per table.

        A payload may carry PHI (``notifications.include_phi``) and an audit row says who sent what, when: they
        are kept as long as the studies, no longer. Kept regardless of age: a notification still pending (it
        has its own ``max_age_hours``), an association still open or that an instance row still refers to.
        """
        cutoff = (now or utcnow()) - timedelta(days=days)
        still_referenced = exists().where(Instance.association_id == Association.id)
        with self.db.session() as session:
            counts = {
                "notifications": session.execute(
                    delete(Notification).where(Notification.created_at < cutoff,
                                               Notification.state.in_(("sent", "dead", "discarded")))
                ).rowcount or 0,
                "associations": session.execute(
                    delete(Association)
                    .where(Association.started_at < cutoff, Association.outcome != "open", ~still_referenced)
                    .execution_options(synchronize_session=False)
                ).rowcount or 0,
                "instance_replacements": session.execute(
                    delete(InstanceReplacement).where(InstanceReplacement.replaced_at < cutoff)
                ).rowcount or 0,
            }
        if any(counts.values()):
            log.info("retention: purged %s older than %.1f days",
                     ", ".join(f"{count} {table}" for table, count in counts.items() if count), days)
        return counts

