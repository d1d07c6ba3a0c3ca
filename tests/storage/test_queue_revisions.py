"""Several workers and study revisions (issue #14, item 2), on SQLite and PostgreSQL (the ``db`` fixture).

A job for a study waits while another revision of that study is being processed; results of a revision older
than one that is processing or finished are refused (the job ends superseded with the reason, no outbox rows);
so there is only ever one current result per study.
"""

from __future__ import annotations

import threading

from sqlalchemy import select

from storage.db import Database
from storage.intake import IntakeRepository
from storage.models import Job, OutboxItem, Study
from storage.queue import ImageOutcome, JobQueue, OutboxEntry
from tests.storage.test_queue_completion import STUDY, open_association, receive

SR = "1.2.840.10008.5.1.4.1.1.88.34"


def new_revision(db: Database, index: IntakeRepository, queue: JobQueue, sop: str) -> int:
    """Receive one more instance of STUDY and queue a job for the new revision (as the scheduler would)."""
    assoc = open_association(index)
    receive(index, assoc, sop)
    index.association_ended(assoc, "released", 1)
    with db.session() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == STUDY))
        study_id, revision = study.id, study.revision
    return queue.enqueue(study_id, revision, 0)


def finish(queue: JobQueue, job_id: int, owner: str, sop: str, priority: int = 0) -> bool:
    entry = OutboxEntry(sop, SR, "SR", f"results/{sop}.dcm", "pacs")
    return queue.record_results(job_id, owner, "done", [ImageOutcome(1, "analysed", score=0.5)], [entry],
                                priority=priority, priority_reason=f"rule of job {job_id}")


def test_a_newer_revision_waits_while_an_older_one_is_processing(db: Database) -> None:
    index, queue = IntakeRepository(db), JobQueue(db)
    first = new_revision(db, index, queue, STUDY + ".1.1")
    [claimed] = queue.claim("w1", lease_seconds=60)
    assert claimed.id == first
    second = new_revision(db, index, queue, STUDY + ".1.2")  # a late instance while revision 1 is processing
    assert queue.claim("w2", lease_seconds=60) == []  # waits: revision 1 is still being processed
    assert finish(queue, first, "w1", "2.25.1")
    [next_job] = queue.claim("w2", lease_seconds=60)
    assert next_job.id == second and next_job.study_revision == 2


def test_one_claim_takes_one_job_per_study(db: Database) -> None:
    index, queue = IntakeRepository(db), JobQueue(db)
    first = new_revision(db, index, queue, STUDY + ".1.1")
    [claimed] = queue.claim("w1", lease_seconds=-1)  # its lease has already expired (the worker died)
    second = new_revision(db, index, queue, STUDY + ".1.2")
    got = queue.claim("w2", lease_seconds=60, limit=4)
    assert [job.id for job in got] == [second]  # the newer revision, never both
    with db.session() as session:
        old = session.get(Job, first)
        assert old.state == "superseded" and "revision 2" in (old.last_error or "")


def test_a_stale_revision_finishing_last_is_refused(db: Database) -> None:
    """Worker 1 stalls past its lease on revision 1; worker 2 processes revision 2 and finishes first."""
    index, queue = IntakeRepository(db), JobQueue(db)
    first = new_revision(db, index, queue, STUDY + ".1.1")
    [claimed] = queue.claim("w1", lease_seconds=-1)
    assert claimed.id == first
    second = new_revision(db, index, queue, STUDY + ".1.2")
    [newer] = queue.claim("w2", lease_seconds=60)
    assert newer.id == second
    assert finish(queue, second, "w2", "2.25.2", priority=2)
    # Worker 1 wakes up: its heartbeat still finds the job in its name, but its results are stale.
    queue.heartbeat("w1", [first], 60)
    assert not finish(queue, first, "w1", "2.25.1", priority=0)
    with db.session() as session:
        old = session.get(Job, first)
        assert old.state == "superseded"
        assert "revision 2" in (old.last_error or "")
        rows = session.execute(select(OutboxItem.job_id, OutboxItem.state)).all()
        assert rows == [(second, "pending")]  # the newer revision's delivery stands, the stale one adds none
        study = session.scalar(select(Study).where(Study.study_instance_uid == STUDY))
        assert study.priority == 2 and study.priority_reason == f"rule of job {second}"
        assert study.status == "done"


def test_a_stale_revision_is_refused_while_the_newer_one_is_processing(db: Database) -> None:
    index, queue = IntakeRepository(db), JobQueue(db)
    first = new_revision(db, index, queue, STUDY + ".1.1")
    queue.claim("w1", lease_seconds=-1)
    second = new_revision(db, index, queue, STUDY + ".1.2")
    [newer] = queue.claim("w2", lease_seconds=60)
    assert newer.id == second
    assert not finish(queue, first, "w1", "2.25.1")
    assert finish(queue, second, "w2", "2.25.2")
    with db.session() as session:
        assert session.get(Job, first).state == "superseded"
        assert session.execute(select(OutboxItem.job_id)).scalars().all() == [second]


def test_an_older_revision_finishing_first_is_superseded_normally(db: Database) -> None:
    """The ordinary late-instance case: revision 1 finishes, then revision 2 replaces its pending deliveries."""
    index, queue = IntakeRepository(db), JobQueue(db)
    first = new_revision(db, index, queue, STUDY + ".1.1")
    queue.claim("w1", lease_seconds=60)
    second = new_revision(db, index, queue, STUDY + ".1.2")
    assert finish(queue, first, "w1", "2.25.1")
    [newer] = queue.claim("w2", lease_seconds=60)
    assert finish(queue, newer.id, "w2", "2.25.2")
    with db.session() as session:
        states = dict(session.execute(select(OutboxItem.job_id, OutboxItem.state)).all())
    assert states == {first: "superseded", second: "pending"}


def test_concurrent_claimers_never_process_two_revisions_of_one_study(db: Database) -> None:
    """Many claimers race over several studies with two revisions queued each: never two at once per study."""
    index, queue = IntakeRepository(db), JobQueue(db)
    studies = [f"{STUDY}.{n}" for n in range(6)]
    for study in studies:
        for sop in (".1", ".2"):
            assoc = open_association(index)
            receive(index, assoc, study + sop, study=study)
            index.association_ended(assoc, "released", 1)
            with db.session() as session:
                row = session.scalar(select(Study).where(Study.study_instance_uid == study))
                study_id, revision = row.id, row.revision
            with db.session() as session:  # both revisions queued (as if the first was claimed in between)
                session.add(Job(study_id=study_id, study_revision=revision, state="queued", priority=0, attempts=0,
                                created_at=row.first_received_at))
    errors: list[BaseException] = []
    violations: list[str] = []
    lock = threading.Lock()
    processing: dict[int, str] = {}

    def work(owner: str) -> None:
        own = JobQueue(db)
        try:
            for _ in range(200):
                got = own.claim(owner, lease_seconds=60, limit=2)
                with lock:
                    for job in got:
                        if job.study_id in processing:
                            violations.append(f"{owner} and {processing[job.study_id]} both on study {job.study_id}")
                        processing[job.study_id] = owner
                for job in got:
                    with lock:
                        del processing[job.study_id]
                    own.record_results(job.id, owner, "done", [], [], priority=0, priority_reason="test")
                with db.session() as session:
                    if not session.scalar(select(Job.id).where(Job.state.in_(("queued", "processing"))).limit(1)):
                        return
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a claimer did not finish"
    assert errors == [] and violations == []
    with db.session() as session:
        assert not session.scalar(select(Job.id).where(Job.state.in_(("queued", "processing"))).limit(1))
