"""The intake repository: index received instances and keep the association audit log.

Called by the receiver (which speaks DIMSE) so that the receiver itself never touches SQL. Reading the
studies back (``msknode studies``, the dashboard) is storage/studies.py.
"""

from __future__ import annotations

import enum
import threading
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.counters import increment
from storage.db import Database, utcnow
from storage.group_commit import GroupCommitter
from storage.models import Association, Instance, InstanceReplacement, Series, Study


@dataclass(frozen=True)
class InstanceRecord:
    """What the receiver learnt about one stored instance (header only; pixels never decoded)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    accession_number: str | None
    study_date: str | None
    modality: str | None
    body_part_examined: str | None
    series_number: int | None
    instance_number: int | None
    spool_path: str
    size_bytes: int
    sha256: str
    calling_ae_title: str
    association_id: str
    # What the receiver decided from the header (node/dicom/provenance.py); only "image" starts a new study
    # revision: our own results echoed back, other AI results and non-image objects are stored, never analysed.
    intake_kind: str = "image"
    intake_reason: str | None = None

    @property
    def starts_revision(self) -> bool:
        return self.intake_kind == "image"


class IndexOutcome(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"  # identical bytes already indexed
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: the newer copy is kept


@dataclass(frozen=True)
class IndexResult:
    outcome: IndexOutcome
    previous_spool_path: str | None = None  # for REPLACED: the file the caller may now delete


def _count_instances(session: Session, records: Sequence[InstanceRecord], results: Sequence[IndexResult]) -> None:
    """/metrics counters, in the transaction that indexes the instances (one upsert per outcome)."""
    for outcome in IndexOutcome:
        count = sum(1 for result in results if result.outcome is outcome)
        if count:
            increment(session, "instances_received", {"outcome": outcome.value}, count)
    increment(session, "received_bytes", None, sum(record.size_bytes for record in records))


# The instances columns copied as they are from the receiver's record.
_INSTANCE_COLUMNS_FROM_RECORD = (
    "sop_class_uid", "transfer_syntax_uid", "study_instance_uid", "accession_number", "modality",
    "body_part_examined", "instance_number", "spool_path", "size_bytes", "sha256", "calling_ae_title",
    "association_id", "intake_kind", "intake_reason",
)

# The tables behind the ORM classes, for the intake path's Core statements.
_STUDIES, _SERIES, _INSTANCES, _REPLACEMENTS = (
    Study.__table__, Series.__table__, Instance.__table__, InstanceReplacement.__table__,
)


class _Intake:
    """The intake path's statements, built once so that SQLAlchemy compiles and cache-keys each only once.

    Statements executed with a parameter dict SET (or INSERT) the columns the dict names; ``uid`` and ``key``
    are the WHERE clause's parameters.
    """

    # The study, series and instance rows an instance may already have, in one statement (one row, NULLs for
    # what does not exist yet): every C-STORE runs it while its sender waits.
    _one_row = select(literal(1).label("one")).subquery("one_row")
    select_existing = select(
        _STUDIES.c.id.label("study_id"), _STUDIES.c.accession_number.label("study_accession_number"),
        _SERIES.c.id.label("series_id"),
        _INSTANCES.c.id.label("instance_id"), _INSTANCES.c.sha256.label("instance_sha256"),
        _INSTANCES.c.spool_path.label("instance_spool_path"), _INSTANCES.c.series_id.label("instance_series_id"),
    ).select_from(
        _one_row
        .outerjoin(_STUDIES, _STUDIES.c.study_instance_uid == bindparam("study_uid"))
        .outerjoin(_SERIES, _SERIES.c.series_instance_uid == bindparam("series_uid"))
        .outerjoin(_INSTANCES, _INSTANCES.c.sop_instance_uid == bindparam("sop_uid"))
    )
    insert_study = insert(_STUDIES).returning(_STUDIES.c.id)
    insert_series = insert(_SERIES).returning(_SERIES.c.id)
    insert_instance = insert(_INSTANCES)
    touch_study = update(_STUDIES).where(_STUDIES.c.id == bindparam("key"))
    revise_study = update(_STUDIES).where(_STUDIES.c.id == bindparam("key")).values(
        revision=func.coalesce(_STUDIES.c.revision, 0) + 1, status="received", status_reason=None)
    replace_instance = update(_INSTANCES).where(_INSTANCES.c.id == bindparam("key")).values(
        replaced_count=func.coalesce(_INSTANCES.c.replaced_count, 0) + 1)


class IntakeRepository:
    """Intake's view of the database: the association audit and the instances' rows (the receiver's only way in)."""

    def __init__(self, database: Database) -> None:
        self.db = database
        # The receiver's association threads write through one IntakeRepository. SQLite has one writer at a time and its
        # busy handler makes a waiting connection sleep in steps of up to 100 ms: with eight concurrent
        # senders that gave C-STORE responses a multi-second tail (benchmarks/load.py). The threads queue on
        # this lock instead, so only other processes' writes meet the busy handler. PostgreSQL locks rows.
        self._sqlite_writer: AbstractContextManager[object] = threading.Lock() if database.engine.dialect.name == "sqlite" else nullcontext()
        self._committer = GroupCommitter(self._index_batch, name="msknode-index-writer")

    # -- associations ------------------------------------------------------------------------
    def association_requested(
        self,
        calling_ae_title: str,
        called_ae_title: str,
        peer_address: str,
        peer_port: int | None,
        peer_name: str | None,
        reject_reason: str | None,
    ) -> str:
        """Record an association request; rejected ones are closed immediately."""
        association_id = str(uuid.uuid4())
        now = utcnow()
        with self._sqlite_writer, self.db.session() as session:
            session.add(
                Association(
                    id=association_id,
                    calling_ae_title=calling_ae_title[:16],
                    called_ae_title=called_ae_title[:16],
                    peer_address=peer_address,
                    peer_port=peer_port,
                    peer_name=peer_name,
                    started_at=now,
                    ended_at=now if reject_reason else None,
                    outcome="rejected" if reject_reason else "open",
                    reject_reason=reject_reason,
                )
            )
            increment(session, "associations", {"outcome": "rejected" if reject_reason else "accepted",
                                                "reason": reject_reason or ""})
        return association_id

    def association_ended(self, association_id: str, outcome: str, instance_count: int) -> None:
        with self._sqlite_writer, self.db.session() as session:
            session.execute(
                update(Association)
                .where(Association.id == association_id, Association.outcome == "open")
                .values(outcome=outcome, ended_at=utcnow(), instance_count=instance_count)
            )

    def association_rejected(self, association_id: str, reason: str) -> None:
        """An association our policy accepted and pynetdicom then rejected in negotiation."""
        with self._sqlite_writer, self.db.session() as session:
            session.execute(
                update(Association)
                .where(Association.id == association_id, Association.outcome == "open")
                .values(outcome="rejected", ended_at=utcnow(), reject_reason=reason[:64])
            )

    def close_interrupted_associations(self) -> int:
        """At start-up: associations still 'open' belonged to a process that died."""
        with self.db.session() as session:
            result = session.execute(
                update(Association)
                .where(Association.outcome == "open")
                .values(outcome="interrupted", ended_at=utcnow())
            )
            return result.rowcount or 0

    # -- instances ---------------------------------------------------------------------------
    def start_writer(self) -> None:
        """Start the group-commit writer thread (the receiver does, when it starts listening)."""
        self._committer.start()

    def index_instance(self, record: InstanceRecord) -> IndexResult:
        """Insert or update the instance row (and its study/series); returns once that is committed.

        The row is written by the group committer together with whatever other associations queued
        meanwhile, so the caller's success status still follows its own durable commit.
        """
        return self._committer.submit(record)

    def _index_batch(self, records: Sequence[InstanceRecord]) -> list[IndexResult | BaseException]:
        """Index ``records`` in one transaction (one fsync for all); if that fails, each on its own."""
        try:
            with self._sqlite_writer, self.db.session() as session:
                now = utcnow()
                results = [self._apply(session, record, now) for record in records]
                _count_instances(session, records, results)
            return list(results)
        except Exception as exc:  # noqa: BLE001 - one bad record must not fail the others
            if len(records) == 1 and not isinstance(exc, IntegrityError):
                return [exc]
        return [self._index_alone(record) for record in records]

    def _index_alone(self, record: InstanceRecord) -> IndexResult | BaseException:
        for attempt in range(3):
            try:
                with self._sqlite_writer, self.db.session() as session:
                    result = self._apply(session, record, utcnow())
                    _count_instances(session, [record], [result])
                return result
            except IntegrityError as exc:
                # Another process inserted the same study/series/instance concurrently; retry so this
                # transaction sees its rows.
                if attempt == 2:
                    return exc
            except Exception as exc:  # noqa: BLE001 - handed to the waiting receiver thread
                return exc
        raise AssertionError("unreachable")

    @staticmethod
    def _apply(session: Session, record: InstanceRecord, now: datetime) -> IndexResult:
        """Index one instance inside the caller's transaction.

        Core statements built once (``_Intake``), not ORM objects or statements built per call: this runs for
        every C-STORE while the sender waits, and building and cache-keying a statement per call cost the
        receiver more CPU than SQLite's own work (py-spy under benchmarks/load.py).
        """
        connection = session.connection()
        found = connection.execute(_Intake.select_existing, {
            "study_uid": record.study_instance_uid, "series_uid": record.series_instance_uid,
            "sop_uid": record.sop_instance_uid,
        }).one()
        if found.study_id is None:
            study_id = connection.execute(_Intake.insert_study, {
                "study_instance_uid": record.study_instance_uid,
                "accession_number": record.accession_number,
                "study_date": record.study_date,
                "first_received_at": now,
                "last_received_at": now,
                # A study that holds no image (yet) has nothing to analyse and gets no job.
                "status": "received" if record.starts_revision else "stored",
                "status_reason": None if record.starts_revision else "no image instances: nothing to analyse",
            }).scalar_one()
            accession_missing = False
        else:
            study_id = found.study_id
            accession_missing = bool(record.accession_number) and not found.study_accession_number

        series_id = found.series_id
        if series_id is None:
            series_id = connection.execute(_Intake.insert_series, {
                "study_id": study_id,
                "series_instance_uid": record.series_instance_uid,
                "modality": record.modality,
                "body_part_examined": record.body_part_examined,
                "series_number": record.series_number,
            }).scalar_one()

        study_changes: dict[str, Any] = {"key": study_id, "last_received_at": now}
        if accession_missing:
            study_changes["accession_number"] = record.accession_number
        if found.instance_id is not None and found.instance_sha256 == record.sha256:
            connection.execute(_Intake.touch_study, study_changes)
            return IndexResult(IndexOutcome.DUPLICATE)

        if record.starts_revision:
            # New content for this study: a (re)processing is due once the study settles again.
            connection.execute(_Intake.revise_study, study_changes)
        else:
            # Our own results echoed back, another AI's results, non-image objects: stored, never a new revision.
            connection.execute(_Intake.touch_study, study_changes)
        values = {name: getattr(record, name) for name in _INSTANCE_COLUMNS_FROM_RECORD}
        values.update(series_id=series_id, received_at=now)
        if found.instance_id is None:
            connection.execute(_Intake.insert_instance, {"sop_instance_uid": record.sop_instance_uid,
                                                         "replaced_count": 0, **values})
            return IndexResult(IndexOutcome.NEW)

        old_series_uid = connection.scalar(
            select(_SERIES.c.series_instance_uid).where(_SERIES.c.id == found.instance_series_id)
        )
        connection.execute(
            insert(_REPLACEMENTS).values(
                sop_instance_uid=record.sop_instance_uid,
                study_instance_uid=record.study_instance_uid,
                old_sha256=found.instance_sha256,
                new_sha256=record.sha256,
                old_series_instance_uid=old_series_uid or "",
                replaced_at=now,
                association_id=record.association_id,
            )
        )
        connection.execute(_Intake.replace_instance, {"key": found.instance_id, **values})
        return IndexResult(IndexOutcome.REPLACED, previous_spool_path=found.instance_spool_path)
