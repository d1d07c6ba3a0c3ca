"""Crash-consistency stress run (``make stress``): 50+ SIGKILLs across the receiver, scheduler, worker and
sender while studies flow, then the invariants (tests/reliability/harness.py) and a summary table.

    .venv/bin/python benchmarks/stress.py [--kills 52] [--studies 60] [--seed 1] [--model models/demo-mae]

Exit status 0 only when there are no violations.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.reliability.harness import CrashRun, machine_description  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=52)
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--images", type=int, default=3, help="instances per study")
    parser.add_argument("--senders", type=int, default=2, help="concurrent sending associations")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "demo-mae")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (logs, database, spool)")
    args = parser.parse_args()
    print(f"machine: {machine_description()}; seed {args.seed}")

    def log(message: str) -> None:
        print(time.strftime("%H:%M:%S"), message, flush=True)

    def run(directory: Path) -> int:
        # Keep studies flowing for as long as the kills take (about 6 s a kill on the 2-vCPU VM): once the
        # senders are done, kills find idle roles.
        gap = max(0.5, args.kills * 6.0 * args.senders / max(1, args.studies))
        crash = CrashRun(directory, args.model, seed=args.seed, studies=args.studies, images=args.images,
                         kills=args.kills, senders=args.senders, log=log, study_gap_seconds=gap)
        report = crash.run(timeout=max(600.0, args.kills * 15.0), quiesce_timeout=300)
        print()
        print(report.table())
        return 0 if not report.violations and sum(report.kills.values()) >= args.kills else 1

    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        return run(args.keep)
    with tempfile.TemporaryDirectory(prefix="msknode-stress-") as directory:
        return run(Path(directory))


if __name__ == "__main__":
    raise SystemExit(main())
