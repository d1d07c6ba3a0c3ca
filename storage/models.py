"""SQLAlchemy 2 models: the index of received instances and the association audit log.

The database is shared by every role; it is the only place (with the spool) where they meet.
Changes to these models need an Alembic revision in ``storage/migrations/versions``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)  # PS3.5 9.1: a UID is at most 64 characters

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # received -> (Pipeline issue: waiting, queued, processing, done, not_analysed, failed)
    status: Mapped[str] = mapped_column(String(16), default="received")
    status_reason: Mapped[str | None] = mapped_column(Text)
    # Bumped by every new or replaced instance; a job processes one revision, so an instance arriving
    # after (or during) processing leads to a new job for the new revision.
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    queued_revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # 0 routine, 1 high, 2 urgent
    priority_reason: Mapped[str | None] = mapped_column(Text)  # the triage rule (or peer default) that set it

    series: Mapped[list["Series"]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list["Instance"]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    # Denormalised from the series/study so that queries by study need no joins on the hot path.
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    spool_path: Mapped[str] = mapped_column(Text)  # relative to the spool directory
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    association_id: Mapped[str] = mapped_column(String(36), ForeignKey("associations.id"), index=True)
    replaced_count: Mapped[int] = mapped_column(Integer, default=0)
    # What the receiver decided from the header (node/dicom/provenance.py): image, non_image, own_result,
    # ai_result; NULL on rows indexed before revision 0004 counts as image. Only images start a study revision;
    # the worker never reads own_result / ai_result rows. intake_reason says why (no PHI).
    intake_kind: Mapped[str | None] = mapped_column(String(16))
    intake_reason: Mapped[str | None] = mapped_column(Text)

    series: Mapped[Series] = relationship(back_populates="instances")


class InstanceReplacement(Base):
    """A SOP Instance UID received again with different bytes: the newer copy is kept."""

    __tablename__ = "instance_replacements"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    old_sha256: Mapped[str] = mapped_column(String(64))
    new_sha256: Mapped[str] = mapped_column(String(64))
    old_series_instance_uid: Mapped[str] = mapped_column(UID)
    replaced_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    association_id: Mapped[str] = mapped_column(String(36))


class Association(Base):
    """Audit of every association request, accepted or rejected."""

    __tablename__ = "associations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # uuid4
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    called_ae_title: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int | None] = mapped_column(Integer)
    peer_name: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # open, released, aborted, rejected, interrupted (process stopped while open)
    outcome: Mapped[str] = mapped_column(String(16), default="open")
    reject_reason: Mapped[str | None] = mapped_column(String(64))


class Job(Base):
    """One processing run of one study revision; the database is the queue (claimed with a lease)."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_revision: Mapped[int] = mapped_column(Integer)
    # queued, processing, done, not_analysed, failed, superseded
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    # MR studies: the series selection (node/pipeline/series_selection.SelectionReport.to_dict()), recorded in the
    # transaction that records the results, so a retried job stores the same report (migration 0005)
    series_selection: Mapped[dict | None] = mapped_column(JSON)


class ImageResultRow(Base):
    """One ``image_results`` row: what the worker made of one instance (frame) in one job: analysed (with
    outputs), ineligible or failed.

    (The result object the SR/SC builders take is node/results/model.ImageResult.)
    """

    __tablename__ = "image_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), index=True)
    frame_index: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16))  # analysed, ineligible, failed
    reason: Mapped[str | None] = mapped_column(Text)
    score: Mapped[float | None] = mapped_column(Float)
    outputs: Mapped[dict | None] = mapped_column(JSON)


class OutboxItem(Base):
    """One result object for one destination; delivered at most once, retried with backoff, or dead-lettered."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    kind: Mapped[str] = mapped_column(String(8))  # SR, SC, SEG
    path: Mapped[str] = mapped_column(Text)  # relative to the spool directory
    destination: Mapped[str] = mapped_column(String(64), index=True)  # peer name
    # pending, sending, delivered, dead, discarded
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)


class RoleHeartbeat(Base):
    """Each running role process reports here; `msknode status` and /healthz read it."""

    __tablename__ = "role_heartbeats"

    owner: Mapped[str] = mapped_column(String(128), primary_key=True)  # role@host:pid
    role: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    detail: Mapped[dict | None] = mapped_column(JSON)


Index("ix_studies_last_received_at", Study.last_received_at)
Index("ix_jobs_claim", Job.state, Job.priority, Job.created_at)
Index("ix_outbox_claim", OutboxItem.state, OutboxItem.next_attempt_at)


class Notification(Base):
    """One announcement of a study to one channel (a webhook URL or SMTP), delivered by the sender role.

    Written in the worker's result transaction, so a study is announced once per result revision even
    when a process dies in between; ``payload`` is the exact body, PHI-free unless configured otherwise.
    """

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="SET NULL"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    job_id: Mapped[int | None] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(16))  # webhook, smtp
    target: Mapped[str] = mapped_column(Text)  # URL, or comma-separated addresses
    priority: Mapped[int] = mapped_column(Integer, default=0)
    payload: Mapped[dict] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending, sent, dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)


class PeerOverride(Base):
    """Peers added, edited or removed from the CLI or the web: an overlay on the config file's ``[[peers]]``.

    Kept in the database so every role on every machine sees the same peers without a restart; a row with
    ``removed`` set hides a peer of the same name from the file.
    """

    __tablename__ = "peer_overrides"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    removed: Mapped[bool] = mapped_column(default=False)
    settings: Mapped[dict | None] = mapped_column(JSON)  # a PeerSettings as JSON, None when removed
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_by: Mapped[str | None] = mapped_column(String(64))


class User(Base):
    """A local dashboard user; ``password_hash`` is a salted scrypt hash, never the password."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16))  # admin, viewer
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebSession(Base):
    """A dashboard login; the cookie holds a random token whose SHA-256 is ``token_hash``."""

    __tablename__ = "web_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class Counter(Base):
    """Monotonic event counters for /metrics that survive retention (rows of instances are deleted).

    Incremented in the same transaction as the event; ``labels`` is a canonical ``k=v,k=v`` string.
    """

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    labels: Mapped[str] = mapped_column(String(200), primary_key=True, default="")
    value: Mapped[float] = mapped_column(Float, default=0.0)


Index("ix_notifications_claim", Notification.state, Notification.next_attempt_at)
