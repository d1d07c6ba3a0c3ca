"""Cost of observability: a /metrics scrape, a /healthz check and `msknode status` on a busy database, and
what the /metrics counters add to indexing each received instance.

A SQLite database (WAL, synchronous=FULL, as the node runs it) is filled with --rows outbox rows and jobs in
mixed states; each read is timed --repeat times (median and max printed). Intake: --instances calls of
storage.intake.IntakeRepository.index_instance (which upserts two counters in its transaction) against the same number
of the two upserts' statements inside one transaction (their own cost, without a commit).

    .venv/bin/python benchmarks/observability.py [--rows 100000] [--instances 500] [--repeat 20]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.runtime.health import check_health  # noqa: E402
from node.runtime.metrics import render_metrics  # noqa: E402
from node.settings import Settings  # noqa: E402
from node.runtime.status import collect_status  # noqa: E402
from storage.counters import increment  # noqa: E402
from storage.db import Database, utcnow  # noqa: E402
from storage.intake import InstanceRecord, IntakeRepository  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.models import Job, OutboxItem, Study  # noqa: E402


def fill(database: Database, rows: int) -> None:
    now = utcnow()
    with database.session() as session:
        study = Study(study_instance_uid="1.2.3", first_received_at=now, last_received_at=now)
        session.add(study)
        session.flush()
        states = ("done", "done", "done", "queued", "failed")
        session.add_all(Job(study_id=study.id, study_revision=1, state=states[i % 5], created_at=now)
                        for i in range(rows // 10))
        session.flush()
        job_id = session.query(Job.id).first()[0]
        outbox_states = ("delivered",) * 8 + ("pending", "dead")
        session.add_all(
            OutboxItem(job_id=job_id, study_instance_uid="1.2.3", sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2",
                       kind="SR", path="x", destination=f"pacs{i % 3}", state=outbox_states[i % 10],
                       next_attempt_at=now, created_at=now - timedelta(seconds=i))
            for i in range(rows)
        )


def timed(function, repeat: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), max(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="msknode-obs-"))
    url = f"sqlite:///{directory / 'node.db'}"
    upgrade(url)
    database = Database(url)
    (directory / "spool").mkdir()
    settings = Settings(storage={"database_url": url, "spool_dir": str(directory / "spool"), "min_free_disk_mb": 0})
    fill(database, args.rows)
    print(f"python {platform.python_version()} on {platform.machine()}, SQLite, {args.rows} outbox rows, "
          f"{args.rows // 10} jobs")
    for name, function in (
        ("/metrics render", lambda: render_metrics(settings, database)),
        ("/healthz checks", lambda: check_health(settings, database)),
        ("status collect", lambda: collect_status(settings, database)),
    ):
        median, worst = timed(function, args.repeat)
        print(f"{name:18s} median {median:7.1f} ms   max {worst:7.1f} ms")

    index = IntakeRepository(database)
    association = index.association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
    started = time.perf_counter()
    for i in range(args.instances):
        index.index_instance(InstanceRecord(
            "1.2.4", "1.2.4.1", f"1.2.4.1.{i}", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1", None, None,
            "CR", "HAND", 1, i, f"p/{i}.dcm", 1000, f"{i:064d}", "PACS", association))
    per_instance = (time.perf_counter() - started) * 1000 / args.instances
    started = time.perf_counter()
    with database.session() as session:  # the statements alone: in index_instance they share its commit
        for _ in range(args.instances):
            increment(session, "instances_received", {"outcome": "new"})
            increment(session, "received_bytes", None, 1000)
    counters_only = (time.perf_counter() - started) * 1000 / args.instances
    print(f"index_instance (with its 2 counter upserts): {per_instance:.2f} ms per instance")
    print(f"the 2 counter upserts' statements alone:      {counters_only:.2f} ms per instance")
    database.dispose()


if __name__ == "__main__":
    main()
