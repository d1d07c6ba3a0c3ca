"""The database as the queue: jobs and outbox rows claimed with a lease.

A claim sets ``lease_owner`` and ``lease_expires_at``; the owner extends the lease with heartbeats. A row
whose lease has expired (its process died) can be claimed again by anyone. On PostgreSQL the candidate
rows are locked with ``FOR UPDATE SKIP LOCKED`` so concurrent workers on several machines never wait on
each other; on SQLite (one machine) the conditional UPDATE that takes the lease is itself atomic. Either
way the UPDATE re-checks the claim predicate, so two claimants can never both win one row.

One study, one revision at a time: a job waits while another job of its study is processing under a live
lease (the UPDATE re-checks that too; on PostgreSQL the claimant first locks the study row, skipping it when
another claimant holds it, so two workers never take two revisions of a study at once). An older revision's
job that comes up for a claim while a newer one exists is superseded, and ``record_results`` refuses the
results of a revision older than one that is processing or finished: the newest revision's results are the
last ones recorded, so the newest revision's SR is the study's current one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import aliased

from storage.db import Database, utcnow
from storage.models import ImageResultRow, Job, OutboxItem, Study
from storage.notifications import NotificationEntry, add_for_job

JOB_ACTIVE_STATES = ("queued", "processing")
JOB_FINISHED_STATES = ("done", "not_analysed", "failed")


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    study_id: int
    study_instance_uid: str
    study_revision: int
    priority: int
    attempts: int


@dataclass(frozen=True)
class ImageOutcome:
    instance_id: int
    state: str  # analysed, ineligible, failed
    reason: str | None = None
    score: float | None = None
    outputs: dict[str, Any] | None = None
    frame_index: int = 0


@dataclass(frozen=True)
class OutboxEntry:
    sop_instance_uid: str
    sop_class_uid: str
    kind: str
    path: str
    destination: str


class JobQueue:
    def __init__(self, database: Database) -> None:
        self.db = database
        self._postgres = database.engine.dialect.name == "postgresql"

    # -- producing ---------------------------------------------------------------------------
    def enqueue(self, study_id: int, revision: int, priority: int) -> int:
        """Queue a job for one study revision; older queued jobs of the study are superseded."""
        now = utcnow()
        with self.db.session() as session:
            session.execute(
                update(Job)
                .where(Job.study_id == study_id, Job.state == "queued")
                .values(state="superseded", finished_at=now)
            )
            job = Job(
                study_id=study_id,
                study_revision=revision,
                state="queued",
                priority=priority,
                attempts=0,
                created_at=now,
            )
            session.add(job)
            session.execute(
                update(Study)
                .where(Study.id == study_id)
                .values(status="queued", status_reason=None, queued_revision=revision)
            )
            session.flush()
            return job.id

    # -- claiming ----------------------------------------------------------------------------
    def _claimable(self, now: datetime):  # type: ignore[no-untyped-def]
        return or_(
            Job.state == "queued",
            and_(Job.state == "processing", Job.lease_expires_at < now),
        )

    @staticmethod
    def _study_idle(now: datetime):  # type: ignore[no-untyped-def]
        """No other job of the job's study is processing under a live lease."""
        other = aliased(Job)
        return ~exists().where(
            other.study_id == Job.study_id, other.id != Job.id, other.state == "processing",
            other.lease_expires_at >= now,
        )

    @staticmethod
    def _newer_job(session, study_id: int, revision: int, states: Sequence[str]):  # type: ignore[no-untyped-def]
        """The newest job of a later revision of the study in one of ``states`` (revision, state), or None."""
        return session.execute(
            select(Job.study_revision, Job.state)
            .where(Job.study_id == study_id, Job.study_revision > revision, Job.state.in_(states))
            .order_by(Job.study_revision.desc(), Job.id.desc())
            .limit(1)
        ).first()

    def claim(self, owner: str, lease_seconds: float, limit: int = 1, max_attempts: int = 3) -> list[ClaimedJob]:
        """Claim up to ``limit`` jobs, most urgent first, then oldest.

        A job whose previous holders died ``max_attempts`` times is failed instead of claimed again.
        """
        claimed: list[ClaimedJob] = []
        now = utcnow()
        expires = now + timedelta(seconds=lease_seconds)
        with self.db.session() as session:
            query = (
                select(Job.id, Job.attempts, Job.state, Job.study_id, Job.study_revision)
                .where(self._claimable(now))
                .order_by(Job.priority.desc(), Job.created_at, Job.id)
                .limit(limit * 4)
            )
            if self._postgres:
                query = query.with_for_update(skip_locked=True)
            candidates = session.execute(query).all()
            for job_id, attempts, _state, study_id, revision in candidates:
                if len(claimed) >= limit:
                    break
                if self._postgres and session.scalar(
                    select(Study.id).where(Study.id == study_id).with_for_update(skip_locked=True)
                ) is None:
                    continue  # another claimant (or intake) holds the study right now: next round
                newer = self._newer_job(session, study_id, revision, JOB_ACTIVE_STATES + JOB_FINISHED_STATES)
                if newer is not None:
                    session.execute(
                        update(Job)
                        .where(Job.id == job_id, self._claimable(now))
                        .values(state="superseded", finished_at=now, lease_owner=None,
                                last_error=f"superseded: revision {newer.study_revision} is {newer.state}")
                    )
                    continue
                if attempts >= max_attempts:
                    session.execute(
                        update(Job)
                        .where(Job.id == job_id, self._claimable(now))
                        .values(
                            state="failed",
                            finished_at=now,
                            lease_owner=None,
                            last_error=f"abandoned after {attempts} attempt(s) (worker lost or timed out)",
                        )
                    )
                    self._set_study_status_for_job(session, job_id, "failed", "processing attempts exhausted")
                    continue
                result = session.execute(
                    update(Job)
                    .where(Job.id == job_id, self._claimable(now), self._study_idle(now))
                    .values(
                        state="processing",
                        lease_owner=owner,
                        lease_expires_at=expires,
                        attempts=Job.attempts + 1,
                        started_at=now,
                    )
                )
                if result.rowcount != 1:
                    continue  # somebody else won it, or another revision of its study is processing
                job, study = session.execute(
                    select(Job, Study).join(Study, Study.id == Job.study_id).where(Job.id == job_id)
                ).one()
                study.status = "processing"
                claimed.append(
                    ClaimedJob(job.id, study.id, study.study_instance_uid, job.study_revision, job.priority, job.attempts)
                )
        return claimed

    def heartbeat(self, owner: str, job_ids: list[int], lease_seconds: float) -> list[int]:
        """Extend the leases still held; returns the ids whose lease was lost."""
        if not job_ids:
            return []
        expires = utcnow() + timedelta(seconds=lease_seconds)
        with self.db.session() as session:
            session.execute(
                update(Job)
                .where(Job.id.in_(job_ids), Job.lease_owner == owner, Job.state == "processing")
                .values(lease_expires_at=expires)
            )
            held = set(
                session.scalars(
                    select(Job.id).where(Job.id.in_(job_ids), Job.lease_owner == owner, Job.state == "processing")
                )
            )
        return [job_id for job_id in job_ids if job_id not in held]

    # -- finishing ---------------------------------------------------------------------------
    def record_results(
        self,
        job_id: int,
        owner: str,
        state: str,
        images: list[ImageOutcome],
        outbox: list[OutboxEntry],
        *,
        priority: int,
        priority_reason: str,
        reason: str | None = None,
        notifications: Sequence[NotificationEntry] = (),
        series_selection: dict[str, Any] | None = None,
    ) -> bool:
        """Record a job's outcome, its per-image results, its outbox rows and its notifications in one transaction.

        Returns False (and records nothing) if the lease was lost meanwhile: another worker owns the job. Also
        False when a later revision of the study is processing or finished: these results are stale, the job
        ends ``superseded`` with the reason in ``last_error`` and nothing else is written (no image results,
        no outbox rows, the study's priority untouched). The study row is locked first (SQLite: the write
        lock, PostgreSQL: ``FOR UPDATE``), so two revisions' results are never recorded at the same time.
        ``priority`` and ``priority_reason`` are the study's priority as triage decided it
        (node/pipeline/triage.Triage); they are stored on the study and given to the outbox rows and
        notifications as they are, never computed here. Notifications are queued once per
        (job, channel, target), so a study is never announced twice for one result revision. ``series_selection``
        (MR studies: which series fed the 3-D model, and why the others did not) is stored on the job.
        """
        now = utcnow()
        with self.db.locked_session() as session:
            study_id = session.scalar(select(Job.study_id).where(Job.id == job_id))
            if study_id is None:
                return False
            if self._postgres:
                session.execute(select(Study.id).where(Study.id == study_id).with_for_update())
            job = session.get(Job, job_id, populate_existing=True)
            if job is None or job.lease_owner != owner or job.state != "processing":
                return False
            newer = self._newer_job(session, job.study_id, job.study_revision, ("processing",) + JOB_FINISHED_STATES)
            if newer is not None:
                job.state = "superseded"
                job.finished_at = now
                job.lease_owner = None
                job.last_error = (f"results of revision {job.study_revision} discarded: "
                                  f"revision {newer.study_revision} is {newer.state}")
                return False
            job.state = state
            job.finished_at = now
            job.lease_owner = None
            job.last_error = reason if state == "failed" else None
            job.series_selection = series_selection
            for image in images:
                session.add(
                    ImageResultRow(
                        job_id=job_id,
                        instance_id=image.instance_id,
                        frame_index=image.frame_index,
                        state=image.state,
                        reason=image.reason,
                        score=image.score,
                        outputs=image.outputs,
                    )
                )
            study = session.get(Study, job.study_id)
            assert study is not None
            # Deliveries of an older job's results that have not gone out yet are cancelled: these replace them.
            session.execute(
                update(OutboxItem)
                .where(
                    OutboxItem.study_instance_uid == study.study_instance_uid,
                    OutboxItem.state == "pending",
                    OutboxItem.job_id != job_id,
                )
                .values(state="superseded")
            )
            for entry in outbox:
                session.add(
                    OutboxItem(
                        job_id=job_id,
                        study_instance_uid=study.study_instance_uid,
                        sop_instance_uid=entry.sop_instance_uid,
                        sop_class_uid=entry.sop_class_uid,
                        kind=entry.kind,
                        path=entry.path,
                        destination=entry.destination,
                        state="pending",
                        priority=priority,
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                    )
                )
            if study.revision == job.study_revision:
                # (A newer revision that arrived meanwhile keeps its own 'received' status.)
                study.status = state
                study.status_reason = reason
            study.priority = priority
            study.priority_reason = priority_reason
            if notifications:
                add_for_job(session, job_id, study.id, study.study_instance_uid, priority, notifications, now)
            return True

    def release(self, job_id: int, owner: str, error: str) -> None:
        """Give a job back after a failure that another attempt may not repeat (e.g. timeout)."""
        with self.db.session() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner)
                .values(state="queued", lease_owner=None, lease_expires_at=None, last_error=error)
            )

    def _set_study_status_for_job(self, session, job_id: int, status: str, reason: str) -> None:  # type: ignore[no-untyped-def]
        job = session.get(Job, job_id)
        if job is None:
            return
        study = session.get(Study, job.study_id)
        if study is not None and study.revision == job.study_revision:
            study.status = status
            study.status_reason = reason

    # -- admin -------------------------------------------------------------------------------
    def retry(self, job_id: int) -> bool:
        """Re-queue a failed job (admin action); attempts start again."""
        now = utcnow()
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is None or job.state not in ("failed",):
                return False
            job.state = "queued"
            job.attempts = 0
            job.created_at = now
            job.lease_owner = None
            study = session.get(Study, job.study_id)
            if study is not None:
                study.status = "queued"
                study.status_reason = None
            return True
