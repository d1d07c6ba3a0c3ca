"""Study completion and the leased job queue, on the real (SQLite) database."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from storage import completion
from storage.db import Database
from storage.intake import InstanceRecord, IntakeRepository
from storage.models import Job, Study
from storage.queue import ImageOutcome, JobQueue, OutboxEntry
from tests.helpers.components import run_threads

STUDY = "1.2.826.0.1.3680043.10.1.1"


def receive(index: IntakeRepository, association_id: str, sop: str, study: str = STUDY, sha: str = "a") -> None:
    index.index_instance(
        InstanceRecord(
            study_instance_uid=study, series_instance_uid=study + ".1", sop_instance_uid=sop,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
            accession_number="ACC1", study_date=None, modality="CR", body_part_examined="HAND",
            series_number=1, instance_number=1, spool_path=f"{sop}.dcm", size_bytes=10, sha256=sha * 64,
            calling_ae_title="PACS", association_id=association_id,
        )
    )


def open_association(index: IntakeRepository) -> str:
    return index.association_requested("PACS", "MSKNODE", "127.0.0.1", 1234, "pacs", None)


def decide(db: Database, seconds_later: float, settle: float = 10, force: float = 600):
    now = datetime.now(timezone.utc) + timedelta(seconds=seconds_later)
    return completion.evaluate(db, now, lambda _ae: settle, force)


def test_released_and_quiet_study_completes(db: Database) -> None:
    index = IntakeRepository(db)
    assoc = open_association(index)
    receive(index, assoc, STUDY + ".1.1")
    assert decide(db, 60)[0].waiting_reason == "association still open"
    index.association_ended(assoc, "released", 1)
    assert not decide(db, 2)[0].complete  # still settling
    decision = decide(db, 11)[0]
    assert decision.complete and not decision.forced


def test_aborted_association_does_not_complete_until_forced(db: Database) -> None:
    index = IntakeRepository(db)
    assoc = open_association(index)
    receive(index, assoc, STUDY + ".1.1")
    index.association_ended(assoc, "aborted", 1)
    waiting = decide(db, 60)[0]
    assert not waiting.complete and "aborted" in (waiting.waiting_reason or "")
    forced = decide(db, 601)[0]
    assert forced.complete and forced.forced


def test_late_instance_requeues_a_processed_study(db: Database) -> None:
    index, queue = IntakeRepository(db), JobQueue(db)
    assoc = open_association(index)
    receive(index, assoc, STUDY + ".1.1")
    index.association_ended(assoc, "released", 1)
    completion.tick(db, queue, lambda _ae: 0, 600)
    [job] = queue.claim("w1", lease_seconds=60)
    assert queue.record_results(job.id, "w1", "done", [], [], priority=job.priority, priority_reason="peer default")
    assert decide(db, 60) == []  # nothing new
    late = open_association(index)
    receive(index, late, STUDY + ".1.2")
    index.association_ended(late, "released", 1)
    completion.tick(db, queue, lambda _ae: 0, 600)
    [again] = queue.claim("w1", lease_seconds=60)
    assert again.study_revision == 2


def make_study(db: Database, index: IntakeRepository, queue: JobQueue, n: int, priority: int) -> int:
    study = f"{STUDY}.{n}"
    assoc = open_association(index)
    receive(index, assoc, study + ".1", study=study)
    index.association_ended(assoc, "released", 1)
    with db.session() as session:
        row = session.scalar(select(Study).where(Study.study_instance_uid == study))
        study_id, revision = row.id, row.revision
    return queue.enqueue(study_id, revision, priority)


def test_urgent_is_claimed_before_older_routine_work(db: Database) -> None:
    index, queue = IntakeRepository(db), JobQueue(db)
    routine = [make_study(db, index, queue, n, 0) for n in range(5)]
    urgent = make_study(db, index, queue, 99, 2)
    claimed = queue.claim("w1", lease_seconds=60, limit=2)
    assert [job.id for job in claimed] == [urgent, routine[0]]


def test_expired_lease_is_reclaimed_and_attempts_are_bounded(db: Database) -> None:
    index, queue = IntakeRepository(db), JobQueue(db)
    job_id = make_study(db, index, queue, 1, 0)
    for attempt in range(1, 4):
        [job] = queue.claim(f"w{attempt}", lease_seconds=-1, max_attempts=3)  # lease already expired
        assert job.id == job_id and job.attempts == attempt
    assert queue.claim("w4", lease_seconds=60, max_attempts=3) == []
    with db.session() as session:
        job_row = session.get(Job, job_id)
        assert job_row.state == "failed" and "abandoned" in job_row.last_error
        assert session.get(Study, job_row.study_id).status == "failed"


def test_a_worker_that_lost_its_lease_cannot_finish(db: Database) -> None:
    index, queue = IntakeRepository(db), JobQueue(db)
    make_study(db, index, queue, 1, 0)
    [job] = queue.claim("old", lease_seconds=-1)
    [same] = queue.claim("new", lease_seconds=60)
    assert same.id == job.id
    assert queue.heartbeat("old", [job.id], 60) == [job.id]
    entry = OutboxEntry("1.2.3.4", "1.2.840.10008.5.1.4.1.1.88.34", "SR", "out/sr.dcm", "pacs")
    images = [ImageOutcome(1, "analysed", score=0.1)]
    assert not queue.record_results(job.id, "old", "done", images, [entry], priority=0, priority_reason="peer default")
    assert queue.record_results(job.id, "new", "done", images, [entry], priority=0, priority_reason="peer default")


def test_concurrent_workers_never_claim_the_same_job(db: Database) -> None:
    import threading

    index, queue = IntakeRepository(db), JobQueue(db)
    jobs = {make_study(db, index, queue, n, 0) for n in range(24)}
    claimed: list[int] = []
    lock = threading.Lock()

    def work(owner: str) -> None:
        own = JobQueue(db)
        while True:
            got = own.claim(owner, lease_seconds=60, limit=2)
            if not got:
                return
            with lock:
                claimed.extend(job.id for job in got)

    run_threads([lambda i=i: work(f"w{i}") for i in range(4)], timeout=60)  # all finished, none raised
    assert sorted(claimed) == sorted(jobs)  # every job once, none twice


def test_per_peer_settle_override() -> None:
    from node.settings import parse_settings

    settings = parse_settings({
        "pipeline": {"settle_seconds": 10},
        "peers": [{"name": "slow", "ae_title": "SLOWPACS", "host": "127.0.0.1", "settle_seconds": 60},
                  {"name": "fast", "ae_title": "FAST", "host": "127.0.0.1"}],
    })
    assert settings.settle_seconds_for("SLOWPACS") == 60
    assert settings.settle_seconds_for("FAST") == 10
    assert settings.settle_seconds_for("UNKNOWN") == 10
