"""An URGENT study queued behind 50 routine ones is analysed and delivered before them, on a real node.

DCMTK storescu sends 50 routine studies (peer ``ward``), then one study from the emergency department's
modality (peer ``ed``, ``priority = "urgent"``); the worker role is started only once all 51 jobs wait in the
queue, so the urgent study is the newest job of all. Results go to a DCMTK storescp. Once the urgent SR and
ten routine ones are delivered the worker is stopped: every routine study analysed by then finished after the
urgent one, the rest were never started. Order is read from the database (job finish times, outbox delivery
times), never from durations.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from node.pipeline.triage import NO_RULE_MATCHED
from storage.models import Job, OutboxItem, Study
from tests.helpers.dicomdata import small_instance
from tests.helpers.models import tiny_model
from tests.helpers.node import MSKNODE, REPO_ROOT, NodeProcess, Peer, free_port, wait_for
from tests.helpers.tools import require_tool, storescu, start_storescp
from tests.pipeline.test_orthanc_end_to_end import PipelineConfig

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

ROUTINE_STUDIES = 50


class TriageConfig(PipelineConfig):
    """Receiver, scheduler and sender (the worker is started by the test); the ``ed`` peer is urgent."""

    def write(self) -> Path:
        path = super().write()
        blocks = path.read_text().split("[[peers]]")
        for index, block in enumerate(blocks):
            if 'name = "ed"\n' in block:
                lines = [line for line in block.splitlines() if not line.startswith("priority =")]
                blocks[index] = "\n".join([*lines, 'priority = "urgent"', "", ""])
        text = "[[peers]]".join(blocks)
        text = text.replace("passes = 10", "passes = 2").replace("batch_size = 4", "batch_size = 8")
        text += "\n[results]\nsend_secondary_capture = false\n"
        path.write_text(text)
        return path


def write_studies(directory: Path, count: int, seed: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"s{index}.dcm"
        small_instance(seed=seed + index).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_urgent_study_is_analysed_and_delivered_before_the_routine_backlog(tmp_path: Path) -> None:
    require_tool("storescu")
    results_port = free_port()
    received = tmp_path / "storescp"
    scp = start_storescp(received, results_port, ae_title="RESULTS")
    config = TriageConfig(
        directory=tmp_path / "node", roles=("receiver", "scheduler", "sender"),
        peers=(Peer("ward", "STORESCU"), Peer("ed", "EDSCU"),
               Peer("results", "RESULTS", port=results_port, may_send=False, receives_results=True)),
    )
    config.model = tiny_model(tmp_path / "tiny-model", width=32, layers=1)
    node = NodeProcess(config).start(timeout=120)
    worker: subprocess.Popen[bytes] | None = None
    try:
        routine = write_studies(tmp_path / "routine", ROUTINE_STUDIES, seed=1000)
        urgent = write_studies(tmp_path / "urgent", 1, seed=5000)
        assert storescu(node.port, routine).returncode == 0
        assert storescu(node.port, urgent, calling="EDSCU").returncode == 0
        urgent_uid = pydicom.dcmread(urgent[0], stop_before_pixels=True).StudyInstanceUID

        def queued() -> int:
            with node.database() as db, db.session() as session:
                return session.scalar(select(func.count()).select_from(Job).where(Job.state == "queued")) or 0

        wait_for(lambda: queued() == ROUTINE_STUDIES + 1, 120, "all 51 jobs queued", 0.5)
        with open(tmp_path / "worker.log", "ab") as log:
            worker = subprocess.Popen([*MSKNODE, "serve", "--role", "worker", "-c", str(config.path)], cwd=REPO_ROOT,
                                      stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))

        def delivered_after_urgent() -> bool:
            """The urgent SR is delivered and so are at least 10 routine ones (the rest need not wait)."""
            with node.database() as db, db.session() as session:
                states = session.execute(select(OutboxItem.study_instance_uid, OutboxItem.state)).all()
            done = [uid for uid, state in states if state == "delivered"]
            return urgent_uid in done and len(done) > 10

        wait_for(delivered_after_urgent, 240, "the urgent SR and 10 routine ones delivered", 0.5)
        worker.terminate()
        worker.wait(60)

        with node.database() as db, db.session() as session:
            jobs = session.execute(
                select(Study.study_instance_uid, Study.priority, Study.priority_reason, Job.state, Job.created_at,
                       Job.finished_at).join(Job, Job.study_id == Study.id)
            ).all()
            deliveries = dict(session.execute(
                select(OutboxItem.study_instance_uid, OutboxItem.delivered_at).where(OutboxItem.state == "delivered")
            ).all())
        assert len(jobs) == ROUTINE_STUDIES + 1
        (urgent_job,) = [job for job in jobs if job.study_instance_uid == urgent_uid]
        routine_jobs = [job for job in jobs if job.study_instance_uid != urgent_uid]
        assert (urgent_job.priority, urgent_job.priority_reason, urgent_job.state) == (2, "peer default", "done")
        assert all(job.created_at < urgent_job.created_at for job in routine_jobs)  # it really was queued last
        finished = [job for job in routine_jobs if job.finished_at is not None]
        assert len(finished) >= 10
        assert all(job.state == "queued" for job in routine_jobs if job.finished_at is None)  # not analysed first
        assert all(urgent_job.finished_at <= job.finished_at for job in finished)
        assert all(job.priority_reason == NO_RULE_MATCHED for job in finished)
        urgent_delivered = deliveries.pop(urgent_uid)
        assert len(deliveries) >= 10 and all(urgent_delivered <= when for when in deliveries.values())

        arrived = {}
        for path in received.iterdir():
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
            arrived[str(dataset.StudyInstanceUID)] = str(dataset.SeriesDescription)
        assert arrived[urgent_uid].startswith("AI URGENT findings")
        others = [text for uid, text in arrived.items() if uid != urgent_uid]
        assert len(others) >= 10 and all(text.startswith("AI ROUTINE findings") for text in others)
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            worker.wait(60)
        node.stop(timeout=60)
        scp.terminate()
        scp.wait(30)
