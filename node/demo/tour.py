"""``msknode demo``: the whole loop on this machine in a couple of minutes.

Starts a throw-away PACS (Orthanc if installed, else a pynetdicom Storage SCP), runs the node on the embedded
defaults in a temporary folder, sends three phantom radiograph studies (normal, fracture, lytic lesion) and, when
the demo 3-D model is there (models/demo-orthodiffusion), one knee MRI phantom study (localiser, sagittal /
coronal PD FS, axial T2 FS, sagittal T1; an ACL tear and an effusion planted), waits for the SR, secondary
captures (and, for the MRI, the SEG) to come back, and prints the SR values, where the PNG renders of the captures
are and, for the MRI study, which series fed the model per plane (the others with the reasons), the findings, the
segments and the study's priority with its reason.
"""

from __future__ import annotations

import io
import json
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
DEMO_MRI_MODEL = REPO / "models" / "demo-orthodiffusion"
MRI_LABEL = "knee MRI with an ACL tear and an effusion"
MRI_FINDINGS = ("acl_tear", "effusion")  # knee_mri_phantoms.FINDINGS names; the demo model calls both (model card)
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RESULT_CLASSES = (SC_CLASS, SEG_CLASS)


@dataclass
class DemoStudy:
    label: str
    study_uid: str
    files: list[Path]
    mri: bool = False  # an MR study: the results are one SR, one SEG and overlay SCs (not one SC per image)


def _models_toml(model: Path, knee_model: Path | None, mri_model: Path | None = None) -> str:
    """``[engine] model`` alone, or several model families: the MAE on every eligible image, the DINOv3 KL grader on
    knees (a triage rule on its KL head) and the OrthoDiffusion 3-D model on MR studies (triage rules on its ACL
    and effusion probabilities at the 0.5 operating point its findings are called at)."""
    engine = "[engine]\nthreads = 1  # the demo models are small: one torch thread is fastest (as config/msknode.toml)\n"
    if knee_model is None and mri_model is None:
        return f'{engine}model = "{model}"\n'
    text = f"""{engine}
[[models]]
name = "mae"
path = "{model}"
"""
    if mri_model is not None:
        text += f"""
[[models]]
name = "knee_mri"
path = "{mri_model}"
modalities = ["MR"]

[[triage.rules]]
name = "knee MRI: ACL tear"
when = "knee_mri.knee_ACL >= 0.5"
priority = "urgent"

[[triage.rules]]
name = "knee MRI: joint effusion"
when = "knee_mri.knee_EFFU >= 0.5"
priority = "high"
"""
    if knee_model is None:
        return text
    return text + f"""

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
                  knee_model: Path | None = None, mri_model: Path | None = None) -> None:
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

{_models_toml(model, knee_model, mri_model)}
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


def mri_input_shape(mri_model: Path) -> tuple[int, int]:
    """(size, depth) of the 3-D model's input (``input`` in its orthodiffusion.json): the phantom is rendered at
    that size so the demo stays quick on a CPU and nothing is resized."""
    spec = json.loads((mri_model / "orthodiffusion.json").read_text())["input"]
    return int(spec["size"]), int(spec["depth"])


def _mri_phantom_study(directory: Path, mri_model: Path) -> DemoStudy:
    from engines.training.knee_mri_phantoms import default_protocol, generate_study

    size, depth = mri_input_shape(mri_model)
    study = generate_study(seed=1700, findings=MRI_FINDINGS, protocol=default_protocol(size, depth))
    return DemoStudy(MRI_LABEL, study.study_instance_uid, study.write(directory), mri=True)


def _send(files: list[Path], calling: str, port: int) -> None:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    datasets = [pydicom.dcmread(f) for f in files]
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        ae.add_requested_context(sop_class, syntax)
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


def _studies_json(config: Path) -> dict[str, dict[str, object]]:
    """``msknode studies --json`` of the demo node, by Study Instance UID (the series selection and priority)."""
    listing = subprocess.run([sys.executable, "-m", "node", "studies", "--json", "--config", str(config)], cwd=REPO,
                             text=True, check=True, capture_output=True)
    return {str(row["study_instance_uid"]): row for row in json.loads(listing.stdout)}


def mri_summary_lines(row: dict[str, object] | None, seg: pydicom.Dataset | None) -> list[str]:
    """The MRI study as the node recorded it: the series chosen per plane, the rejected ones with their reasons,
    the SEG's segments and the study's priority with the rule that set it."""
    if row is None:
        return ["the node has no record of this study"]
    lines: list[str] = []
    selection = row.get("series_selection") or {}
    assert isinstance(selection, dict)
    for plane, chosen in selection.get("chosen", {}).items():
        lines.append(f"chosen for {plane}: series {chosen.get('series_number')} {chosen.get('description', '')!r} "
                     f"({chosen.get('slices')} slices)")
    for plane, why in selection.get("missing_planes", {}).items():
        lines.append(f"no series for {plane}: {why}")
    for rejected in selection.get("rejected", []):
        reasons = "; ".join(reason.get("message", "") for reason in rejected.get("reasons", [])) or "rejected"
        lines.append(f"not used: series {rejected.get('series_number')} {rejected.get('description', '')!r}: {reasons}")
    if seg is not None:
        lines.append("segments: " + ", ".join(str(item.SegmentLabel) for item in seg.SegmentSequence))
    reason = row.get("priority_reason")
    lines.append(f"priority: {row.get('priority')}" + (f" ({reason})" if reason else " (no triage rule matched)"))
    return lines


def run_demo(workdir: Path | None = None, timeout: float = 240.0, keep: bool = False,
             mri_model: Path | None = DEMO_MRI_MODEL) -> int:
    """The whole loop; ``mri_model`` is the 3-D model folder for the knee MRI study (None or a folder without
    orthodiffusion.json: radiographs only, said plainly)."""
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
    if mri_model is not None and not (Path(mri_model) / "orthodiffusion.json").is_file():
        where = Path(mri_model).relative_to(REPO) if Path(mri_model).is_relative_to(REPO) else mri_model
        console.print(f"knee MRI: no demo 3-D model in {where}; the radiographs only")
        mri_model = None
    _write_config(config, node_port, web_port, pacs_ae, pacs_port, model,
                  knee_model if (knee_model / "config.json").is_file() else None,
                  Path(mri_model) if mri_model is not None else None)
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
        if mri_model is not None:
            studies.append(_mri_phantom_study(work / "studies" / "mri", Path(mri_model)))
        for study in studies:
            if isinstance(pacs, Orthanc):
                ids = [pacs.upload(f)["ParentStudy"] for f in study.files]
                pacs.store_to("msknode", ids[0])
            else:
                _send(study.files, pacs_ae, node_port)
            console.print(f"sent: {study.label} ({len(study.files)} {'instances' if study.mri else 'images'})")
        renders = work / "renders"
        renders.mkdir(exist_ok=True)
        results = _wait_for_results(pacs, studies, timeout, console)
        recorded = _studies_json(config) if any(s.mri for s in studies) else {}
        for study in studies:
            objects = results.get(study.study_uid, [])
            console.rule(study.label)
            seg = None
            for ds in objects:
                if str(ds.SOPClassUID).startswith(SR_CLASS_PREFIX):
                    console.print(f"SR '{ds.SeriesDescription}':")
                    for line in _sr_lines(ds):
                        console.print(line)
                elif ds.SOPClassUID == SEG_CLASS:
                    seg = ds
                    console.print(f"SEG '{ds.SeriesDescription}': {len(ds.SegmentSequence)} segments")
                else:
                    png = renders / f"{ds.SOPInstanceUID}.png"
                    Image.fromarray(np.asarray(ds.pixel_array)).save(png)
                    console.print(f"SC '{ds.SeriesDescription}': {png}")
            if study.mri:
                for line in mri_summary_lines(recorded.get(study.study_uid), seg):
                    console.print(line, markup=False, highlight=False)
        elapsed = time.monotonic() - started
        console.print(f"\ndone in {elapsed:.0f} s. Work folder: {work}  (node log: {log_path})")
        console.print(f"Dashboard: http://127.0.0.1:{web_port}/  (user [bold]demo[/], password [bold]{password}[/])")
        if keep:
            console.print("--keep: the node and the PACS keep running; Ctrl-C to stop them.")
            node.wait()
        return 0 if all(_complete(results.get(s.study_uid, []), s) for s in studies) else 1
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
        pacs.stop()


def _complete(objects: list[pydicom.Dataset], study: DemoStudy) -> bool:
    """All results of a study are back: an SR and one SC per image; an MRI study: an SR, a SEG and its overlay SCs."""
    classes = [str(ds.SOPClassUID) for ds in objects]
    reports = sum(1 for uid in classes if uid.startswith(SR_CLASS_PREFIX))
    captures = classes.count(SC_CLASS)
    if study.mri:
        return reports >= 1 and classes.count(SEG_CLASS) >= 1 and captures >= 1
    return reports >= 1 and captures >= len(study.files)


def _wait_for_results(pacs, studies: list[DemoStudy], timeout: float, console: Console):  # type: ignore[no-untyped-def]
    """The node's results at the PACS (SR, SC, SEG; the studies sent are not results), by Study Instance UID."""
    deadline = time.monotonic() + timeout
    found: dict[str, list[pydicom.Dataset]] = {}
    classes: dict[str, str] = {}  # Orthanc instance id -> SOP Class UID, read once per instance
    with console.status("waiting for the results to come back to the PACS..."):
        while time.monotonic() < deadline:
            found = {}
            if isinstance(pacs, Orthanc):
                for instance_id in pacs.get("/instances"):
                    if instance_id not in classes:
                        tags = pacs.get(f"/instances/{instance_id}/simplified-tags")
                        classes[instance_id] = str(tags.get("SOPClassUID", ""))
                    if classes[instance_id].startswith(SR_CLASS_PREFIX) or classes[instance_id] in RESULT_CLASSES:
                        ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(instance_id)))
                        found.setdefault(str(ds.StudyInstanceUID), []).append(ds)
            else:
                for path in pacs.files():
                    ds = pydicom.dcmread(path)
                    found.setdefault(str(ds.StudyInstanceUID), []).append(ds)
            if all(_complete(found.get(study.study_uid, []), study) for study in studies):
                break
            time.sleep(1.0)
    return found
