"""Load: concurrent senders push instances into the node while its worker runs inference.

8 sending processes (pynetdicom SCUs, TCP_NODELAY, one association per 20-instance study) x 200 instances
each go to ``msknode serve`` (receiver, scheduler and worker roles, each its own process, SQLite index,
fsync on) while the worker analyses the studies that arrived before and during the run with the demo model.
Prints each C-STORE's response time (send -> response) as p50 / p95 / p99 / max and checks that every
acknowledged instance is stored exactly once (index rows and spool files).

    .venv/bin/python benchmarks/load.py [--senders 8] [--instances 200] [--size 256] [--model models/demo-mae]

Target: p99 < 200 ms (inference never runs in the receiver's process).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.reliability.harness import SENDER_TOOLS, machine_description, percentile, run_load  # noqa: E402


def run_storescp_peer(directory: Path, senders: int, per_sender: int, per_study: int, size: int,
                      sender_tool: str) -> list[float]:
    """The same senders against DCMTK ``storescp`` (no fsync, no index, no worker) on this machine: what the
    machine itself gives for this load, so the node's figure can be read as a ratio."""
    import multiprocessing
    import subprocess
    from concurrent.futures import ProcessPoolExecutor

    from tests.helpers.node import free_port, wait_for_port

    port = free_port()
    out = directory / "storescp"
    out.mkdir()
    scp = subprocess.Popen(["storescp", "--output-directory", str(out), "--aetitle", "MSKNODE", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "TCP_NODELAY": "1"})  # as the node's sockets: no Nagle delay
    try:
        wait_for_port("127.0.0.1", port, 30, scp)
        with ProcessPoolExecutor(senders, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(SENDER_TOOLS[sender_tool], port, i, per_sender, per_study, size)
                       for i in range(senders)]
            return [t for future in futures for t in future.result()[0]]
    finally:
        scp.terminate()
        scp.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--instances", type=int, default=200, help="per sender")
    parser.add_argument("--per-study", type=int, default=20, help="instances per study (one association each)")
    parser.add_argument("--size", type=int, default=256, help="rows = columns of each 16-bit CR instance")
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "demo-mae")
    parser.add_argument("--postgres", action="store_true",
                        help="index in a throw-away PostgreSQL cluster (Debian postgresql) instead of SQLite")
    parser.add_argument("--without-worker", action="store_true",
                        help="baseline: receiver and scheduler only, nothing analysed during the load")
    parser.add_argument("--worker-nice", type=int, default=None,
                        help="run the worker at this [engine] nice instead of the node's default, SCHED_IDLE "
                             "(idle_priority = false; 0 = the receiver's priority)")
    parser.add_argument("--sender-tool", choices=sorted(SENDER_TOOLS), default="pynetdicom",
                        help="who sends: pynetdicom SCUs in 8 processes, or DCMTK storescu (a C sender that, like a "
                             "PACS on another machine, takes almost no CPU from the node) proposing its default 128 "
                             "presentation contexts per association, or only those of the files it sends "
                             "(storescu-required: storescu --required)")
    parser.add_argument("--peer", action="store_true",
                        help="also run the same senders against DCMTK storescp, side by side, and print the ratio")
    args = parser.parse_args()
    print(f"machine: {machine_description()}; Python {platform.python_version()}")
    cluster = None
    database_url = None
    if args.postgres:
        from tests.helpers.postgres import PostgresCluster

        cluster = PostgresCluster.start()
        database_url = cluster.create_database()
    print(f"index: {'PostgreSQL' if cluster else 'SQLite (WAL, synchronous=FULL)'}; spool fsync on; "
          f"senders: {args.sender_tool}")
    try:
        with tempfile.TemporaryDirectory(prefix="msknode-load-") as directory:
            report = run_load(Path(directory), args.model, senders=args.senders, per_sender=args.instances,
                              per_study=args.per_study, size=args.size, database_url=database_url,
                              worker=not args.without_worker, worker_nice=args.worker_nice,
                              sender_tool=args.sender_tool,
                              log=lambda message: print(time.strftime("%H:%M:%S"), message, flush=True))
    finally:
        if cluster is not None:
            cluster.stop()
    print(report.table())
    if args.peer:
        with tempfile.TemporaryDirectory(prefix="msknode-load-peer-") as directory:
            peer = [t * 1000 for t in run_storescp_peer(Path(directory), args.senders, args.instances,
                                                        args.per_study, args.size, args.sender_tool)]
        ours = [t * 1000 for t in report.times]
        for name, fraction in (("p50", .5), ("p99", .99)):
            mine, theirs = percentile(ours, fraction), percentile(peer, fraction)
            print(f"{name}: msknode {mine:.1f} ms, storescp {theirs:.1f} ms (same senders, same machine): "
                  f"{mine / theirs:.2f}x")
    ok = (report.failures == 0 and report.missing == 0 and report.duplicate_sops == 0
          and report.acknowledged == report.indexed == report.spool_files == args.senders * args.instances)
    print("exactly once: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
