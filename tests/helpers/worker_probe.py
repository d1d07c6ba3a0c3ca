"""A worker process for memory tests: ``python -m tests.helpers.worker_probe <probe.json>``.

Builds the real Worker (real database, spool and model) from the settings in the JSON file, then resets the
process's peak RSS (``/proc/self/clear_refs`` = 5) and works the queue until it is empty. Prints one JSON line:
the resting RSS before the jobs, the peak RSS (VmHWM) while working them, and the jobs handled (kB, as in
/proc/<pid>/status).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def memory() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {key: int(value) for key, value in re.findall(r"(Vm\w+):\s+(\d+) kB", text)}


def main(probe_file: str) -> None:
    import engines
    from node.pipeline.worker import Worker
    from node.settings import parse_settings
    from storage.db import Database
    from storage.job_inputs import JobInputs
    from storage.queue import JobQueue
    from storage.spool import Spool

    probe = json.loads(Path(probe_file).read_text())
    settings = parse_settings(probe["settings"])
    database = Database(probe["database_url"])
    model = engines.load(Path(probe["model"]), backend="cpu")
    worker = Worker(settings, JobQueue(database), JobInputs(database), Spool(Path(probe["spool"]), fsync=False), model,
                    owner="memory-probe")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    resting = memory()["VmRSS"]
    jobs = 0
    while handled := worker.run_once():
        jobs += handled
    print(json.dumps({"resting_kb": resting, "peak_kb": memory()["VmHWM"], "jobs": jobs}))


if __name__ == "__main__":
    main(sys.argv[1])
