"""Knee MRI, the product loop with real peers (issue #17): Orthanc (the PACS) pushes a phantom knee MRI study to the
node (every role, a tiny random OrthoDiffusion model as its one configured model), the node is killed (SIGKILL)
while the worker is about to record the results, restarted, and Orthanc gains exactly one SEG, one SR and one SC
series in the same study; ``msknode studies --json`` shows which series were chosen and why the localiser and the
sagittal T1 were not."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from tests.helpers.models import tiny_orthodiffusion
from tests.helpers.node import NodeConfig, NodeProcess, Peer, free_port, wait_for
from tests.helpers.orthanc import ORTHANC_AE, Orthanc

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ROLES = ("receiver", "scheduler", "worker", "sender")


class MriNodeConfig(NodeConfig):
    """A node whose one model is a 3-D knee MRI model (``[[models]]``), fast settle, results to the PACS."""

    model: Path = Path()

    def write(self) -> Path:
        path = super().write()
        text = path.read_text().replace(
            "[pipeline]\n",
            "[pipeline]\nsettle_seconds = 1.0\nforce_complete_seconds = 300.0\npoll_seconds = 0.5\n"
            "lease_seconds = 30.0\n",
        )
        text += (
            "\n[engine]\nbatch_size = 1\nseed = 0\n"
            f'\n[[models]]\nname = "knee_mri"\npath = "{self.model}"\nmodalities = ["MR"]\n'
            "\n[sender]\nbackoff_seconds = [1.0, 2.0]\ntimeout_seconds = 20.0\n"
        )
        path.write_text(text)
        return path


def series_by_modality(orthanc: Orthanc, study_id: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for series in orthanc.study_series(study_id):
        found.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
    return found


def test_orthanc_gains_one_seg_one_sr_and_one_sc_series_after_a_kill(tmp_path: Path, monkeypatch) -> None:
    from engines.training.knee_mri_phantoms import default_protocol, generate_study

    monkeypatch.setenv("MSKNODE_FAULTS", "worker.before_finish=sleep:8")
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", {"msknode": ("MSKNODE", "127.0.0.1", node_port)}).start()
    config = MriNodeConfig(directory=tmp_path / "node", port=node_port, roles=ROLES,
                           peers=(Peer("pacs", ORTHANC_AE, port=orthanc.dicom_port, receives_results=True),))
    config.model = tiny_orthodiffusion(tmp_path / "od-tiny")
    node = NodeProcess(config).start(timeout=120)
    try:
        study = generate_study(seed=11, protocol=default_protocol(64, 16))
        files = study.write(tmp_path / "study")
        study_id = orthanc.upload(files[0])["ParentStudy"]
        for path in files[1:]:
            orthanc.upload(path)
        sources = len(study.series)
        assert len(orthanc.study_series(study_id)) == sources
        orthanc.store_to("msknode", study_id)
        wait_for(lambda: "fault point worker.before_finish" in node.log(), 240, "the worker to reach the fault point",
                 0.2)
        node.kill()
        assert len(orthanc.study_series(study_id)) == sources  # nothing was sent before the kill
        monkeypatch.delenv("MSKNODE_FAULTS")
        node.start(timeout=120)
        wait_for(lambda: (lambda m: m if "SEG" in m and "SR" in m and len(orthanc.study_series(study_id)) >= sources + 3
                          else None)(series_by_modality(orthanc, study_id)), 300, "SEG, SR and SC at Orthanc")
        time.sleep(5)  # anything sent twice would show up now
        series = orthanc.study_series(study_id)
        by_modality = series_by_modality(orthanc, study_id)
        assert len(series) == sources + 3, [s["MainDicomTags"] for s in series]
        assert len(by_modality["SEG"]) == 1 and len(by_modality["SEG"][0]["Instances"]) == 1
        assert len(by_modality["SR"]) == 1 and len(by_modality["SR"][0]["Instances"]) == 1
        source_uids = {s.series_instance_uid for s in study.series}
        results = [s for s in series if s["MainDicomTags"]["SeriesInstanceUID"] not in source_uids]
        sc = [s for s in results if s["MainDicomTags"].get("Modality") not in ("SEG", "SR")]
        assert len(sc) == 1 and len(sc[0]["Instances"]) >= 3
        seg = pydicom.dcmread(io.BytesIO(orthanc.instance_file(by_modality["SEG"][0]["Instances"][0])))
        assert seg.StudyInstanceUID == study.study_instance_uid
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.by_name("sag_pd_fs").series_instance_uid
        assert all(s["MainDicomTags"]["SeriesDescription"].startswith("AI") for s in results)

        listed = subprocess.run([sys.executable, "-m", "node", "studies", "--json", "-c", str(config.path)],
                                capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ})
        assert listed.returncode == 0, listed.stderr
        row = next(r for r in json.loads(listed.stdout) if r["study_instance_uid"] == study.study_instance_uid)
        assert row["status"] == "done"
        chosen = {plane: item["description"] for plane, item in row["series_selection"]["chosen"].items()}
        assert chosen == {"sagittal": "SAG PD FS TSE", "coronal": "COR PD FS TSE", "axial": "AX T2 FS TSE"}
        rejected = {item["description"]: item["reasons"] for item in row["series_selection"]["rejected"]}
        assert set(rejected) == {"3-PLANE LOC", "SAG T1 TSE"} and all(rejected.values())
        text = subprocess.run([sys.executable, "-m", "node", "studies", "-c", str(config.path)],
                              capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ})
        assert "sagittal: series 2 'SAG PD FS TSE'" in text.stdout, text.stdout
    finally:
        node.stop(timeout=60)
        orthanc.stop()
