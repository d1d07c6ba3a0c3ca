"""Workers on a real Triton server (tests/helpers/triton.py): two workers (a gRPC and an HTTP client) share it, a
server that is down makes jobs wait (nothing claimed, no attempt counted) and they resume when it is back, and a
server killed mid-batch and restarted loses nothing and duplicates nothing. Results equal an in-process CPU
worker's on the same studies (score and head outputs <= 1e-5)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

import engines
from engines.backends import triton_backend
from node.cli import app
from node.pipeline.worker import Worker
from node.settings import parse_settings
from storage import completion
from storage.db import Database
from storage.intake import InstanceRecord, IntakeRepository
from storage.job_inputs import JobInputs
from storage.migrate import upgrade
from storage.models import ImageResultRow, Instance, Job, OutboxItem
from storage.queue import JobQueue
from storage.spool import Spool
from tests.helpers.components import run_threads
from tests.helpers.node import REPO_ROOT
from tests.helpers.triton import TritonServer, python_backend_repository

DEMO = REPO_ROOT / "models" / "demo-mae"
PASSES = 4
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("triton-worker")
    result = CliRunner().invoke(app, ["model", "export-triton", str(work / "exported"), "--model", str(DEMO),
                                      "--max-batch-size", "8", "--queue-delay-us", "20000"])
    assert result.exit_code == 0, result.output
    triton = TritonServer(python_backend_repository(work / "exported", work / "repository"), work).start()
    yield triton
    triton.stop()


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[list[pydicom.Dataset]]:
    from engines.training import phantoms

    return [[phantoms.to_dataset(phantoms.generate("hand", seed=10 * s + i), patient_index=s, study_key=f"t{s}",
                                 instance_number=i + 1) for i in range(2 if s == 0 else 1)] for s in range(4)]


def settings(batch_size: int = 4):
    return parse_settings({
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "receives_results": True}],
        "engine": {"batch_size": batch_size, "passes": PASSES, "backend": "triton", "triton_retry_seconds": 0.5,
                   "triton_timeout_seconds": 30},
        "pipeline": {"lease_seconds": 30},
    })


class Node:
    """A database + spool with the studies received and their jobs queued."""

    def __init__(self, root: Path, studies: list[list[pydicom.Dataset]]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{root}/node.db"
        upgrade(url)
        self.database = Database(url)
        self.spool = Spool(root / "spool", fsync=False)
        intake = IntakeRepository(self.database)
        association = intake.association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
        for study in studies:
            for dataset in study:
                path = root / "in.dcm"
                dataset.save_as(path, enforce_file_format=True)
                shutil.copyfile(path, self.spool.incoming / "rx.dcm")
                stored = self.spool.commit_file(self.spool.incoming / "rx.dcm", dataset.StudyInstanceUID,
                                                dataset.SeriesInstanceUID, dataset.SOPInstanceUID)
                intake.index_instance(InstanceRecord(
                    dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID, dataset.SOPClassUID,
                    dataset.file_meta.TransferSyntaxUID, None, None, dataset.Modality,
                    dataset.get("BodyPartExamined"), None, None, stored.relative_path, stored.size, stored.sha256,
                    "PACS", association))
        completion.tick(self.database, JobQueue(self.database), lambda _ae: 0, force_complete_seconds=0)

    def worker(self, model, batch_size: int = 4, owner: str = "w") -> Worker:
        return Worker(settings(batch_size), JobQueue(self.database), JobInputs(self.database), self.spool, model,
                      owner=owner)

    def jobs(self) -> list[tuple[str, int]]:
        with self.database.session() as session:
            return [(job.state, job.attempts) for job in session.scalars(select(Job).order_by(Job.id))]

    def results(self) -> dict[str, tuple[float, dict]]:
        with self.database.session() as session:
            rows = session.execute(select(Instance.sop_instance_uid, ImageResultRow.score, ImageResultRow.outputs)
                                   .join(Instance, Instance.id == ImageResultRow.instance_id)).all()
        assert len(rows) == len({uid for uid, _, _ in rows}), "an image was recorded twice"
        return {uid: (score, outputs) for uid, score, outputs in rows}

    def outbox(self) -> list[tuple[str, str]]:
        with self.database.session() as session:
            return [(item.sop_instance_uid, item.destination) for item in session.scalars(select(OutboxItem))]


def work_until_empty(worker: Worker, deadline: float = 240.0) -> int:
    handled, end = 0, time.monotonic() + deadline
    while time.monotonic() < end:
        done = worker.run_once()
        if not done:
            return handled
        handled += done
    raise AssertionError("the queue did not empty in time")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, studies) -> dict[str, tuple[float, dict]]:
    """What an in-process CPU worker records for the same studies."""
    node = Node(tmp_path_factory.mktemp("cpu-node"), studies)
    work_until_empty(node.worker(engines.load(DEMO, backend="cpu")))
    results = node.results()
    node.database.dispose()
    assert len(results) == sum(len(study) for study in studies)
    return results


def triton_model(url: str, protocol: str = "grpc"):
    model = engines.load(DEMO, backend="cpu")  # weights: hash and heads; the graphs run on the server
    model.backend = triton_backend(url, "demo-mae", model.encoder_hash, protocol=protocol, timeout_seconds=30)
    return model


def assert_same_results(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for uid, (score, outputs) in found.items():
        assert abs(score - expected[uid][0]) <= TOLERANCE, (uid, score, expected[uid][0])
        for head, probabilities in outputs["heads"].items():
            reference = expected[uid][1]["heads"][head]
            assert max(abs(a - b) for a, b in zip(probabilities, reference)) <= TOLERANCE


def assert_complete_once(node: Node, studies) -> None:
    assert node.jobs() == [("done", 1)] * len(studies), node.jobs()  # one attempt each: nothing counted twice
    outbox = node.outbox()
    assert len(outbox) == len(set(outbox)) == sum(1 + len(study) for study in studies)  # one SR + one SC per image


def test_two_workers_share_one_server(tmp_path, server, studies, reference) -> None:
    node = Node(tmp_path / "node", studies)
    before = server.statistics("demo-mae_reconstruct")
    workers = [node.worker(triton_model(server.grpc_url, "grpc"), batch_size=1, owner="worker-grpc"),
               node.worker(triton_model(server.http_url, "http"), batch_size=1, owner="worker-http")]
    handled = run_threads([lambda w=w: work_until_empty(w) for w in workers], timeout=300, name="triton-worker")
    after = server.statistics("demo-mae_reconstruct")
    print(f"\njobs per worker (grpc, http): {handled}; reconstruct requests {after['requests'] - before['requests']}, "
          f"server executions {after['executions'] - before['executions']}")
    assert sum(handled) == len(studies) and all(handled), handled  # both workers took jobs
    assert_complete_once(node, studies)
    assert_same_results(node.results(), reference)
    assert after["inferences"] - before["inferences"] == sum(len(study) for study in studies)


def test_server_down_jobs_wait_and_resume(tmp_path, server, studies, reference, caplog) -> None:
    caplog.set_level("INFO", logger="msknode.worker")
    node = Node(tmp_path / "node", studies[:2])
    worker = node.worker(triton_model(server.grpc_url))
    server.stop()
    try:
        for _ in range(3):
            assert worker.run_once() == 0  # nothing claimed while the server is down
        assert node.jobs() == [("queued", 0)] * 2  # waiting, no attempt counted
    finally:
        server.start()
    assert work_until_empty(worker) == 2
    messages = [record.getMessage() for record in caplog.records]
    assert sum("jobs wait queued" in m for m in messages) == 1  # one warning per outage, not one per poll
    assert any("available again" in m for m in messages)
    assert_complete_once(node, studies[:2])
    assert_same_results(node.results(), {uid: reference[uid] for uid in node.results()})


def test_server_killed_mid_batch_and_restarted_loses_and_duplicates_nothing(tmp_path, server, studies,
                                                                             reference, caplog) -> None:
    caplog.set_level("WARNING", logger="msknode.worker")
    node = Node(tmp_path / "node", studies)
    worker = node.worker(triton_model(server.grpc_url), batch_size=8)
    worker._stop = threading.Event()  # as Worker.run sets it
    executing = server.set_delay("demo-mae_reconstruct", 30)
    outcome: dict[str, object] = {}

    def work() -> None:
        outcome["handled"] = work_until_empty(worker)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 120
        while not executing.exists():
            assert time.monotonic() < end, "the batch never reached the server"
            assert thread.is_alive(), outcome
            time.sleep(0.1)
        with node.database.session() as session:
            assert session.scalar(select(func.count()).select_from(Job).where(Job.state == "processing")) == 4
        server.kill()  # mid-batch: the reconstruct request is executing
        time.sleep(2)
        assert thread.is_alive()  # the worker waits for the server, it does not fail the jobs
        assert node.jobs() == [("processing", 1)] * 4
    finally:
        server.set_delay("demo-mae_reconstruct", None)
        server.start()
    thread.join(timeout=180)
    assert not thread.is_alive() and outcome["handled"] == 4
    assert any("unavailable mid-batch" in record.getMessage() for record in caplog.records)
    assert_complete_once(node, studies)
    assert_same_results(node.results(), reference)


class FlakyBackend:
    """The CPU backend behind a server that is unavailable for the first ``outage`` seconds of use."""

    def __init__(self, inner, outage: float) -> None:
        self.inner, self.outage, self.first = inner, outage, None
        self.name, self.precision, self.device = "triton", "fp32", "stand-in"

    def _gate(self) -> None:
        from engines.backends import BackendUnavailable

        self.first = self.first or time.monotonic()
        if time.monotonic() - self.first < self.outage:
            raise BackendUnavailable("stand-in server restarting")

    def embed(self, x):
        self._gate()
        return self.inner.embed(x)

    def reconstruct(self, x, ids_keep, ids_restore):
        self._gate()
        return self.inner.reconstruct(x, ids_keep, ids_restore)

    def describe(self):
        return {"backend": self.name, "precision": self.precision, "device": self.device}


def test_waiting_for_the_server_does_not_count_towards_the_job_timeout(tmp_path, studies, reference,
                                                                       monkeypatch) -> None:
    """``pipeline.job_timeout_seconds`` 4 s, server away for 8 s mid-batch: the watchdog (which would hand the jobs
    back and end the process) does not fire; the batch completes once."""
    import node.pipeline.worker as worker_module

    fired: list[int] = []
    monkeypatch.setattr(worker_module.os, "_exit", lambda code: fired.append(code))
    monkeypatch.setattr(worker_module.logging, "shutdown", lambda: None)
    node = Node(tmp_path / "node", studies[:1])
    model = engines.load(DEMO, backend="cpu")
    model.backend = FlakyBackend(model.backend, outage=8.0)
    worker = node.worker(model)
    worker.settings.pipeline.job_timeout_seconds = 4.0  # the batch's own work takes well under 1 s
    assert worker.run_once() == 1
    time.sleep(0.2)
    assert fired == []
    assert_complete_once(node, studies[:1])
    assert_same_results(node.results(), {uid: reference[uid] for uid in node.results()})
