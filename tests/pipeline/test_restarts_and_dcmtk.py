"""Stop or kill the node in the middle of a job and restart it: the results still arrive, exactly once.
And the DCMTK path: storescu -> node -> storescp."""

from __future__ import annotations

import io
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from tests.helpers.models import tiny_model
from tests.helpers.node import NodeProcess, Peer, free_port, wait_for
from tests.helpers.orthanc import ORTHANC_AE, Orthanc
from tests.helpers.tools import require_tool, start_storescp
from tests.pipeline.test_orthanc_end_to_end import DEMO_MODEL, PipelineConfig, phantom_study, results_at

pytestmark = [pytest.mark.slow]
ROLES = ("receiver", "scheduler", "worker", "sender")


def model_for(tmp_path: Path) -> Path:
    return DEMO_MODEL if (DEMO_MODEL / "config.json").exists() else tiny_model(tmp_path / "tiny-model")


@pytest.mark.orthanc
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_node_stopped_mid_job_delivers_once_after_restart(tmp_path: Path, monkeypatch, how: str) -> None:
    monkeypatch.setenv("MSKNODE_FAULTS", "worker.before_finish=sleep:6")
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", {"msknode": ("MSKNODE", "127.0.0.1", node_port)}).start()
    config = PipelineConfig(directory=tmp_path / "node", port=node_port, roles=ROLES,
                            peers=(Peer("pacs", ORTHANC_AE, port=orthanc.dicom_port, receives_results=True),))
    config.model = model_for(tmp_path)
    node = NodeProcess(config).start(timeout=120)
    try:
        files = phantom_study(tmp_path / "study", 2, study_key=f"restart-{how}")
        study_id = orthanc.upload(files[0])["ParentStudy"]
        orthanc.upload(files[1])
        orthanc.store_to("msknode", study_id)
        wait_for(lambda: "fault point worker.before_finish" in node.log(), 180, "the worker to reach the fault point", 0.2)
        if how == "sigterm":
            node.stop(timeout=60)
        else:
            node.kill()
        assert results_at(orthanc, study_id) == ([], [])  # nothing was sent before the stop
        monkeypatch.delenv("MSKNODE_FAULTS")
        node.start(timeout=120)
        wait_for(lambda: (lambda r: r if r[0] and r[1] and len(r[1][0]["Instances"]) == 2 else None)(
            results_at(orthanc, study_id)), 300, "results after the restart")
        time.sleep(5)
        sr, sc = results_at(orthanc, study_id)
        assert len(sr) == 1 and len(sr[0]["Instances"]) == 1, sr
        assert len(sc) == 1 and len(sc[0]["Instances"]) == 2, sc
    finally:
        node.stop(timeout=60)
        orthanc.stop()


@pytest.mark.dcmtk
def test_storescu_to_node_to_storescp(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    results_port = free_port()
    received = tmp_path / "storescp"
    scp = start_storescp(received, results_port, ae_title="RESULTS")
    config = PipelineConfig(
        directory=tmp_path / "node", roles=ROLES,
        peers=(Peer("modality", "STORESCU"), Peer("results", "RESULTS", port=results_port, may_send=False,
                                                   receives_results=True)),
    )
    config.model = model_for(tmp_path)
    node = NodeProcess(config).start(timeout=120)
    try:
        files = phantom_study(tmp_path / "study", 2, study_key="dcmtk")
        sent = subprocess.run([storescu, "-aet", "STORESCU", "-aec", "MSKNODE", "127.0.0.1", str(node.port),
                               *map(str, files)], env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        arrived = wait_for(lambda: (lambda f: f if len(f) == 3 else None)(sorted(received.iterdir())), 300,
                           "an SR and two SCs at storescp")
        modalities = sorted(pydicom.dcmread(io.BytesIO(p.read_bytes()), stop_before_pixels=True).Modality
                            for p in arrived)
        assert modalities == ["OT", "OT", "SR"]
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        assert {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in arrived} == {study_uid}
    finally:
        node.stop(timeout=60)
        scp.terminate()
        scp.wait(10)
