"""The product loop over DICOMweb with a real PACS: Orthanc's DICOMweb plugin pushes a study to the node by STOW-RS
(``/dicom-web/servers/msknode/stow``, bearer token), and the node's SR and secondary captures come back to Orthanc
by STOW-RS (the ``dicomweb`` destination, HTTP basic authentication) — once."""

from __future__ import annotations

import io
import time
import urllib.error
import uuid
from pathlib import Path

import pydicom
import pytest

from tests.helpers.models import tiny_model
from tests.helpers.node import NodeConfig, NodeProcess, Peer, free_port, wait_for, wait_for_port
from tests.helpers.orthanc import DicomWebOrthanc
from tests.pipeline.test_orthanc_end_to_end import DEMO_MODEL, PipelineConfig, phantom_study, results_at

pytestmark = [pytest.mark.orthanc]

TOKEN = "orthanc-" + uuid.uuid4().hex
ORTHANC_USER, ORTHANC_PASSWORD = "msknode", "pw-" + uuid.uuid4().hex[:12]


def orthanc_for(tmp_path: Path, stow_port: int, token: str = TOKEN) -> DicomWebOrthanc:
    url = f"http://127.0.0.1:{stow_port}/dicom-web"
    return DicomWebOrthanc(tmp_path / "orthanc", ORTHANC_USER, ORTHANC_PASSWORD,
                           servers={"msknode": (url, {"Authorization": f"Bearer {token}"}),
                                    "msknode-badtoken": (url, {"Authorization": "Bearer not-the-token"})})


def orthanc_peer(orthanc: DicomWebOrthanc, password_file: Path, receives_results: bool) -> Peer:
    return Peer("pacs", "ORTHANC", stow_token=TOKEN, receives_results=receives_results, protocol="dicomweb",
                url=orthanc.dicomweb_url, auth="basic", username=ORTHANC_USER, secret_file=password_file)


def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "orthanc-password"
    path.write_text(ORTHANC_PASSWORD)
    path.chmod(0o600)
    return path


def test_orthanc_pushes_a_study_to_the_node_by_stow(tmp_path: Path) -> None:
    stow_port = free_port()
    orthanc = orthanc_for(tmp_path, stow_port).start()
    node = NodeProcess(NodeConfig(directory=tmp_path / "node", roles=("dicomweb",), dicomweb_port=stow_port,
                                  peers=(orthanc_peer(orthanc, password_file(tmp_path), False),)))
    try:
        node.start()
        wait_for_port("127.0.0.1", stow_port, 30, node.process)
        files = phantom_study(tmp_path / "study", 3, study_key="stow-in")
        study_id = orthanc.upload(files[0])["ParentStudy"]
        for path in files[1:]:
            orthanc.upload(path)

        with pytest.raises(urllib.error.HTTPError):  # a wrong token: 401, nothing stored
            orthanc.stow_to("msknode-badtoken", study_id)
        assert node.instances() == []

        orthanc.stow_to("msknode", study_id)
        sent = sorted(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files)
        rows = node.instances()
        assert sorted(row.sop_instance_uid for row in rows) == sent
        assert {row.calling_ae_title for row in rows} == {"ORTHANC"}
        assert len(node.spool_files()) == 3 and node.incoming_files() == []
        orthanc.stow_to("msknode", study_id)  # pushed again: duplicates, nothing new
        assert len(node.instances()) == 3 and node.replacements() == []
        audit = node.wait_for_associations_closed()
        assert [(row.called_ae_title, row.outcome, row.reject_reason) for row in audit] == [
            ("STOW-RS", "rejected", "token-not-recognised"), ("STOW-RS", "released", None),
            ("STOW-RS", "released", None)]
    finally:
        node.stop()
        orthanc.stop()


@pytest.mark.slow
def test_study_in_by_stow_from_orthanc_comes_back_by_stow_with_one_sr(tmp_path: Path) -> None:
    stow_port = free_port()
    orthanc = orthanc_for(tmp_path, stow_port).start()
    config = PipelineConfig(directory=tmp_path / "node", port=free_port(), dicomweb_port=stow_port,
                            roles=("dicomweb", "scheduler", "worker", "sender"),
                            peers=(orthanc_peer(orthanc, password_file(tmp_path), True),))
    if not (DEMO_MODEL / "config.json").exists():
        config.model = tiny_model(tmp_path / "tiny-model")
    node = NodeProcess(config)
    try:
        node.start(timeout=120)
        wait_for_port("127.0.0.1", stow_port, 60, node.process)
        files = phantom_study(tmp_path / "study", 2, study_key="stow-loop")
        study_id = orthanc.upload(files[0])["ParentStudy"]
        for path in files[1:]:
            orthanc.upload(path)
        orthanc.stow_to("msknode", study_id)

        wait_for(
            lambda: (lambda r: r if r[0] and r[1] and len(r[1][0]["Instances"]) == 2 else None)(
                results_at(orthanc, study_id)),
            timeout=240, what="SR and 2 SC instances at Orthanc (by STOW-RS)",
        )
        time.sleep(5)  # anything sent twice would show up now
        sr, sc = results_at(orthanc, study_id)
        assert len(sr) == 1 and len(sr[0]["Instances"]) == 1
        assert len(sc) == 1 and len(sc[0]["Instances"]) == 2
        report = pydicom.dcmread(io.BytesIO(orthanc.instance_file(sr[0]["Instances"][0])))
        source = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert report.StudyInstanceUID == source.StudyInstanceUID
        assert report.PatientID == source.PatientID
        with node.database() as db, db.session() as session:
            from sqlalchemy import select

            from storage.models import OutboxItem

            rows = list(session.scalars(select(OutboxItem)))
        assert rows and {(row.state, row.last_status) for row in rows} == {("delivered", "200")}
        assert {row.destination for row in rows} == {"pacs"}
    finally:
        node.stop(timeout=60)
        orthanc.stop()
