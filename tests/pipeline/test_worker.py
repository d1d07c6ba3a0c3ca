"""The worker on the real database and spool with a tiny random model: per-image outcomes, valid SR/SC,
deterministic objects on retry, an unreadable image failing alone, and a not-analysed study."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node.settings import parse_settings
from node.pipeline.worker import Worker
from storage import completion
from storage.db import Database
from storage.intake import InstanceRecord, IntakeRepository
from storage.job_inputs import JobInputs
from storage.migrate import upgrade
from storage.models import ImageResultRow, Job, OutboxItem, Study
from storage.queue import JobQueue
from storage.spool import Spool
from storage.studies import studies_summary
from tests.helpers.models import tiny_model
from tests.helpers.tools import require_tool


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    import engines

    folder = tiny_model(tmp_path_factory.mktemp("model") / "tiny", width=32, layers=1)
    return engines.load(folder, backend="cpu")


@pytest.fixture()
def env(tmp_path: Path, tiny_encoder):
    url = f"sqlite:///{tmp_path}/w.db"
    upgrade(url)
    database = Database(url)
    spool = Spool(tmp_path / "spool", fsync=False)
    settings = parse_settings({
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "receives_results": True}],
        "engine": {"batch_size": 4, "passes": 4},
        "results": {"report_not_analysed": True},
    })
    worker = Worker(settings, JobQueue(database), JobInputs(database), spool, tiny_encoder, owner="test-worker")
    yield database, spool, worker, settings, tmp_path
    database.dispose()


def receive(database: Database, spool: Spool, dataset: pydicom.Dataset, tmp: Path, association: str) -> None:
    path = tmp / "in.dcm"
    dataset.save_as(path, enforce_file_format=True)
    staged = spool.incoming / "rx.dcm"
    shutil.copyfile(path, staged)
    stored = spool.commit_file(staged, dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID)
    IntakeRepository(database).index_instance(InstanceRecord(
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID, dataset.SOPClassUID,
        dataset.file_meta.TransferSyntaxUID, dataset.get("AccessionNumber"), None, dataset.Modality,
        dataset.get("BodyPartExamined"), None, None, stored.relative_path, stored.size, stored.sha256, "PACS",
        association))


def complete_all(database: Database) -> None:
    completion.tick(database, JobQueue(database), lambda _ae: 0, force_complete_seconds=0)


def phantom_datasets(study_key: str, count: int, **kwargs) -> list[pydicom.Dataset]:
    from engines.training import phantoms

    return [
        phantoms.to_dataset(phantoms.generate("hand", seed=i), patient_index=3, study_key=study_key,
                            instance_number=i + 1, **kwargs)
        for i in range(count)
    ]


def test_study_is_analysed_with_valid_results_and_a_corrupt_image_fails_alone(env) -> None:
    database, spool, worker, _, tmp = env
    association = IntakeRepository(database).association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
    datasets = phantom_datasets("w1", 3)
    datasets[2].PixelData = datasets[2].PixelData[:100]  # truncated pixel data: decode must fail
    for ds in datasets:
        receive(database, spool, ds, tmp, association)
    complete_all(database)
    assert worker.run_once() == 1
    with database.session() as session:
        results = session.scalars(select(ImageResultRow)).all()
        states = sorted(r.state for r in results)
        outbox = session.scalars(select(OutboxItem)).all()
        study = session.scalar(select(Study))
    assert states == ["analysed", "analysed", "failed"]
    assert study.status == "done"
    kinds = sorted(item.kind for item in outbox)
    assert kinds == ["SC", "SC", "SR"] and {item.destination for item in outbox} == {"pacs"}
    sr = pydicom.dcmread(spool.absolute(next(i.path for i in outbox if i.kind == "SR")))
    assert sr.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert sr.SeriesDescription.startswith("AI")
    dciodvfy = require_tool("dciodvfy")  # every object type we emit is checked: required (a failure under CI)
    for item in outbox:
        report = subprocess.run([dciodvfy, "-new", str(spool.absolute(item.path))], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], errors


def test_retry_rebuilds_identical_objects(env) -> None:
    database, spool, worker, _, tmp = env
    association = IntakeRepository(database).association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
    for ds in phantom_datasets("w2", 2):
        receive(database, spool, ds, tmp, association)
    complete_all(database)
    worker.run_once()
    with database.session() as session:
        first = {item.sop_instance_uid: spool.absolute(item.path).read_bytes() for item in session.scalars(select(OutboxItem))}
        job = session.scalar(select(Job))
        job.state, job.lease_owner = "queued", None  # as if the worker had died before finishing
        session.query(OutboxItem).delete()
        session.query(ImageResultRow).delete()
    worker.run_once()
    with database.session() as session:
        second = {item.sop_instance_uid: spool.absolute(item.path).read_bytes() for item in session.scalars(select(OutboxItem))}
    assert first.keys() == second.keys()
    assert first == second


def test_study_with_nothing_eligible_gets_a_not_analysed_sr_with_reasons(env) -> None:
    database, spool, worker, _, tmp = env
    association = IntakeRepository(database).association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
    for ds in phantom_datasets("w3", 1):
        ds.BodyPartExamined = "CHEST"
        receive(database, spool, ds, tmp, association)
    complete_all(database)
    worker.run_once()
    with database.session() as session:
        study = session.scalar(select(Study))
        [result] = session.scalars(select(ImageResultRow)).all()
        [item] = session.scalars(select(OutboxItem)).all()
    assert study.status == "not_analysed" and "CHEST" in study.status_reason
    assert result.state == "ineligible" and result.reason == "body part CHEST not musculoskeletal"
    assert item.kind == "SR"
    summary = studies_summary(database)[0]
    assert summary["status"] == "not_analysed" and summary["images"][0]["reason"] == result.reason


def test_each_job_logs_what_its_stages_cost_at_debug_level(env, caplog) -> None:
    """Profiling without a profiler: one DEBUG line per job names every stage with its seconds
    (benchmarks/latency.py --profile reads it)."""
    database, spool, worker, _, tmp = env
    association = IntakeRepository(database).association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
    for ds in phantom_datasets("timings", 2):
        receive(database, spool, ds, tmp, association)
    complete_all(database)
    with caplog.at_level("DEBUG", logger="msknode.worker"):
        assert worker.run_once() == 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage timings job ")]
    assert len(lines) == 1
    stages = dict(part.rsplit(" ", 2)[:2] for part in lines[0].split(": ", 1)[1].split(", "))
    assert list(stages) == ["headers", "read", "preprocess", "inference (batch)", "sr", "sc", "write", "record"]
    assert all(float(seconds) >= 0 for seconds in stages.values())


def test_engine_threads_sets_the_workers_torch_threads(env) -> None:
    """[engine] threads = n gives the worker's process n torch threads; 0 leaves torch's default alone."""
    import torch

    database, spool, worker, settings, _ = env
    before = torch.get_num_threads()
    try:
        Worker(settings, JobQueue(database), JobInputs(database), spool, worker.model, owner="default")
        assert torch.get_num_threads() == before
        one = parse_settings({"engine": {"threads": 1}})
        Worker(one, JobQueue(database), JobInputs(database), spool, worker.model, owner="one")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_overlay_max_size_bounds_the_secondary_captures_radiograph(env) -> None:
    """[results] overlay_max_size reaches the worker's preprocessing: the SC shows the radiograph at most that long
    (its derivation names the size), and a value outside 224-2048 is refused naming the key."""
    from node.settings import ConfigError

    database, spool, worker, settings, tmp = env
    small = settings.model_copy(update={"results": settings.results.model_copy(update={"overlay_max_size": 256})})
    worker = Worker(small, JobQueue(database), JobInputs(database), spool, worker.model, owner="small-overlay")
    association = IntakeRepository(database).association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
    datasets = phantom_datasets("overlay", 1)
    assert max(int(datasets[0].Rows), int(datasets[0].Columns)) > 256
    receive(database, spool, datasets[0], tmp, association)
    complete_all(database)
    assert worker.run_once() == 1
    with database.session() as session:
        sc_path = next(item.path for item in session.scalars(select(OutboxItem)).all() if item.kind == "SC")
    shown = pydicom.dcmread(spool.absolute(sc_path)).DerivationDescription.split("shown at ", 1)[1].split(" of ")[0]
    assert max(int(side) for side in shown.split(" x ")) == 256, shown

    for bad in (100, 5000):
        with pytest.raises(ConfigError, match=r"results\.overlay_max_size"):
            parse_settings({"results": {"overlay_max_size": bad}})
