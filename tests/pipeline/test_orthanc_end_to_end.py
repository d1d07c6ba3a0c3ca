"""The product loop with real peers: Orthanc (the PACS) pushes a phantom study to the node, and the node's
SR and secondary captures appear in the same study at Orthanc, once, with the engine's values."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from storage.models import ImageResultRow, Instance, OutboxItem
from tests.helpers.models import tiny_model
from tests.helpers.node import NodeConfig, NodeProcess, Peer, free_port, wait_for
from tests.helpers.orthanc import ORTHANC_AE, Orthanc

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "demo-mae"

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]


class PipelineConfig(NodeConfig):
    """A node running every role, fast settle, results to Orthanc."""

    model: Path = DEMO_MODEL

    def write(self) -> Path:
        path = super().write()
        text = path.read_text().replace(
            "[pipeline]\n",
            "[pipeline]\nsettle_seconds = 1.0\nforce_complete_seconds = 300.0\npoll_seconds = 0.5\n"
            "lease_seconds = 30.0\n",
        )
        text += (
            "\n[engine]\n"
            f'model = "{self.model}"\nbatch_size = 4\npasses = 10\nseed = 0\n'
            "\n[sender]\nbackoff_seconds = [1.0, 2.0]\ntimeout_seconds = 20.0\n"
        )
        path.write_text(text)
        return path


def phantom_study(directory: Path, count: int, study_key: str = "e2e") -> list[Path]:
    from engines.training import phantoms

    findings = [("lytic",), (), ("fracture",)]
    paths = []
    for index in range(count):
        phantom = phantoms.generate("knee", seed=100 + index, findings=findings[index % len(findings)])
        paths.append(
            phantoms.write_dicom(
                phantom, directory / f"img{index}.dcm", patient_index=7, study_key=study_key, instance_number=index + 1
            )
        )
    return paths


def results_at(orthanc: Orthanc, study_id: str) -> tuple[list[dict], list[dict]]:
    series = orthanc.study_series(study_id)
    sr = [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]
    sc = [s for s in series if s["MainDicomTags"].get("Modality") == "OT"]
    return sr, sc


def num_values(dataset: pydicom.Dataset) -> list[float]:
    values = []
    for item in dataset.get("ContentSequence", []):
        if item.get("ValueType") == "NUM":
            values.append(float(item.MeasuredValueSequence[0].NumericValue))
        values.extend(num_values(item))
    return values


@pytest.fixture()
def loop(tmp_path: Path):
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", {"msknode": ("MSKNODE", "127.0.0.1", node_port)})
    config = PipelineConfig(
        directory=tmp_path / "node",
        port=node_port,
        peers=(Peer("pacs", ORTHANC_AE, port=orthanc.dicom_port, receives_results=True),),
        roles=("receiver", "scheduler", "worker", "sender"),
    )
    if not (DEMO_MODEL / "config.json").exists():
        config.model = tiny_model(tmp_path / "tiny-model")
    orthanc.start()
    node = NodeProcess(config).start(timeout=120)
    yield orthanc, node
    node.stop(timeout=60)
    orthanc.stop()


def test_study_from_orthanc_comes_back_with_sr_and_sc_once(loop, tmp_path: Path) -> None:
    orthanc, node = loop
    files = phantom_study(tmp_path / "study", 2)
    study_id = orthanc.upload(files[0])["ParentStudy"]
    for path in files[1:]:
        orthanc.upload(path)
    orthanc.store_to("msknode", study_id)

    sr, sc = wait_for(
        lambda: (lambda r: r if r[0] and r[1] and len(r[1][0]["Instances"]) == 2 else None)(results_at(orthanc, study_id)),
        timeout=240,
        what="SR and 2 SC instances at Orthanc",
    )
    time.sleep(5)  # anything sent twice would show up now
    sr, sc = results_at(orthanc, study_id)
    assert len(sr) == 1 and len(sr[0]["Instances"]) == 1
    assert len(sc) == 1 and len(sc[0]["Instances"]) == 2
    assert sr[0]["MainDicomTags"]["SeriesDescription"].startswith("AI")
    assert sc[0]["MainDicomTags"]["SeriesDescription"].startswith("AI")

    report = pydicom.dcmread(__import__("io").BytesIO(orthanc.instance_file(sr[0]["Instances"][0])))
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert report.StudyInstanceUID == source.StudyInstanceUID
    assert report.PatientID == source.PatientID
    assert report.AccessionNumber == source.AccessionNumber

    with node.database() as db, db.session() as session:
        scores = [r.score for r in session.scalars(select(ImageResultRow).where(ImageResultRow.state == "analysed"))]
        delivered = session.scalars(select(OutboxItem.state)).all()
    assert len(scores) == 2 and set(delivered) == {"delivered"}
    reported = num_values(report)
    for score in scores:
        assert any(abs(value - score) <= 1e-6 * max(1.0, abs(score)) for value in reported), (score, reported)

    for instance_id in sc[0]["Instances"]:
        capture = pydicom.dcmread(__import__("io").BytesIO(orthanc.instance_file(instance_id)))
        assert capture.StudyInstanceUID == source.StudyInstanceUID
        assert max(capture.Rows, capture.Columns) <= 2048
        assert capture.SamplesPerPixel == 3
        assert abs(capture.Columns / capture.Rows - source.Columns / source.Rows) < 0.25  # colour bar widens it


def test_late_instance_gives_a_superseding_sr(loop, tmp_path: Path) -> None:
    orthanc, node = loop
    files = phantom_study(tmp_path / "study", 3, study_key="late")
    first = orthanc.upload(files[0])
    study_id = first["ParentStudy"]
    orthanc.upload(files[1])
    orthanc.store_to("msknode", study_id)
    wait_for(lambda: results_at(orthanc, study_id)[0], timeout=240, what="first SR")
    third = orthanc.upload(files[2])
    orthanc.store_to("msknode", third["ID"])
    srs = wait_for(
        lambda: (lambda r: r if sum(len(s["Instances"]) for s in r) >= 2 else None)(results_at(orthanc, study_id)[0]),
        timeout=240,
        what="a second SR",
    )
    reports = [
        pydicom.dcmread(__import__("io").BytesIO(orthanc.instance_file(i))) for s in srs for i in s["Instances"]
    ]
    newest = max(reports, key=lambda d: (d.ContentDate, d.ContentTime))
    older = [r for r in reports if r is not newest]
    predecessor_uids = {
        ref.ReferencedSOPInstanceUID
        for study in newest.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert {r.SOPInstanceUID for r in older} <= predecessor_uids
    with node.database() as db, db.session() as session:
        assert session.query(Instance).count() == 3


def test_study_forwarded_back_with_our_results_gives_no_second_result(loop, tmp_path: Path) -> None:
    """Echo loop (#14 item 1): the PACS auto-routes the whole study, our SR and SC included, back to the node.
    The node stores and acknowledges them but recognises its own outputs from their headers: no new revision,
    no new job, still exactly one SR and one SC series at the PACS after two more forwards."""
    orthanc, node = loop
    files = phantom_study(tmp_path / "study", 2, study_key="echo")
    study_id = orthanc.upload(files[0])["ParentStudy"]
    orthanc.upload(files[1])
    orthanc.store_to("msknode", study_id)
    wait_for(
        lambda: (lambda r: r if r[0] and r[1] and len(r[1][0]["Instances"]) == 2 else None)(results_at(orthanc, study_id)),
        timeout=240, what="SR and 2 SC instances at Orthanc",
    )
    with node.database() as db, db.session() as session:
        from storage.models import Study

        revision = session.scalars(select(Study)).one().revision  # one per new image instance
    for _ in range(2):  # each forward carries CR:2 + our SR:1 + our OT:2 back to the node
        orthanc.store_to("msknode", study_id)
        with node.database() as db:
            wait_for(lambda: _count(db, Instance) >= 5, timeout=60, what="the echoed results stored at the node")
        time.sleep(8)  # settle (1 s) + scheduler + worker + sender: a second result would be at Orthanc now
    sr, sc = results_at(orthanc, study_id)
    assert len(sr) == 1 and len(sr[0]["Instances"]) == 1, sr
    assert len(sc) == 1 and len(sc[0]["Instances"]) == 2, sc
    with node.database() as db, db.session() as session:
        from storage.models import Job, Study

        assert session.query(Job).count() == 1
        study = session.scalars(select(Study)).one()
        assert study.revision == revision and study.status == "done"  # the echo started no revision
        kinds = sorted(row.intake_kind for row in session.scalars(select(Instance)))
        assert kinds == ["image", "image", "own_result", "own_result", "own_result"]
        assert session.query(OutboxItem).count() == 3  # SR + 2 SC, nothing built for the echo


def _count(db, model) -> int:  # type: ignore[no-untyped-def]
    with db.session() as session:
        return session.query(model).count()
