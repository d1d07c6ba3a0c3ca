"""End-to-end latency: last C-STORE response -> SR arrival at the PACS, minus settle_seconds.

20 three-image studies (JPEG 2000 lossless phantoms) are sent one after another by a pynetdicom SCU to
`msknode serve` (all roles, CPU, the demo model); a pynetdicom Storage SCP in this process plays the PACS
and timestamps each arriving SR. Each study is sent once the previous one's SR has arrived, so the figure
is the pipeline's own latency, not queueing behind earlier studies. Target: p95 <= 3 s.

    .venv/bin/python benchmarks/latency.py [--studies 20] [--settle 1.0] [--model models/demo-mae]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
from pynetdicom import AE, AllStoragePresentationContexts, evt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.demo.pacs import free_port  # noqa: E402


def make_studies(directory: Path, count: int) -> list[list[Path]]:
    from engines.training import phantoms

    studies = []
    kinds = ("knee", "hand", "long_bone")
    for s in range(count):
        files = []
        for i in range(3):
            phantom = phantoms.generate(kinds[i], seed=5000 + 3 * s + i, findings=("lytic",) if (s + i) % 4 == 0 else ())
            files.append(phantoms.write_dicom(phantom, directory / f"s{s}-{i}.dcm", patient_index=s,
                                              study_key=f"latency-{s}", instance_number=i + 1,
                                              compress="jpeg2000-lossless"))
        studies.append(files)
    return studies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo-mae")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="msknode-latency-"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s); work folder {work}")
    studies = make_studies(work / "studies", args.studies)
    print(f"{len(studies)} studies x 3 JPEG 2000 lossless phantoms written")

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
[engine]
model = "{args.model.resolve()}"
[logging]
level = "WARNING"
[[peers]]
name = "pacs"
ae_title = "BENCHPACS"
host = "127.0.0.1"
port = {pacs_port}
receives_results = true
""")
    log = open(work / "node.log", "wb")
    node = subprocess.Popen([sys.executable, "-m", "node", "serve", "-c", str(config)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    scu = AE(ae_title="BENCHPACS")
    scu.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.4.90")
    latencies: list[float] = []
    try:
        deadline = time.monotonic() + 120
        while True:  # wait for the receiver
            assoc = scu.associate("127.0.0.1", node_port, ae_title="MSKNODE")
            if assoc.is_established:
                assoc.release()
                break
            if time.monotonic() > deadline or node.poll() is not None:
                raise SystemExit(f"node did not start; see {work / 'node.log'}")
            time.sleep(0.5)
        time.sleep(5)  # let the worker load the model
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
                    raise SystemExit(f"no SR for study {index} after 120 s; see {work / 'node.log'}")
            latency = arrivals[uid] - last_response - args.settle
            latencies.append(latency)
            print(f"study {index + 1:2d}: {latency:6.2f} s after settle")
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
        pacs.shutdown()
    latencies.sort()
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
    print(f"\nlatency (last C-STORE response -> SR at PACS, minus settle {args.settle:.1f} s), {len(latencies)} studies:")
    print(f"p50 {p50:.2f} s   p95 {p95:.2f} s   max {latencies[-1]:.2f} s   target p95 <= 3 s: "
          f"{'met' if p95 <= 3.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
