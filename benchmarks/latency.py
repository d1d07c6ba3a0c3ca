"""End-to-end latency: last C-STORE response -> SR arrival at the PACS, minus settle_seconds.

Two sets of three-image JPEG 2000 lossless studies are sent one after another by a pynetdicom SCU to one
`msknode serve` (all roles, CPU, the models of config/msknode.toml: the demo MAE on every image, the demo DINOv3
KL grader on knees); a pynetdicom Storage SCP in this process plays the PACS and timestamps each arriving SR.

- **phantom**: knee, hand and long bone phantoms at their native 512 x 448 / 416 / 320 px (0.23 MP);
- **real-size**: three knee radiographs at 2500 x 2048 (5.1 MP, 12 bits), what a DR detector produces: phantoms
  resampled to that matrix with detector noise added, so that they compress about 2.5:1 lossless like real
  radiographs (decode cost follows the compressed size). All three are knees, so both models run on every image.
  Each carries a VOI window (Window Centre / Width) over the 1st-99th percentile of its pixels, as a detector
  writes one (DX For Presentation requires it): the window, not the image's min / max, sets the grey range, so
  the node may decode the J2K at 1/4 size for the model and the overlay (docs/preprocessing.md). Without a
  window it decodes at full size.

Each study is sent once the previous one's SR has arrived, so the figure is the pipeline's own latency, not
queueing behind earlier studies. Target: p95 <= 3 s. ``--profile`` runs the node's worker at DEBUG level and
prints what each stage of the worker cost per study (its ``stage timings`` log lines), medians per set.

    .venv/bin/python benchmarks/latency.py [--studies 20] [--real-studies 20] [--settle 1.0] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.demo.pacs import free_port  # noqa: E402

REAL_ROWS, REAL_COLUMNS = 2500, 2048
#: Detector noise (12-bit stored values, sd) added after resampling: gives about 2.5:1 lossless J2K, as real CRs.
REAL_NOISE_SD = 16.0


def make_phantom_studies(directory: Path, count: int) -> list[list[Path]]:
    from engines.training import phantoms

    studies = []
    kinds = ("knee", "hand", "long_bone")
    for s in range(count):
        files = []
        for i in range(3):
            findings = ("lytic",) if (s + i) % 4 == 0 else ()
            phantom = phantoms.generate(kinds[i], seed=5000 + 3 * s + i, findings=findings)
            files.append(phantoms.write_dicom(phantom, directory / f"s{s}-{i}.dcm", patient_index=s,
                                              study_key=f"latency-{s}", instance_number=i + 1,
                                              compress="jpeg2000-lossless"))
        studies.append(files)
    return studies


def real_size_pixels(pixels: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """A phantom resampled (aspect kept, bicubic) to 2500 rows, padded or cropped to 2048 columns, plus noise.

    Returns the 12-bit pixels and the scale factor (for the pixel spacing).
    """
    from PIL import Image

    rows, columns = pixels.shape
    scale = REAL_ROWS / rows
    width = round(columns * scale)
    resampled = np.asarray(Image.fromarray(pixels.astype(np.float32), mode="F").resize(
        (width, REAL_ROWS), Image.Resampling.BICUBIC))
    if width < REAL_COLUMNS:
        left = (REAL_COLUMNS - width) // 2
        resampled = np.pad(resampled, ((0, 0), (left, REAL_COLUMNS - width - left)), mode="edge")
    else:
        left = (width - REAL_COLUMNS) // 2
        resampled = resampled[:, left:left + REAL_COLUMNS]
    noisy = resampled + np.random.default_rng(seed).normal(0.0, REAL_NOISE_SD, resampled.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 4095).astype(np.uint16), scale


def detector_window(pixels: np.ndarray) -> tuple[int, int]:
    """Window Centre / Width over the 1st-99th percentile of the pixels, as a DR detector's processing sets one:
    background and collimation clip below it, dense bone edges above."""
    low, high = np.percentile(pixels, [1.0, 99.0])
    return int(round((low + high) / 2)), max(2, int(round(high - low)))


def make_real_size_studies(directory: Path, count: int) -> list[list[Path]]:
    """``count`` studies of three 2500 x 2048 J2K lossless knees; the three images are encoded once (about 1 s
    each) and every study re-uses their codestreams under its own patient, study, series and instance UIDs."""
    from engines.training import phantoms

    bases = []
    for i, (seed, findings) in enumerate(((7100, ("lytic",)), (7101, ()), (7102, ()))):
        phantom = phantoms.generate("knee", seed=seed, findings=findings, laterality="RL"[i % 2])
        pixels, scale = real_size_pixels(phantom.pixels, seed)
        big = dataclasses.replace(phantom, pixels=pixels, findings=[],
                                  pixel_spacing=(phantom.pixel_spacing[0] / scale, phantom.pixel_spacing[1] / scale))
        base = phantoms.to_dataset(big, patient_index=0, study_key="latency-real", instance_number=i + 1,
                                   compress="jpeg2000-lossless")
        base.WindowCenter, base.WindowWidth = detector_window(pixels)
        bases.append(base)
    studies = []
    for s in range(count):
        study_uid, series_uid = generate_uid(entropy_srcs=["real", str(s)]), generate_uid(entropy_srcs=["rs", str(s)])
        files = []
        for i, base in enumerate(bases):
            ds = copy.copy(base)  # shallow: the codestream is shared, the changed elements are new
            ds.file_meta = copy.deepcopy(base.file_meta)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = generate_uid(entropy_srcs=["real", str(s), str(i)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID, ds.PatientName = f"REAL{s:06d}", f"PHANTOM^REAL^{s:04d}"
            ds.AccessionNumber = f"RL{s:08d}"
            path = directory / f"r{s}-{i}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        studies.append(files)
    return studies


def models_toml(model: Path | None) -> str:
    """The [engine] keys and [[models]] of config/msknode.toml, paths made absolute (or one ``--model``)."""
    if model is not None:
        return f'[engine]\nmodel = "{model.resolve()}"\n'
    config = tomllib.loads((REPO / "config" / "msknode.toml").read_text())
    lines = ["[engine]"] + [f"{key} = {value!r}".replace("'", '"').replace("True", "true").replace("False", "false")
                            for key, value in config.get("engine", {}).items()]
    for entry in config["models"]:
        lines.append("[[models]]")
        for key, value in entry.items():
            if key == "path":
                value = str((REPO / value).resolve())
            lines.append(f"{key} = {value!r}".replace("'", '"'))
    return "\n".join(lines) + "\n"


def percentile95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


#: "stage timings job 3: headers 0.004 s, read 0.01 s, ..." from the worker's DEBUG log.
_STAGES = re.compile(r"stage timings job (\d+): (.*)$")


def stage_timings(log_path: Path) -> list[dict[str, float]]:
    """The worker's per-job stage timings, in job order."""
    rows = []
    for line in log_path.read_text(errors="replace").splitlines():
        match = _STAGES.search(line)
        if match:
            rows.append({name: float(value) for name, value in
                         (part.strip().rsplit(" ", 2)[:2] for part in match.group(2).split(","))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20, help="phantom-size studies (0: skip the set)")
    parser.add_argument("--real-studies", type=int, default=20, help="real-size (3 x 5 MP) studies (0: skip)")
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--model", type=Path, default=None,
                        help="one model folder instead of config/msknode.toml's [[models]]")
    parser.add_argument("--profile", action="store_true",
                        help="worker at DEBUG level: print per-stage medians from its stage timings")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="msknode-latency-"))
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), load average "
          f"{load[0]:.1f}; work folder {work}")
    print("models:", "--model " + str(args.model) if args.model else
          "config/msknode.toml's [engine] and [[models]] (mae + knee)")
    sets: list[tuple[str, list[list[Path]]]] = []
    started = time.perf_counter()
    if args.studies:
        sets.append(("phantom 3 x 0.23 MP", make_phantom_studies(work / "phantom", args.studies)))
    if args.real_studies:
        real = make_real_size_studies(work / "real", args.real_studies)
        sets.append((f"real-size 3 x {REAL_ROWS}x{REAL_COLUMNS}", real))
    print(f"studies written in {time.perf_counter() - started:.0f} s: "
          + ", ".join(f"{len(studies)} x {name}" for name, studies in sets) + " (JPEG 2000 lossless)")

    arrivals: dict[str, float] = {}
    arrived = threading.Condition()

    def on_store(event):  # type: ignore[no-untyped-def]
        ds = event.dataset
        if ds.Modality == "SR":
            with arrived:
                arrivals.setdefault(str(ds.StudyInstanceUID), time.perf_counter())
                arrived.notify_all()
        return 0x0000

    pacs_ae = AE(ae_title="BENCHPACS")
    pacs_ae.supported_contexts = AllStoragePresentationContexts
    pacs_port = free_port()
    pacs = pacs_ae.start_server(("127.0.0.1", pacs_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    node_port = free_port()
    config = work / "msknode.toml"
    config.write_text(f"""[node]
ae_title = "MSKNODE"
host = "127.0.0.1"
port = {node_port}
[storage]
database_url = "sqlite:///{work / 'db.sqlite'}"
spool_dir = "{work / 'spool'}"
min_free_disk_mb = 100
[pipeline]
settle_seconds = {args.settle}
poll_seconds = 0.2
[logging]
level = "{'DEBUG' if args.profile else 'WARNING'}"
[[peers]]
name = "pacs"
ae_title = "BENCHPACS"
host = "127.0.0.1"
port = {pacs_port}
receives_results = true
{models_toml(args.model)}""")
    log_path = work / "node.log"
    log = open(log_path, "wb")
    node = subprocess.Popen([sys.executable, "-m", "node", "serve", "-c", str(config)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    scu = AE(ae_title="BENCHPACS")
    scu.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.4.90")
    results: list[tuple[str, list[float], int]] = []
    jobs_seen = 0
    try:
        deadline = time.monotonic() + 120
        while True:  # wait for the receiver
            assoc = scu.associate("127.0.0.1", node_port, ae_title="MSKNODE")
            if assoc.is_established:
                assoc.release()
                break
            if time.monotonic() > deadline or node.poll() is not None:
                raise SystemExit(f"node did not start; see {log_path}")
            time.sleep(0.5)
        time.sleep(5)  # let the worker load the models
        for name, studies in sets:
            print(f"\n{name}:")
            latencies: list[float] = []
            for index, files in enumerate(studies):
                datasets = [pydicom.dcmread(f) for f in files]
                uid = str(datasets[0].StudyInstanceUID)
                assoc = scu.associate("127.0.0.1", node_port, ae_title="MSKNODE")
                for ds in datasets:
                    status = assoc.send_c_store(ds)
                    assert status and status.Status == 0, status
                last_response = time.perf_counter()
                assoc.release()
                with arrived:
                    if not arrived.wait_for(lambda: uid in arrivals, timeout=120):
                        raise SystemExit(f"no SR for study {index} after 120 s; see {log_path}")
                latency = arrivals[uid] - last_response - args.settle
                latencies.append(latency)
                print(f"study {index + 1:2d}: {latency:6.2f} s after settle")
            results.append((name, latencies, jobs_seen))
            jobs_seen += len(studies)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
        pacs.shutdown()

    timings = stage_timings(log_path) if args.profile else []
    print(f"\nlatency (last C-STORE response -> SR at PACS, minus settle {args.settle:.1f} s):")
    print("| set | studies | p50 | p95 | max | target p95 <= 3 s |")
    print("|---|---|---|---|---|---|")
    for name, latencies, _ in results:
        p95 = percentile95(latencies)
        print(f"| {name} | {len(latencies)} | {statistics.median(latencies):.2f} s | {p95:.2f} s | "
              f"{max(latencies):.2f} s | {'met' if p95 <= 3.0 else 'NOT met'} |")
    if timings:
        print("\nworker stage timings, median seconds per study (DEBUG log):")
        for name, latencies, first in results:
            rows = timings[first:first + len(latencies)]
            if rows:
                stages = list(rows[0])
                print(f"{name}: " + ", ".join(
                    f"{stage} {statistics.median(r.get(stage, 0.0) for r in rows):.3f}" for stage in stages))


if __name__ == "__main__":
    main()
