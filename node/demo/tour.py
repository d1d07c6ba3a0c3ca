"""``msknode demo``: the whole loop on this machine in a couple of minutes.

Starts a throw-away PACS (Orthanc if installed, else a pynetdicom Storage SCP), runs the node on the embedded
defaults in a temporary folder, sends three phantom radiograph studies (normal, fracture, lytic lesion) and, when
the demo 3-D model is there (models/demo-orthodiffusion), one knee MRI phantom study (localiser, sagittal /
coronal PD FS, axial T2 FS, sagittal T1; an ACL tear and an effusion planted), waits for the SR, secondary
captures (and, for the MRI, the SEG) to come back, and prints the SR values, where the PNG renders of the captures
are and, for the MRI study, which series fed the model per plane (the others with the reasons), the findings, the
segments and the study's priority with its reason.

Triage is on, as in config/msknode.toml: a fracture or a lytic lesion makes a radiograph study urgent, a sclerotic
lesion high (the MAE's heads at 0.5). A small webhook receiver on 127.0.0.1 stands in for the hospital's pager,
so the urgent studies are announced as a site would see them; the summary gives every study's priority with the
rule that set it, then the worklist in the dashboard's order (most urgent first).
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
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
# The radiographs' triage (config/msknode.toml has the same rules, in the same order, before the knee ones): the MAE's
# heads at 0.5, the operating point of calibrated heads (models/README.md). (name, MAE output, threshold, priority).
MAE_TRIAGE_RULES = (
    ("fracture", "fracture", 0.5, "urgent"),
    ("lytic bone lesion", "lesion_lytic", 0.5, "urgent"),
    ("sclerotic bone lesion", "lesion_sclerotic", 0.5, "high"),
)
NOTIFICATION_WAIT_SECONDS = 15.0  # the sender posts them as it delivers the results; bounded, the demo never hangs


@dataclass
class DemoStudy:
    label: str
    study_uid: str
    files: list[Path]
    mri: bool = False  # an MR study: the results are one SR, one SEG and overlay SCs (not one SC per image)


def mae_triage_toml(prefix: str) -> str:
    """The MAE's triage rules (``MAE_TRIAGE_RULES``); ``prefix`` is ``"mae."`` with several models, ``""`` with
    ``[engine] model`` alone (the bare names are the only model's)."""
    return "".join(f"""
[[triage.rules]]
name = "{name}"
when = "{prefix}{output} >= {threshold}"
priority = "{priority}"
""" for name, output, threshold, priority in MAE_TRIAGE_RULES)


def _models_toml(model: Path, knee_model: Path | None, mri_model: Path | None = None) -> str:
    """``[engine] model`` alone, or several model families: the MAE on every eligible image (triage rules on its
    fracture and lesion heads, first), the DINOv3 KL grader on knees (a triage rule on its KL head) and the
    OrthoDiffusion 3-D model on MR studies (triage rules on its ACL and effusion probabilities at the 0.5 operating
    point its findings are called at)."""
    engine = "[engine]\nthreads = 1  # the demo models are small: one torch thread is fastest (as config/msknode.toml)\n"
    if knee_model is None and mri_model is None:
        return f'{engine}model = "{model}"\n{mae_triage_toml("")}'
    text = f"""{engine}
[[models]]
name = "mae"
path = "{model}"
{mae_triage_toml("mae.")}"""
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


def _notifications_toml(webhook_url: str | None, web_port: int) -> str:
    """Urgent studies announced to the demo's webhook receiver (no PHI: the payload names the study by its UID and a
    dashboard link); quick retries, the demo is short."""
    if webhook_url is None:
        return ""
    return f"""
[notifications]
min_priority = "urgent"
dashboard_url = "http://127.0.0.1:{web_port}"
backoff_seconds = [1.0, 2.0, 5.0]

[[notifications.webhooks]]
url = "{webhook_url}"
timeout_seconds = 5.0
"""


def _write_config(path: Path, node_port: int, web_port: int, pacs_ae: str, pacs_port: int, model: Path,
                  knee_model: Path | None = None, mri_model: Path | None = None,
                  webhook_url: str | None = None) -> None:
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

{_models_toml(model, knee_model, mri_model)}{_notifications_toml(webhook_url, web_port)}
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
    lines.append(priority_line(row))
    return lines


def priority_line(row: dict[str, object] | None) -> str:
    """``priority: urgent (fracture)``: the study's priority and the triage rule that set it, as the node recorded
    them (``msknode studies --json``)."""
    if row is None:
        return "priority: unknown (the node has no record of this study)"
    from node.pipeline.triage import NO_RULE_MATCHED

    return f"priority: {row.get('priority')} ({row.get('priority_reason') or NO_RULE_MATCHED})"


def worklist_lines(config: Path, labels: dict[str, str]) -> list[str]:
    """The studies in the dashboard's worklist order (``DashboardData.studies``, the query behind its Studies page:
    most urgent first, then the most recently received), one line each: position, priority, reason, the demo's
    label (never a patient name or identifier)."""
    from node.pipeline.triage import NO_RULE_MATCHED
    from node.settings import load_settings
    from node.web.data import DashboardData
    from storage.db import Database

    settings = load_settings(config)
    database = Database(settings.storage.database_url)
    try:
        rows = DashboardData(database, [(entry.name, entry.path) for entry in settings.model_entries]).studies()
    finally:
        database.dispose()
    return [f"{position}. {row.priority:<7} {labels.get(row.study_instance_uid, 'a study the demo did not send')} "
            f"({row.priority_reason or NO_RULE_MATCHED})" for position, row in enumerate(rows, start=1)]


class NotificationReceiver:
    """A stand-in for the site's webhook endpoint (pager, chat bridge): a stdlib HTTP server on 127.0.0.1 in a
    thread that keeps each JSON POST the node's notifier sends, so the demo can show the announcements."""

    def __init__(self) -> None:
        self.received: list[dict[str, object]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the name http.server calls
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    payload = json.loads(body)
                except ValueError:
                    self.send_response(400)
                    self.end_headers()
                    return
                with receiver._lock:
                    receiver.received.append(payload)
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: the demo prints its own lines

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free one, no race
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-webhook", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/msknode"

    def start(self) -> NotificationReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def payloads(self) -> list[dict[str, object]]:
        with self._lock:
            return list(self.received)

    def wait_for(self, study_uids: set[str], timeout: float) -> list[dict[str, object]]:
        """The notifications received once every study in ``study_uids`` has one, or at ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if study_uids <= {str(p.get("study_instance_uid")) for p in self.payloads()}:
                break
            time.sleep(0.2)
        return self.payloads()


def notification_lines(payloads: list[dict[str, object]], labels: dict[str, str]) -> list[str]:
    """One line per notification received: its priority, the rule and the demo's label of the study (the payload
    names the study by UID only; no PHI is printed)."""
    lines = []
    for payload in payloads:
        findings = payload.get("findings")
        rule = (findings.get("rule") if isinstance(findings, dict) else None) or "no rule"
        label = labels.get(str(payload.get("study_instance_uid")), "a study the demo did not send")
        lines.append(f"notification received: {str(payload.get('priority', '')).lower()} ({rule}) for {label}")
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
    receiver = NotificationReceiver()  # bound now (its URL goes into the config), serving once the node runs
    _write_config(config, node_port, web_port, pacs_ae, pacs_port, model,
                  knee_model if (knee_model / "config.json").is_file() else None,
                  Path(mri_model) if mri_model is not None else None, webhook_url=receiver.url)
    password = _create_demo_user(config)
    log_path = work / "node.log"
    # the webhook is on this machine: never through a proxy the environment may name
    no_proxy = ",".join(filter(None, (os.environ.get("no_proxy") or os.environ.get("NO_PROXY"), "127.0.0.1")))
    with open(log_path, "wb") as log:
        node = subprocess.Popen([sys.executable, "-m", "node", "serve", "--config", str(config)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", no_proxy=no_proxy, NO_PROXY=no_proxy))
    started = time.monotonic()
    receiver.start()
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
        recorded = _studies_json(config)
        labels = {study.study_uid: study.label for study in studies}
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
            else:
                console.print(priority_line(recorded.get(study.study_uid)), markup=False, highlight=False)
        urgent = {uid for uid in labels if (recorded.get(uid) or {}).get("priority") == "urgent"}
        with console.status("waiting for the urgent studies' notifications (webhook)..."):
            payloads = receiver.wait_for(urgent, NOTIFICATION_WAIT_SECONDS) if urgent else receiver.payloads()
        console.rule(f"Notifications (min_priority urgent, webhook {receiver.url})")
        quiet = ["no notification: no study reached urgent"] if not urgent else []
        for line in notification_lines(payloads, labels) or quiet:
            console.print(line, markup=False, highlight=False)
        missing = urgent - {str(p.get("study_instance_uid")) for p in payloads}
        if missing:
            console.print(f"not announced within {NOTIFICATION_WAIT_SECONDS:.0f} s: "
                          + ", ".join(labels[uid] for uid in sorted(missing)) + f" (see {log_path})",
                          markup=False, highlight=False)
        console.rule("Worklist (the dashboard's order: most urgent first, then the latest received)")
        for line in worklist_lines(config, labels):
            console.print(line, markup=False, highlight=False)
        elapsed = time.monotonic() - started
        console.print(f"\ndone in {elapsed:.0f} s. Work folder: {work}  (node log: {log_path})")
        console.print(f"Dashboard: http://127.0.0.1:{web_port}/  (user [bold]demo[/], password [bold]{password}[/])")
        if keep:
            console.print("--keep: the node and the PACS keep running; Ctrl-C to stop them.")
            node.wait()
        return 0 if all(_complete(results.get(s.study_uid, []), s) for s in studies) else 1
    finally:
        receiver.stop()
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
