"""Eligibility from headers, job bounds and the worker's memory (#14 item 4).

A 1,000-slice CT study and a 300-frame multi-frame X-ray angiography object are sent to the node by mistake.
The worker — a real process with the real database, spool and model — must end both `not_analysed` with a
reason, decided from the headers alone: the pixel data of an ineligible instance is never loaded, and a job
whose eligible frames exceed ``pipeline.max_frames_per_job`` reads none.

Bound: the worker's peak RSS (VmHWM, reset once the model is loaded) stays within its resting RSS
+ ``RSS_BOUND_MIB``. The pixel data is ~125 MiB (CT: 1,000 x 256 x 256 x 16 bit) + ~37 MiB (XA: 300 frames),
so a worker that loaded it all (as the old one did, keeping every ineligible dataset for the report) exceeds
the bound by far; the measured figures are in docs/reliability.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select, update

from node.pipeline.eligibility import job_bound_reason
from node.settings import parse_settings
from storage import completion
from storage.db import Database
from storage.intake import InstanceRecord, IntakeRepository
from storage.migrate import upgrade
from storage.models import ImageResultRow, Job, Study
from storage.queue import JobQueue
from storage.spool import Spool
from tests.helpers.models import tiny_model

REPO = Path(__file__).resolve().parents[2]
RSS_BOUND_MIB = 64
CT_SLICES, CT_SIZE = 1000, 256
XA_FRAMES, XA_SIZE = 300, 256
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
XA_IMAGE = "1.2.840.10008.5.1.4.1.1.12.1"

pytestmark = pytest.mark.slow


def _dataset(sop_class: str, modality: str, study: str, series: str, number: int, size: int, frames: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.BodyPartExamined = modality, "KNEE"
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "Mistake^Sent", "PID-MEM", "ACC-MEM"
    ds.StudyDate, ds.StudyTime = "20261201", "101500"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    pixels = (np.arange(size * size * frames, dtype=np.uint32) * 2654435761 % 4096).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The two mistaken studies, stored and indexed as the receiver would (real spool and database)."""
    root = tmp_path_factory.mktemp("memory")
    url = f"sqlite:///{root}/w.db"
    upgrade(url)
    database = Database(url)
    spool = Spool(root / "spool", fsync=False)
    intake = IntakeRepository(database)
    association = intake.association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
    ct_study, xa_study = generate_uid(), generate_uid()
    ct_series = generate_uid()
    items = [_dataset(CT_IMAGE, "CT", ct_study, ct_series, n + 1, CT_SIZE, 1) for n in range(CT_SLICES)]
    items.append(_dataset(XA_IMAGE, "XA", xa_study, generate_uid(), 1, XA_SIZE, XA_FRAMES))
    staging = root / "in.dcm"
    for ds in items:
        ds.save_as(staging, enforce_file_format=True)
        shutil.copyfile(staging, spool.incoming / "rx.dcm")
        kept = spool.commit_file(spool.incoming / "rx.dcm", ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        intake.index_instance(InstanceRecord(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID, ExplicitVRLittleEndian,
            "ACC-MEM", "20261201", ds.Modality, "KNEE", 1, int(ds.InstanceNumber), kept.relative_path, kept.size,
            kept.sha256, "PACS", association))
    del items
    model = tiny_model(root / "model", width=32, layers=1)
    yield root, url, database, spool, model, {"ct": ct_study, "xa": xa_study}
    database.dispose()


def _work(root: Path, url: str, spool: Spool, model: Path, settings: dict) -> dict:
    database = Database(url)
    try:
        completion.tick(database, JobQueue(database), lambda _ae: 0, force_complete_seconds=0)
    finally:
        database.dispose()
    parse_settings(settings)  # the same settings the worker reads; a typo fails here, with the key
    probe = root / "probe.json"
    probe.write_text(json.dumps({"settings": settings, "database_url": url, "spool": str(spool.root),
                                 "model": str(model)}))
    run = subprocess.run([sys.executable, "-m", "tests.helpers.worker_probe", str(probe)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _outcomes(database: Database, study_uid: str) -> tuple[str, str, set[str], set[str]]:
    """(job state, the study's reason, the images' states, their reasons) of the study's latest job."""
    with database.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        job = session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id.desc())).first()
        rows = session.scalars(select(ImageResultRow).where(ImageResultRow.job_id == job.id)).all()
        return job.state, study.status_reason or "", {row.state for row in rows}, {row.reason for row in rows}


def _report(label: str, figures: dict) -> float:
    growth = (figures["peak_kb"] - figures["resting_kb"]) / 1024
    print(f"\n[worker memory] {label}: resting {figures['resting_kb'] / 1024:.1f} MiB, "
          f"peak {figures['peak_kb'] / 1024:.1f} MiB, growth {growth:.1f} MiB (bound {RSS_BOUND_MIB} MiB)")
    return growth


def test_mistaken_ct_study_and_multiframe_are_not_analysed_from_headers_with_bounded_rss(stored) -> None:
    root, url, database, spool, model, studies = stored
    settings = {"engine": {"batch_size": 4, "passes": 2}}  # default eligibility: CR/DX radiographs
    figures = _work(root, url, spool, model, settings)
    assert figures["jobs"] == 2
    for key, reason in (("ct", "modality CT not eligible"), ("xa", "modality XA not eligible")):
        state, why, states, reasons = _outcomes(database, studies[key])
        assert state == "not_analysed" and why == reason, (state, why)
        assert states == {"ineligible"} and reasons == {reason}
    assert _report("ineligible by modality", figures) <= RSS_BOUND_MIB


def test_job_bounds_stop_an_eligible_mistake_before_any_pixel_is_read(stored) -> None:
    """A site that opened eligibility to CT and XA: the per-instance frame bound and the per-job frame bound
    end both studies `not_analysed` with the bound named, still from the headers alone."""
    root, url, database, spool, model, studies = stored
    with database.session() as session:  # a new revision of each study, as if re-sent
        session.execute(update(Study).values(revision=Study.revision + 1))
    settings = {
        "engine": {"batch_size": 4, "passes": 2},
        "eligibility": {"modalities": ["CR", "DX", "CT", "XA"], "sop_classes": []},
    }
    figures = _work(root, url, spool, model, settings)
    assert figures["jobs"] == 2
    state, why, states, reasons = _outcomes(database, studies["ct"])
    bound = "study has 1000 eligible frames, more than pipeline.max_frames_per_job (64)"
    assert state == "not_analysed" and why == bound and states == {"ineligible"} and reasons == {bound}
    state, why, states, reasons = _outcomes(database, studies["xa"])
    per_instance = "300 frames, more than eligibility.max_frames_per_instance (16)"
    assert state == "not_analysed" and why == per_instance and reasons == {per_instance}
    assert _report("eligible, over the job bounds", figures) <= RSS_BOUND_MIB


def test_job_bound_on_instances_is_checked_first() -> None:
    pipeline = parse_settings({"pipeline": {"max_instances_per_job": 500}}).pipeline
    assert job_bound_reason(1000, 0, pipeline) == \
        "study has 1000 instances, more than pipeline.max_instances_per_job (500)"
    assert job_bound_reason(500, 64, pipeline) is None
