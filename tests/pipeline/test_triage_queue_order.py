"""Priority orders the work: jobs, outbox rows and notifications are claimed most urgent first, then oldest;
concurrent notifiers never claim one notification twice (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from storage.db import Database, utcnow
from storage.migrate import upgrade
from storage.models import OutboxItem, Study
from storage.notifications import NotificationEntry, Notifications, add_for_job
from storage.outbox import Outbox
from storage.queue import JobQueue
from tests.helpers.components import run_threads


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/q.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def open_database(url: str) -> Database:
    upgrade(url)
    return Database(url)


def add_studies(database: Database, count: int) -> list[int]:
    now = utcnow()
    with database.session() as session:
        studies = [Study(study_instance_uid=f"1.2.3.{i}", first_received_at=now, last_received_at=now, revision=1)
                   for i in range(count)]
        session.add_all(studies)
        session.flush()
        return [study.id for study in studies]


def test_jobs_are_claimed_by_priority_then_age(database_url: str) -> None:
    database = open_database(database_url)
    queue = JobQueue(database)
    ids = add_studies(database, 4)
    routine_old = queue.enqueue(ids[0], 1, 0)
    routine_new = queue.enqueue(ids[1], 1, 0)
    high = queue.enqueue(ids[2], 1, 1)
    urgent = queue.enqueue(ids[3], 1, 2)
    order = [queue.claim("w", 30, limit=1)[0].id for _ in range(4)]
    assert order == [urgent, high, routine_old, routine_new]
    database.dispose()


def test_outbox_rows_and_notifications_are_claimed_by_priority_then_age(database_url: str) -> None:
    database = open_database(database_url)
    ids = add_studies(database, 1)
    queue = JobQueue(database)
    job = queue.enqueue(ids[0], 1, 0)
    start = utcnow() - timedelta(minutes=5)
    with database.session() as session:
        for index, priority in enumerate([0, 0, 2, 1]):
            session.add(OutboxItem(job_id=job, study_instance_uid="1.2.3.0", sop_instance_uid=f"9.{index}",
                                   sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", kind="SR", path=f"r{index}.dcm",
                                   destination="pacs", state="pending", priority=priority, attempts=0,
                                   next_attempt_at=start, created_at=start + timedelta(seconds=index)))
        for index, priority in enumerate([0, 2, 1]):
            add_for_job(session, 100 + index, ids[0], "1.2.3.0", priority,
                        [NotificationEntry("webhook", "http://127.0.0.1:9/", {"n": index})],
                        start + timedelta(seconds=index))
    claimed = [item.sop_instance_uid for item in Outbox(database).claim("s", 30, "pacs", limit=10)]
    assert claimed == ["9.2", "9.3", "9.0", "9.1"]
    notes = [row.payload["n"] for row in Notifications(database).claim("n", 30, limit=10)]
    assert notes == [1, 2, 0]
    database.dispose()


def test_concurrent_notifiers_never_claim_one_notification_twice(database_url: str) -> None:
    database = open_database(database_url)
    ids = add_studies(database, 1)
    with database.session() as session:
        for job in range(24):
            add_for_job(session, job, ids[0], "1.2.3.0", 2, [NotificationEntry("smtp", "a@example.org", {"n": job})],
                        utcnow())
    claimed: list[int] = []
    lock = threading.Lock()

    def drain(owner: str) -> None:
        store = Notifications(database)
        while rows := store.claim(owner, 30, limit=3):
            with lock:
                claimed.extend(row.id for row in rows)

    run_threads([lambda i=i: drain(f"n{i}") for i in range(4)], timeout=60)  # all finished, none raised
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 24
    database.dispose()
