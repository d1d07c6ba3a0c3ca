"""Retention deletes finished, delivered studies only — never undelivered work."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select, update

from storage.db import Database
from storage.intake import InstanceRecord, IntakeRepository
from storage.migrate import upgrade
from storage.models import OutboxItem, Study
from storage.queue import JobQueue, OutboxEntry
from storage.retention import Retention
from storage.spool import Spool


@pytest.fixture()
def env(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/r.db"
    upgrade(url)
    database = Database(url)
    yield database, Spool(tmp_path / "spool", fsync=False)
    database.dispose()


def finished_study(database: Database, spool: Spool, n: int, delivered: bool) -> str:
    index, queue = IntakeRepository(database), JobQueue(database)
    study = f"1.2.3.{n}"
    incoming = spool.incoming / f"rx{n}"
    incoming.write_bytes(b"dicom" * n)
    stored = spool.commit_file(incoming, study, study + ".1", study + ".1.1")
    assoc = index.association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
    index.index_instance(
        InstanceRecord(study, study + ".1", study + ".1.1", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1",
                       None, None, "CR", None, None, None, stored.relative_path, stored.size, stored.sha256, "PACS", assoc)
    )
    index.association_ended(assoc, "released", 1)
    with database.session() as session:
        row = session.scalar(select(Study).where(Study.study_instance_uid == study))
        study_id, revision = row.id, row.revision
    queue.enqueue(study_id, revision, 0)
    [job] = queue.claim("w", 60)
    result_path = spool.write_result(study, "2.25.1", f"2.25.{n}", b"sr")
    queue.record_results(job.id, "w", "done", [], [OutboxEntry(f"2.25.{n}", "1.2.840.10008.5.1.4.1.1.88.34", "SR", result_path, "pacs")],
                         priority=job.priority, priority_reason="peer default")
    with database.session() as session:
        session.execute(update(OutboxItem).where(OutboxItem.study_instance_uid == study)
                        .values(state="delivered" if delivered else "dead"))
        session.execute(update(Study).where(Study.id == study_id)
                        .values(last_received_at=datetime.now(timezone.utc) - timedelta(days=30)))
    return study


def test_old_delivered_studies_are_purged_and_undelivered_kept(env) -> None:
    database, spool = env
    delivered = finished_study(database, spool, 1, delivered=True)
    dead = finished_study(database, spool, 2, delivered=False)
    purged = Retention(database, spool).run(days=7, has_room=lambda: True)
    assert purged == 1
    with database.session() as session:
        remaining = set(session.scalars(select(Study.study_instance_uid)))
    assert remaining == {dead}
    assert not (spool.root / delivered).exists() or not any((spool.root / delivered).rglob("*.dcm"))
    assert any((spool.root / dead).rglob("*.dcm"))


def test_emergency_cleanup_stops_at_undelivered_work(env) -> None:
    database, spool = env
    finished_study(database, spool, 1, delivered=True)
    dead = finished_study(database, spool, 2, delivered=False)
    purged = Retention(database, spool).run(days=365, has_room=lambda: False)
    assert purged == 1
    with database.session() as session:
        assert set(session.scalars(select(Study.study_instance_uid))) == {dead}


def test_old_study_of_non_image_objects_only_is_purged(env) -> None:
    """A study that never gets a job (echoed results or non-image objects only: status "stored", #14.1) still
    falls under retention."""
    database, spool = env
    index = IntakeRepository(database)
    study = "1.2.3.99"
    incoming = spool.incoming / "rx-sr"
    incoming.write_bytes(b"sr")
    stored = spool.commit_file(incoming, study, study + ".1", study + ".1.1")
    assoc = index.association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
    index.index_instance(
        InstanceRecord(study, study + ".1", study + ".1.1", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.1.2.1",
                       None, None, "SR", None, None, None, stored.relative_path, stored.size, stored.sha256, "PACS",
                       assoc, "own_result", "our own result"))
    index.association_ended(assoc, "released", 1)
    with database.session() as session:
        assert session.scalar(select(Study.status).where(Study.study_instance_uid == study)) == "stored"
        session.execute(update(Study).values(last_received_at=datetime.now(timezone.utc) - timedelta(days=30)))
    assert Retention(database, spool).run(days=7, has_room=lambda: True) == 1
    with database.session() as session:
        assert session.scalar(select(Study).where(Study.study_instance_uid == study)) is None
