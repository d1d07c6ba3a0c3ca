"""Fuzzing stress run: structure-aware mutations of valid DICOM (tests/reliability/fuzz.py), at volume.

Two targets, each fed every case:
  * network    : a real ``msknode serve`` (receiver role, SQLite); each mutated dataset is sent byte for byte
                 in a C-STORE over raw PDUs. A crash is: the node exiting, a status other than Success or
                 0xC000 (or an abort for unframeable data), a file left in spool/.incoming, a thread left
                 behind, or a Success whose instance is not indexed with its file in the spool.
  * preprocess : the worker's read + engines preprocessing/decoders in this process. A crash is any
                 exception from ``preprocess`` other than ``PreprocessError`` (or a case over the time limit).

Prints the number of cases, outcomes by status, crashes (must be 0) and elapsed time; exits 1 on a crash.

    .venv/bin/python benchmarks/fuzz.py --cases 10000 [--seed N] [--target network|preprocess|both]
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.node import NodeConfig, NodeProcess  # noqa: E402
from tests.reliability.fuzz import cases, run_over_network  # noqa: E402

PER_CASE_LIMIT_SECONDS = 30


def thread_count(node: NodeProcess) -> int:
    return len(list(Path(f"/proc/{node.pid}/task").iterdir()))


def fuzz_network(seed: int, count: int, chunk: int = 500) -> tuple[Counter[str], list[str]]:
    from storage.spool import sha256_of

    outcomes: Counter[str] = Counter()
    crashes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="msknode-fuzz-") as directory:
        node = NodeProcess(NodeConfig(directory=Path(directory), fsync=False)).start()
        try:
            idle = thread_count(node)
            succeeded: set[str] = set()
            for start in range(0, count, chunk):
                batch = list(cases(seed, min(chunk, count - start), start))
                results = run_over_network("127.0.0.1", node.port, batch)
                for case in batch:
                    status = results[case.index]
                    label = "abort" if status == "aborted" else f"0x{status:04X}"
                    outcomes[f"{case.mutator}:{label}"] += 1
                    if status not in (0x0000, 0xC000, "aborted"):
                        crashes.append(f"case {case.index} ({case.mutator}): status {label}")
                    if status == 0x0000:
                        succeeded.add(case.sop_instance_uid)
                if not node.running():
                    crashes.append(f"node exited during cases {start}..{start + len(batch) - 1}")
                    break
                print(f"  network: {start + len(batch)} cases", file=sys.stderr)
            deadline = time.monotonic() + 15
            while thread_count(node) > idle and time.monotonic() < deadline:
                time.sleep(0.2)
            if thread_count(node) > idle:
                crashes.append(f"threads: {thread_count(node)} after the run, {idle} idle")
            if node.incoming_files():
                crashes.append(f"{len(node.incoming_files())} file(s) left in spool/.incoming")
            indexed = {row.sop_instance_uid: row for row in node.instances()}
            if set(indexed) != succeeded:
                crashes.append(f"index/success mismatch: {len(set(indexed) ^ succeeded)} instance(s)")
            for row in indexed.values():
                path = node.spool / row.spool_path
                if not path.is_file() or sha256_of(path) != (row.sha256, row.size_bytes):
                    crashes.append(f"indexed instance without its file: {row.spool_path}")
        finally:
            node.stop()
    return outcomes, crashes


class CaseTimeout(Exception):
    pass


def _alarm(_signum: int, _frame: object) -> None:
    raise CaseTimeout()


def fuzz_preprocess(seed: int, count: int) -> tuple[Counter[str], list[str]]:
    from tests.reliability.test_fuzz_preprocess import preprocess_outcome

    outcomes: Counter[str] = Counter()
    crashes: list[str] = []
    signal.signal(signal.SIGALRM, _alarm)
    for case in cases(seed, count):
        signal.alarm(PER_CASE_LIMIT_SECONDS)
        try:
            outcome = preprocess_outcome(case)
        except CaseTimeout:
            outcome = f"CRASH hang over {PER_CASE_LIMIT_SECONDS} s"
        finally:
            signal.alarm(0)
        outcomes[f"{case.mutator}:{outcome if not outcome.startswith('CRASH') else 'CRASH'}"] += 1
        if outcome.startswith("CRASH"):
            crashes.append(f"case {case.index} ({case.mutator}): {outcome}")
        if (case.index + 1) % 1000 == 0:
            print(f"  preprocess: {case.index + 1} cases", file=sys.stderr)
    return outcomes, crashes


def report(target: str, count: int, outcomes: Counter[str], crashes: list[str], elapsed: float) -> None:
    totals: Counter[str] = Counter()
    for key, value in outcomes.items():
        totals[key.split(":", 1)[1]] += value
    print(f"\n== {target}: {count} cases, {len(crashes)} crash(es), {elapsed:.1f} s ({count / elapsed:.0f} cases/s)")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    mutators = sorted({key.split(":", 1)[0] for key in outcomes})
    for mutator in mutators:
        row = {k.split(":", 1)[1]: v for k, v in outcomes.items() if k.startswith(mutator + ":")}
        print(f"  {mutator:17s} " + ", ".join(f"{k} {v}" for k, v in sorted(row.items())))
    for crash in crashes[:20]:
        print(f"  CRASH {crash}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target", choices=["network", "preprocess", "both"], default="both")
    args = parser.parse_args()
    crashed = False
    for target, run in (("network", fuzz_network), ("preprocess", fuzz_preprocess)):
        if args.target not in (target, "both"):
            continue
        started = time.perf_counter()
        outcomes, crashes = run(args.seed, args.cases)
        report(target, args.cases, outcomes, crashes, time.perf_counter() - started)
        crashed |= bool(crashes)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
