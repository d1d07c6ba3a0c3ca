"""Notification payloads and the association audit fall under retention too (issue #14, item 6): a payload may
carry PHI (``include_phi``), an audit row names who sent what and when. Rows older than ``retention.days``
go, except what is still needed: a notification not yet sent or given up, an association an instance still
refers to, one still open."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from node.pipeline.scheduler import Scheduler
from node.settings import parse_settings
from storage.db import Database, utcnow
from storage.intake import InstanceRecord, IntakeRepository
from storage.migrate import upgrade
from storage.models import Association, InstanceReplacement, Notification
from storage.notifications import NotificationEntry, add_for_job
from storage.retention import Retention
from storage.spool import Spool


@pytest.fixture()
def env(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/r.db"
    upgrade(url)
    database = Database(url)
    yield url, database, Spool(tmp_path / "spool", fsync=False)
    database.dispose()


def age(database: Database, model, column, row_id, days: float) -> None:  # type: ignore[no-untyped-def]
    with database.session() as session:
        session.execute(update(model).where(model.id == row_id).values({column: utcnow() - timedelta(days=days)}))


def notification(database: Database, job_id: int, state: str, days_old: float) -> int:
    with database.session() as session:
        add_for_job(session, job_id, None, "1.2.3", 2,  # type: ignore[arg-type]
                    [NotificationEntry("webhook", "http://h/x", {"patient_name": "Doe^Jane"})], utcnow())
    with database.session() as session:
        row_id = session.scalar(select(Notification.id).where(Notification.job_id == job_id))
        session.execute(update(Notification).where(Notification.id == row_id).values(state=state))
    age(database, Notification, "created_at", row_id, days_old)
    return row_id


def association(index: IntakeRepository, database: Database, outcome: str | None, days_old: float) -> str:
    row_id = index.association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
    if outcome:
        index.association_ended(row_id, outcome, 0)
    age(database, Association, "started_at", row_id, days_old)
    return row_id


def populate(database: Database, spool: Spool) -> dict[str, object]:
    index = IntakeRepository(database)
    ids: dict[str, object] = {
        "sent_old": notification(database, 1, "sent", 30), "dead_old": notification(database, 2, "dead", 30),
        "discarded_old": notification(database, 3, "discarded", 30),
        "pending_old": notification(database, 4, "pending", 30), "sent_new": notification(database, 5, "sent", 1),
        "assoc_old": association(index, database, "released", 30),
        "assoc_rejected_old": association(index, database, None, 30),
        "assoc_open_old": association(index, database, None, 30),
        "assoc_new": association(index, database, "released", 1),
        "assoc_with_instance": association(index, database, "released", 30),
    }
    with database.session() as session:  # association_requested without a reason leaves it open: reject one
        session.execute(update(Association).where(Association.id == ids["assoc_rejected_old"])
                        .values(outcome="rejected", reject_reason="calling-ae-not-recognised"))
    incoming = spool.incoming / "rx"
    incoming.write_bytes(b"dicom")
    stored = spool.commit_file(incoming, "1.2.3", "1.2.3.1", "1.2.3.1.1")
    index.index_instance(InstanceRecord("1.2.3", "1.2.3.1", "1.2.3.1.1", "1.2.840.10008.5.1.4.1.1.1",
                                        "1.2.840.10008.1.2.1", None, None, "CR", None, None, None,
                                        stored.relative_path, stored.size, stored.sha256, "PACS",
                                        str(ids["assoc_with_instance"])))
    with database.session() as session:
        session.add(InstanceReplacement(sop_instance_uid="1.2.3.1.1", study_instance_uid="1.2.3", old_sha256="a",
                                        new_sha256="b", old_series_instance_uid="1.2.3.1",
                                        replaced_at=utcnow() - timedelta(days=30), association_id="x"))
    return ids


def remaining(database: Database) -> tuple[set[int], set[str], int]:
    with database.session() as session:
        return (set(session.scalars(select(Notification.id))), set(session.scalars(select(Association.id))),
                len(list(session.scalars(select(InstanceReplacement.id)))))


def test_old_payloads_and_audit_rows_are_purged_and_what_is_needed_is_kept(env) -> None:
    _url, database, spool = env
    ids = populate(database, spool)
    purged = Retention(database, spool).purge_records(days=7)
    notifications, associations, replacements = remaining(database)
    assert notifications == {ids["pending_old"], ids["sent_new"]}
    assert associations == {ids["assoc_open_old"], ids["assoc_new"], ids["assoc_with_instance"]}
    assert replacements == 0
    assert purged == {"notifications": 3, "associations": 2, "instance_replacements": 1}


def test_the_scheduler_retention_pass_purges_them(env, tmp_path: Path) -> None:
    url, database, spool = env
    ids = populate(database, spool)
    settings = parse_settings({"storage": {"database_url": url, "spool_dir": str(tmp_path / "spool"),
                                           "min_free_disk_mb": 0}, "retention": {"days": 7}}, "<test>")
    Scheduler(settings, database, spool).retention()
    notifications, associations, _ = remaining(database)
    assert ids["sent_old"] not in notifications and ids["assoc_old"] not in associations
