"""Seconds per stage and peak memory of one knee MRI study through the node's MRI path on CPU: a 3-plane phantom
study (sagittal PD FS, coronal PD FS, axial T2 FS; 30 slices of 512 x 512 each, classic MR instances) indexed as
the receiver would, then one worker pass (headers, series selection, read and assemble, the real-shape
OrthoDiffusion model: three 64-channel plane UNets + knee head + segmentation head, then SEG, SR and the overlay
SCs, spool and outbox). Not a test: it prints figures (JSON) for docs/benchmarks.md ("Knee MRI study").

    nice -n 10 .venv/bin/python benchmarks/mri_study.py [--size 512 --slices 30] [--threads 0]

Weights are random (PyTorch's default initialisation): time and memory do not depend on their values. The
phantom study is generated in a child process, so the parent's peak RSS (``ru_maxrss``) is the node path's own:
imports, the model's fp32 weights, the instances being read and assembled, one plane's activations. DICOM
network receive is not included (benchmarks/receive.py measures it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


SEGMENTATION_CLASSES = ("background", "femur", "tibia", "patella", "cartilage", "medial_meniscus",
                        "lateral_meniscus", "acl", "pcl", "mcl", "lcl", "effusion")


def write_model(directory: Path, seed: int = 0) -> Path:
    """A random OrthoDiffusion folder at the real shape: UNet3DConfig() (64 base channels), input 16 x 256 x 256,
    a knee head with the eight labels and a 12-class segmentation head on the sagittal plane."""
    import torch
    from torch import nn

    from engines.orthodiffusion.family import KNEE_LABELS
    from engines.orthodiffusion.network import (
        SegHead3D,
        UNet3D,
        UNet3DConfig,
        layer_channels,
    )

    torch.manual_seed(seed)
    config = UNet3DConfig()
    directory.mkdir(parents=True, exist_ok=True)
    planes = []
    for plane, timestep, layer in (("sagittal", 200, "mid_0"), ("coronal", 150, "mid_0"), ("axial", 50, "mid_2")):
        torch.save(UNet3D(config).state_dict(), directory / f"{plane}.pt")
        planes.append({"name": plane, "weights": f"{plane}.pt", "timestep": timestep, "layer": layer})
    features = sum(layer_channels(config)[p["layer"]] for p in planes)
    head = nn.Sequential()
    head.net = nn.Linear(features, len(KNEE_LABELS))
    torch.save(head.state_dict(), directory / "knee_head.pt")
    torch.save(SegHead3D(layer_channels(config)["mid_2"], len(SEGMENTATION_CLASSES)).state_dict(),
               directory / "seghead.pt")
    (directory / "orthodiffusion.json").write_text(json.dumps({
        "format": "msknode-orthodiffusion/1", "name": "orthodiffusion-benchmark", "version": "random", "seed": seed,
        "unet": config.to_dict(), "input": {"depth": 16, "size": 256}, "planes": planes,
        "heads": [{"name": "knee", "file": "knee_head.pt"}],
        "segmentation": {"plane": "sagittal", "weights": "seghead.pt", "classes": len(SEGMENTATION_CLASSES),
                         "class_names": list(SEGMENTATION_CLASSES)},
    }))
    return directory


def generate(out_dir: Path, size: int, slices: int) -> None:
    """Child process: the 3-plane phantom study written as classic MR instances."""
    from engines.training.knee_mri_phantoms import default_protocol, generate_study

    protocol = default_protocol(size, slices, localizer=False, t1=False)
    generate_study(seed=17, protocol=protocol).write(out_dir)


class StageTimings(logging.Handler):
    """Collects the MRI path's per-stage seconds from its DEBUG "stage timings" line."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.stages: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("stage timings"):
            for stage, seconds in re.findall(r"([a-z ]+?) ([0-9.]+) s(?:,|$)", message.split(": ", 1)[1]):
                self.stages[stage.strip()] = float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="[engine] threads (0: torch's default)")
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)  # child process: write the study
    args = parser.parse_args()
    if args.generate:
        generate(args.generate, args.size, args.slices)
        return

    work = Path(tempfile.mkdtemp(prefix="msknode-mri-bench-"))
    try:
        result = run(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


def run(work: Path, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--generate", str(work / "study"), "--size", str(args.size),
                    "--slices", str(args.slices)], check=True)
    generate_s = time.perf_counter() - started
    rss_start = peak_rss_mib()

    import pydicom
    import torch
    from sqlalchemy import select

    import engines
    from node.pipeline.models import ConfiguredModel
    from node.pipeline.worker import Worker
    from node.settings import parse_settings
    from storage import completion
    from storage.db import Database
    from storage.intake import InstanceRecord, IntakeRepository
    from storage.job_inputs import JobInputs
    from storage.migrate import upgrade
    from storage.models import OutboxItem
    from storage.queue import JobQueue
    from storage.spool import Spool

    timings = StageTimings()
    mri_log = logging.getLogger("msknode.worker.mri")
    mri_log.setLevel(logging.DEBUG)
    mri_log.addHandler(timings)
    rss_imports = peak_rss_mib()

    folder = write_model(work / "model")
    settings = parse_settings({
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "receives_results": True}],
        "models": [{"name": "knee_mri", "path": str(folder), "modalities": ["MR"]}],
        "engine": {"threads": args.threads},
    })
    started = time.perf_counter()
    models = [ConfiguredModel(entry, engines.load(entry.path, backend="cpu")) for entry in settings.model_entries]
    load_s = time.perf_counter() - started
    rss_model = peak_rss_mib()

    url = f"sqlite:///{work}/node.db"
    upgrade(url)
    database = Database(url)
    spool = Spool(work / "spool", fsync=False)
    queue = JobQueue(database)
    worker = Worker(settings, queue, JobInputs(database), spool, models, owner="bench")
    index = IntakeRepository(database)
    association = index.association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)

    files = sorted((work / "study").rglob("*.dcm"))
    started = time.perf_counter()
    for path in files:  # as the receiver: into the spool, indexed
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        staged = spool.incoming / "rx.dcm"
        shutil.copyfile(path, staged)
        stored = spool.commit_file(staged, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        index.index_instance(InstanceRecord(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID,
            ds.file_meta.TransferSyntaxUID, None, None, ds.Modality, ds.get("BodyPartExamined"),
            int(ds.SeriesNumber), int(ds.InstanceNumber), stored.relative_path, stored.size, stored.sha256,
            "PACS", association))
    completion.tick(database, queue, lambda _ae: 0, force_complete_seconds=0)
    intake_s = time.perf_counter() - started

    started = time.perf_counter()
    handled = worker.run_once()
    worker_s = time.perf_counter() - started
    with database.session() as session:
        kinds = list(session.scalars(select(OutboxItem.kind)).all())
    outbox = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
    database.dispose()
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "study": {"planes": 3, "slices": args.slices, "rows": args.size, "columns": args.size,
                  "instances": len(files), "bytes": sum(p.stat().st_size for p in files)},
        "model": {"unet_base_channels": 64, "input": [16, 256, 256], "segmentation_classes": 12,
                  "weights_mib": round(sum(p.stat().st_size for p in folder.glob("*.pt")) / 2**20, 1)},
        "jobs_handled": handled,
        "objects_queued": outbox,
        "generate_phantom_s (child process, not node)": round(generate_s, 2),
        "model_load_s": round(load_s, 2),
        "intake_index_s": round(intake_s, 2),
        "worker_job_s": round(worker_s, 2),
        "stages_s": {stage: round(seconds, 2) for stage, seconds in timings.stages.items()},
        "peak_rss_mib": {"after_imports": round(rss_imports, 1), "after_model_load": round(rss_model, 1),
                         "after_job": round(peak_rss_mib(), 1), "at_start": round(rss_start, 1)},
    }


if __name__ == "__main__":
    main()
