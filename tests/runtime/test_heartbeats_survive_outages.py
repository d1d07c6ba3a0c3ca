"""Heartbeats survive a real database outage (issue #14, item 4).

The worker's lease-renewal loop and every role's :class:`~node.runtime.status.HeartbeatThread` keep beating
through a PostgreSQL outage (the database refuses connections and its sessions are terminated, as in a
failover or a restart), report it (the role's heartbeat ``detail``, which ``msknode status`` shows, and the
``msknode_heartbeat_failures_total`` counter on ``/metrics``), and renew the lease once the database is back.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from storage.counters import Counters
from storage.db import Database, as_utc
from storage.migrate import upgrade
from storage.models import Job, Study
from storage.queue import JobQueue
from storage.status import Heartbeats

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg(postgres_url: str) -> Iterator[Database]:
    upgrade(postgres_url)
    database = Database(postgres_url)
    yield database
    database.dispose()


@contextmanager
def database_down(database: Database) -> Iterator[None]:
    """The database refuses new connections and every open session is terminated, until the block ends."""
    url = make_url(database.url)
    admin = f"host={url.host} port={url.port} user={url.username} dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS false')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (url.database,))
    try:
        yield
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS true')


def wait_until(condition, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def processing_job(database: Database, queue: JobQueue, owner: str, lease: float) -> int:
    now = datetime.now(timezone.utc)
    with database.session() as session:
        study = Study(study_instance_uid="1.2.3.4", first_received_at=now, last_received_at=now, status="queued")
        session.add(study)
        session.flush()
        session.add(Job(study_id=study.id, study_revision=1, state="queued", priority=0, attempts=0, created_at=now))
    [job] = queue.claim(owner, lease, limit=1)
    return job.id


def lease_expiry(database: Database, job_id: int) -> datetime:
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.lease_expires_at is not None
        return as_utc(job.lease_expires_at)


def heartbeat_failures(database: Database, role: str, kind: str) -> float:
    return sum(value for name, labels, value in Counters(database).all()
               if name == "heartbeat_failures" and labels == {"role": role, "kind": kind})


def test_worker_lease_renewal_survives_a_database_outage_and_renews_after_it(pg: Database, tmp_path) -> None:
    import engines
    from node.pipeline.worker import Worker
    from node.settings import parse_settings
    from tests.helpers.models import tiny_model

    lease = 4.5  # the loop renews every lease / 3 = 1.5 s
    settings = parse_settings({"pipeline": {"lease_seconds": lease}}, resolve_hosts=False)
    queue = JobQueue(pg)
    detail: dict = {}
    model = engines.load(tiny_model(tmp_path / "model", width=32, layers=1), backend="cpu")
    worker = Worker(settings, queue, None, None, model, owner="worker@test:1", counters=Counters(pg),  # type: ignore[arg-type]
                    detail=detail)
    job_id = processing_job(pg, queue, worker.owner, lease)
    worker._held = [job_id]  # as while the job is processing
    stop = threading.Event()
    loop = threading.Thread(target=worker._heartbeat_loop, args=(stop,), daemon=True)
    loop.start()
    try:
        before = lease_expiry(pg, job_id)
        assert wait_until(lambda: lease_expiry(pg, job_id) > before), "the lease is not renewed at all"
        with database_down(pg):
            assert wait_until(lambda: detail.get("lease_renewal", {}).get("failures", 0) >= 2, 10)
            assert detail["lease_renewal"]["last_error"]
            assert detail["lease_renewal"]["failing_since"]
        recovered = datetime.now(timezone.utc)
        assert loop.is_alive(), "the lease-renewal loop died on the database error"
        assert wait_until(lambda: lease_expiry(pg, job_id) > recovered), "the lease was not renewed after recovery"
        assert wait_until(lambda: detail["lease_renewal"]["failing_since"] is None)
        assert detail["lease_renewal"]["failures"] >= 2  # the total stays visible after recovery
        assert wait_until(lambda: heartbeat_failures(pg, "worker", "lease") >= 2)
        with pg.session() as session:
            job = session.get(Job, job_id)
            assert job is not None and (job.state, job.lease_owner) == ("processing", worker.owner)
    finally:
        stop.set()
        loop.join(10)


def test_role_heartbeat_thread_survives_a_database_outage_and_reports_it(pg: Database) -> None:
    from node.runtime.status import HeartbeatThread

    detail: dict = {"engine_loaded": True}
    thread = HeartbeatThread(pg, "sender", detail, interval=0.5).start()
    try:
        heartbeats = Heartbeats(pg)
        assert wait_until(lambda: any(row["owner"] == thread.owner for row in heartbeats.list()))
        with database_down(pg):
            assert wait_until(lambda: detail.get("heartbeat", {}).get("failures", 0) >= 2, 10)
        recovered = datetime.now(timezone.utc)

        def seen_after_recovery() -> bool:
            rows = [row for row in heartbeats.list() if row["owner"] == thread.owner]
            return bool(rows) and rows[0]["detail"].get("heartbeat", {}).get("failures", 0) >= 2 and \
                rows[0]["seen_seconds_ago"] < (datetime.now(timezone.utc) - recovered).total_seconds()

        assert thread._thread.is_alive()
        assert wait_until(seen_after_recovery), "no heartbeat (with the outage reported) after recovery"
        assert wait_until(lambda: heartbeat_failures(pg, "sender", "role") >= 2)
    finally:
        thread.stop()


def test_role_heartbeat_thread_survives_an_error_that_is_not_a_database_error(pg: Database) -> None:
    """A detail value the database cannot store (or any other bug) is logged and counted, never fatal."""
    from node.runtime.status import HeartbeatThread

    detail: dict = {"bad": object()}
    thread = HeartbeatThread(pg, "worker", detail, interval=0.3).start()
    try:
        assert wait_until(lambda: detail.get("heartbeat", {}).get("failures", 0) >= 2, 10)
        assert thread._thread.is_alive()
        del detail["bad"]
        assert wait_until(lambda: any(row["owner"] == thread.owner for row in Heartbeats(pg).list()))
    finally:
        thread.stop()
