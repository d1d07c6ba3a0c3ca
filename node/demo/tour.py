"""``msknode demo``: the whole loop on this machine in a couple of minutes.

Starts a throw-away PACS (Orthanc if installed, else a pynetdicom Storage SCP), runs the node on the embedded
defaults in a temporary folder, sends three phantom studies (normal, fracture, lytic lesion), waits for the SR
and secondary captures to come back, and prints the SR values and where the PNG renders of the captures are.
"""

from __future__ import annotations

import io
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from rich.console import Console

from node.demo.pacs import ORTHANC_AE, FolderPACS, Orthanc, free_port, orthanc_binary

REPO = Path(__file__).resolve().parents[2]
DEMO_STUDIES = (
    ("normal knee", "knee", ()),
    ("long bone with a fracture", "long_bone", ("fracture",)),
    ("knee with a lytic lesion", "knee", ("lytic",)),
)


@dataclass
class DemoStudy:
    label: str
    study_uid: str
    files: list[Path]


def _models_toml(model: Path, knee_model: Path | None) -> str:
    """``[engine] model`` alone, or two model families: the MAE on every eligible image and the DINOv3 KL grader on
    knees, with a triage rule on its KL head."""
    if knee_model is None:
        return f'[engine]\nmodel = "{model}"\n'
    return f"""[[models]]
name = "mae"
path = "{model}"

[[models]]
name = "knee"
path = "{knee_model}"
body_parts = ["KNEE"]
modalities = ["CR", "DX"]
heads = ["kl_grade"]

[[triage.rules]]
name = "severe knee osteoarthritis"
when = "knee.kl_grade == '4'"
priority = "high"
"""


def _write_config(path: Path, node_port: int, web_port: int, pacs_ae: str, pacs_port: int, model: Path,
                  knee_model: Path | None = None) -> None:
    work = path.parent
    path.write_text(
        f"""[node]
ae_title = "MSKNODE"
host = "127.0.0.1"
port = {node_port}

[storage]
database_url = "sqlite:///{work / 'msknode.db'}"
spool_dir = "{work / 'spool'}"
min_free_disk_mb = 100

[pipeline]
settle_seconds = 1.0
poll_seconds = 0.5

{_models_toml(model, knee_model)}
[web]
host = "127.0.0.1"
port = {web_port}
secret_key_file = "{work / 'web-secret'}"

[logging]
level = "INFO"

[[peers]]
name = "demo-pacs"
ae_title = "{pacs_ae}"
host = "127.0.0.1"
port = {pacs_port}
may_send = true
receives_results = true
"""
    )


def _phantom_studies(directory: Path) -> list[DemoStudy]:
    from engines.training import phantoms

    studies = []
    for index, (label, kind, findings) in enumerate(DEMO_STUDIES):
        files = []
        for instance in range(2):
            phantom = phantoms.generate(kind, seed=1000 + 10 * index + instance, findings=findings)
            files.append(phantoms.write_dicom(phantom, directory / f"study{index}-{instance}.dcm",
                                              patient_index=index, study_key=f"demo-{index}", instance_number=instance + 1))
        uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        studies.append(DemoStudy(label, str(uid), files))
    return studies


def _send(files: list[Path], calling: str, port: int) -> None:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MSKNODE")
    if not assoc.is_established:
        raise RuntimeError("the node refused the demo association")
    try:
        for ds in datasets:
            assoc.send_c_store(ds)
    finally:
        assoc.release()


def _sr_lines(report: pydicom.Dataset) -> list[str]:
    lines: list[str] = []

    def walk(items, depth: int) -> None:  # type: ignore[no-untyped-def]
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            kind = item.get("ValueType")
            if kind == "NUM" and "MeasuredValueSequence" in item:
                value = item.MeasuredValueSequence[0]
                lines.append(f"{'  ' * depth}{name}: {float(value.NumericValue):.4g}")
            elif kind == "CODE":
                lines.append(f"{'  ' * depth}{name}: {item.ConceptCodeSequence[0].CodeMeaning}")
            elif kind == "TEXT" and name.lower() in ("finding", "reason", "comment"):
                lines.append(f"{'  ' * depth}{name}: {item.TextValue}")
            if "ContentSequence" in item and kind == "CONTAINER":
                lines.append(f"{'  ' * depth}[{name}]")
                walk(item.ContentSequence, depth + 1)

    walk(report.get("ContentSequence", []), 1)
    return lines


def _create_demo_user(config: Path) -> str:
    """An admin account for the demo's dashboard, with a random password printed at the end."""
    password = secrets.token_urlsafe(9)
    subprocess.run([sys.executable, "-m", "node", "users", "add", "demo", "--role", "admin", "--password-stdin",
                    "--config", str(config)], cwd=REPO, input=password + "\n", text=True, check=True,
                   capture_output=True)
    return password


def run_demo(workdir: Path | None = None, timeout: float = 240.0, keep: bool = False) -> int:
    console = Console()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="msknode-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    model = REPO / "models" / "demo-mae"
    if not (model / "config.json").is_file():
        console.print(f"[red]the demo model is missing[/] ({model}); it is built by benchmarks/demo_model.py")
        return 1
    node_port = free_port()
    use_orthanc = orthanc_binary() is not None
    if use_orthanc:
        pacs: Orthanc | FolderPACS = Orthanc(work / "orthanc", {"msknode": ("MSKNODE", "127.0.0.1", node_port)}).start()
        pacs_ae, pacs_port = ORTHANC_AE, pacs.dicom_port
        console.print(f"PACS: Orthanc on 127.0.0.1:{pacs_port} (web UI http://127.0.0.1:{pacs.http_port})")
    else:
        pacs = FolderPACS(work / "pacs")
        pacs_ae, pacs_port = pacs.ae_title, pacs.port
        console.print(f"PACS: Orthanc not installed; a pynetdicom Storage SCP on 127.0.0.1:{pacs_port} -> {work / 'pacs'}")
    config = work / "msknode.toml"
    web_port = free_port()
    knee_model = REPO / "models" / "demo-dinov3"  # the second family (DINOv3, KL grade on knees), when present
    _write_config(config, node_port, web_port, pacs_ae, pacs_port, model,
                  knee_model if (knee_model / "config.json").is_file() else None)
    password = _create_demo_user(config)
    log_path = work / "node.log"
    with open(log_path, "wb") as log:
        node = subprocess.Popen([sys.executable, "-m", "node", "serve", "--config", str(config)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    started = time.monotonic()
    try:
        with console.status("starting the node (receiver, scheduler, worker, sender, web)..."):
            while "listening as" not in log_path.read_text(errors="replace"):
                if node.poll() is not None or time.monotonic() - started > 120:
                    console.print(f"[red]the node did not start[/]; see {log_path}")
                    return 1
                time.sleep(0.2)
        studies = _phantom_studies(work / "studies")
        for study in studies:
            if isinstance(pacs, Orthanc):
                ids = [pacs.upload(f)["ParentStudy"] for f in study.files]
                pacs.store_to("msknode", ids[0])
            else:
                _send(study.files, pacs_ae, node_port)
            console.print(f"sent: {study.label} ({len(study.files)} images)")
        renders = work / "renders"
        renders.mkdir(exist_ok=True)
        results = _wait_for_results(pacs, studies, timeout, console)
        for study in studies:
            objects = results.get(study.study_uid, [])
            console.rule(study.label)
            for ds in objects:
                if ds.Modality == "SR":
                    console.print(f"SR '{ds.SeriesDescription}':")
                    for line in _sr_lines(ds):
                        console.print(line)
                else:
                    png = renders / f"{ds.SOPInstanceUID}.png"
                    Image.fromarray(np.asarray(ds.pixel_array)).save(png)
                    console.print(f"SC '{ds.SeriesDescription}': {png}")
        elapsed = time.monotonic() - started
        console.print(f"\ndone in {elapsed:.0f} s. Work folder: {work}  (node log: {log_path})")
        console.print(f"Dashboard: http://127.0.0.1:{web_port}/  (user [bold]demo[/], password [bold]{password}[/])")
        if keep:
            console.print("--keep: the node and the PACS keep running; Ctrl-C to stop them.")
            node.wait()
        return 0 if all(results.get(s.study_uid) for s in studies) else 1
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
        pacs.stop()


def _wait_for_results(pacs, studies: list[DemoStudy], timeout: float, console: Console):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    wanted = {s.study_uid: len(s.files) for s in studies}
    found: dict[str, list[pydicom.Dataset]] = {}
    with console.status("waiting for the results to come back to the PACS..."):
        while time.monotonic() < deadline:
            found = {}
            if isinstance(pacs, Orthanc):
                for instance_id in pacs.get("/instances"):
                    tags = pacs.get(f"/instances/{instance_id}/simplified-tags")
                    if tags.get("Modality") in ("SR", "OT"):
                        ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(instance_id)))
                        found.setdefault(str(ds.StudyInstanceUID), []).append(ds)
            else:
                for path in pacs.files():
                    ds = pydicom.dcmread(path)
                    found.setdefault(str(ds.StudyInstanceUID), []).append(ds)
            if all(
                sum(1 for d in found.get(uid, []) if d.Modality == "SR") >= 1
                and sum(1 for d in found.get(uid, []) if d.Modality == "OT") >= count
                for uid, count in wanted.items()
            ):
                break
            time.sleep(1.0)
    return found
