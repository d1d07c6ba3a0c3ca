"""Retention never deletes what intake acknowledged after the candidates were chosen (issue #14, item 3).

Retention picks its candidates in one transaction and purges each study in another; an instance that arrives in
between must survive: the purge re-checks the study inside its own transaction, holding the study (row lock on
PostgreSQL, the write lock on SQLite), and leaves it alone when it no longer qualifies.
"""

from __future__ import annotations

import random
import re
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from storage import completion
from storage.db import Database
from storage.intake import InstanceRecord, IntakeRepository
from storage.models import Instance, Study
from storage.queue import JobQueue
from storage.retention import Retention
from storage.spool import Spool
from tests.helpers.dicomdata import small_instance
from tests.helpers.node import NodeConfig, NodeProcess
from tests.helpers.tools import require_tool, storescu
from tests.storage.test_retention import finished_study


def test_an_instance_arriving_after_the_choice_is_not_purged(db: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    study = finished_study(db, spool, 1, delivered=True)
    retention = Retention(db, spool)
    with db.session() as session:  # what run() chose in its own transaction
        chosen = [s.study_instance_uid for s in retention._candidates(session, None, 10)]
    assert chosen == [study]
    # A late instance is acknowledged before the purge of the chosen study starts.
    late = spool.incoming / "late"
    late.write_bytes(b"late instance")
    stored = spool.commit_file(late, study, study + ".1", study + ".1.2")
    index = IntakeRepository(db)
    assoc = index.association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
    index.index_instance(
        InstanceRecord(study, study + ".1", study + ".1.2", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1",
                       None, None, "CR", None, None, None, stored.relative_path, stored.size, stored.sha256, "PACS",
                       assoc)
    )
    assert retention.purge_study(study) is None  # kept: it changed since it was chosen
    with db.session() as session:
        rows = set(session.scalars(select(Instance.sop_instance_uid)))
    assert rows == {study + ".1.1", study + ".1.2"}
    assert spool.absolute(stored.relative_path).exists()


STUDIES = 30


@pytest.mark.slow
@pytest.mark.dcmtk
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_intake_during_retention_loses_nothing(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A real receiver takes late instances (DCMTK storescu, one association each, two senders) into finished
    studies while retention purges finished studies over and over and a stand-in worker finishes every queued
    revision. Afterwards every acknowledged instance still has its row and its file, unless a finished job of
    its study had it among its inputs (then retention may rightly have purged it)."""
    require_tool("storescu")
    url = None if backend == "sqlite" else request.getfixturevalue("postgres_url")
    node = NodeProcess(NodeConfig(directory=tmp_path / "node", database_url=url)).start()
    database = Database(node.config.url)
    spool = Spool(node.spool, fsync=True)
    studies = [(f"2.25.{random.getrandbits(96)}", f"2.25.{random.getrandbits(96)}") for _ in range(STUDIES)]
    acknowledged: dict[str, str] = {}  # SOP Instance UID -> study
    processed: set[str] = set()  # instances a finished job had as inputs (retention may purge these)
    errors: list[BaseException] = []
    stop = threading.Event()
    files = tmp_path / "out"
    files.mkdir()

    def send(sender: int) -> None:
        rng = random.Random(sender)
        try:
            count = 0
            while not stop.is_set():
                study, series = rng.choice(studies)
                dataset = small_instance(study_uid=study, series_uid=series, seed=sender * 100_000 + count,
                                         instance_number=count + 1)
                path = files / f"{sender}-{count}.dcm"
                dataset.save_as(path, enforce_file_format=True)
                result = storescu(node.port, [path], extra=["-v"], timeout=60)
                if result.returncode == 0 and len(re.findall(r"Received Store Response \(Success\)",
                                                             result.stdout + result.stderr)) == 1:
                    acknowledged[str(dataset.SOPInstanceUID)] = study
                count += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    def finish() -> None:  # the scheduler and a worker, reduced to their database effects
        queue = JobQueue(database)
        try:
            while not stop.is_set():
                completion.tick(database, queue, lambda _ae: 0.0, 600)
                for job in queue.claim("stand-in", 60, limit=50):
                    with database.session() as session:
                        inputs = set(session.scalars(select(Instance.sop_instance_uid)
                                                     .where(Instance.study_instance_uid == job.study_instance_uid)))
                    if queue.record_results(job.id, "stand-in", "done", [], [], priority=0, priority_reason="test"):
                        processed.update(inputs)
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    purges = [0]

    def retain() -> None:
        retention = Retention(database, spool)
        try:
            while not stop.is_set():
                purges[0] += retention.run(days=0, has_room=lambda: True)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(2)]
    threads += [threading.Thread(target=finish), threading.Thread(target=retain)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(25)
    finally:
        stop.set()
        for thread in threads:
            thread.join(90)
        node.stop()
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    assert errors == []
    with database.session() as session:
        rows = dict(session.execute(select(Instance.sop_instance_uid, Instance.spool_path)).all())
    database.dispose()
    lost = [sop for sop in acknowledged if sop not in processed
            and (sop not in rows or not (node.spool / rows[sop]).exists())]
    print(f"{backend}: {len(acknowledged)} acknowledged, {purges[0]} studies purged, {len(lost)} lost")
    assert len(acknowledged) > 50 and purges[0] > 20, (len(acknowledged), purges[0])
    assert lost == [], f"{len(lost)} of {len(acknowledged)} acknowledged instances lost, e.g. {lost[:3]}"
