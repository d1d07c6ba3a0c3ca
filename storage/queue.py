"""The database as the queue: jobs and outbox rows claimed with a lease.

A claim sets ``lease_owner`` and ``lease_expires_at``; the owner extends the lease with heartbeats. A row
whose lease has expired (its process died) can be claimed again by anyone. On PostgreSQL the candidate
rows are locked with ``FOR UPDATE SKIP LOCKED`` so concurrent workers on several machines never wait on
each other; on SQLite (one machine) the conditional UPDATE that takes the lease is itself atomic. Either
way the UPDATE re-checks the claim predicate, so two claimants can never both win one row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update

from storage.db import Database, utcnow
from storage.models import ImageResultRow, Job, OutboxItem, Study
from storage.notifications import NotificationEntry, add_for_job

JOB_ACTIVE_STATES = ("queued", "processing")


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

    def claim(self, owner: str, lease_seconds: float, limit: int = 1, max_attempts: int = 3) -> list[ClaimedJob]:
        """Claim up to ``limit`` jobs, most urgent first, then oldest.

        A job whose previous holders died ``max_attempts`` times is failed instead of claimed again.
        """
        claimed: list[ClaimedJob] = []
        now = utcnow()
        expires = now + timedelta(seconds=lease_seconds)
        with self.db.session() as session:
            query = (
                select(Job.id, Job.attempts, Job.state)
                .where(self._claimable(now))
                .order_by(Job.priority.desc(), Job.created_at, Job.id)
                .limit(limit * 4)
            )
            if self._postgres:
                query = query.with_for_update(skip_locked=True)
            candidates = session.execute(query).all()
            for job_id, attempts, _state in candidates:
                if len(claimed) >= limit:
                    break
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
                    .where(Job.id == job_id, self._claimable(now))
                    .values(
                        state="processing",
                        lease_owner=owner,
                        lease_expires_at=expires,
                        attempts=Job.attempts + 1,
                        started_at=now,
                    )
                )
                if result.rowcount != 1:
                    continue  # somebody else won it
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
    ) -> bool:
        """Record a job's outcome, its per-image results, its outbox rows and its notifications in one transaction.

        Returns False (and records nothing) if the lease was lost meanwhile: another worker owns the job.
        ``priority`` and ``priority_reason`` are the study's priority as triage decided it
        (node/pipeline/triage.Triage); they are stored on the study and given to the outbox rows and
        notifications as they are, never computed here. Notifications are queued once per
        (job, channel, target), so a study is never announced twice for one result revision.
        """
        now = utcnow()
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is None or job.lease_owner != owner or job.state != "processing":
                return False
            job.state = state
            job.finished_at = now
            job.lease_owner = None
            job.last_error = reason if state == "failed" else None
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
