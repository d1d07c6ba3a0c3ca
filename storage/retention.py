"""Retention: delete finished studies' inputs and outputs after a number of days, and in an emergency
(free disk below the watermark) the oldest finished ones first. Undelivered work is never deleted: a study
qualifies only when it is done / not_analysed and every outbox row is delivered or discarded."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, select

from storage.db import Database, utcnow
from storage.models import ImageResultRow, Instance, Job, OutboxItem, Series, Study
from storage.spool import Spool

log = logging.getLogger("msknode.retention")

FINISHED = ("done", "not_analysed")


class Retention:
    def __init__(self, database: Database, spool: Spool) -> None:
        self.db = database
        self.spool = spool

    def _candidates(self, session, older_than: datetime | None, limit: int):  # type: ignore[no-untyped-def]
        undelivered = exists().where(
            OutboxItem.study_instance_uid == Study.study_instance_uid,
            OutboxItem.state.not_in(("delivered", "discarded", "superseded")),
        )
        active_job = exists().where(Job.study_id == Study.id, Job.state.in_(("queued", "processing")))
        query = (
            select(Study)
            .where(Study.status.in_(FINISHED), Study.revision <= Study.queued_revision, ~undelivered, ~active_job)
            .order_by(Study.last_received_at)
            .limit(limit)
        )
        if older_than is not None:
            query = query.where(Study.last_received_at < older_than)
        return session.scalars(query).all()

    def purge_study(self, study_instance_uid: str) -> int:
        """Delete one study's files and rows; returns the number of files removed."""
        removed = 0
        with self.db.session() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
            if study is None:
                return 0
            paths = list(session.scalars(select(Instance.spool_path).where(Instance.study_instance_uid == study_instance_uid)))
            paths += list(session.scalars(select(OutboxItem.path).where(OutboxItem.study_instance_uid == study_instance_uid).distinct()))
            job_ids = select(Job.id).where(Job.study_id == study.id)
            session.execute(delete(ImageResultRow).where(ImageResultRow.job_id.in_(job_ids)))
            session.execute(delete(OutboxItem).where(OutboxItem.study_instance_uid == study_instance_uid))
            session.execute(delete(Job).where(Job.study_id == study.id))
            session.execute(delete(Instance).where(Instance.study_instance_uid == study_instance_uid))
            session.execute(delete(Series).where(Series.study_id == study.id))
            session.delete(study)
        for path in set(paths):  # after the commit: a crash leaves orphan files, never dangling rows
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
            self.purge_study(uid)
            purged += 1
        if purged:
            log.info("retention: purged %d study(ies) older than %.1f days", purged, days)
        while emergency and not has_room():
            with self.db.session() as session:
                oldest = [s.study_instance_uid for s in self._candidates(session, None, 10)]
            if not oldest:
                log.error("disk below watermark and nothing finished left to delete (undelivered work is kept)")
                break
            for uid in oldest:
                self.purge_study(uid)
                purged += 1
            log.warning("emergency clean-up: purged %d oldest finished study(ies)", len(oldest))
        return purged
