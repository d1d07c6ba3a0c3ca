"""Roles as processes: a role that dies is restarted; a worker stuck past the job timeout is replaced and
the job, after max_attempts, is failed with its reason."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from pynetdicom import AE

from tests.helpers.models import tiny_model
from tests.helpers.node import NodeProcess, Peer, wait_for
from tests.pipeline.test_orthanc_end_to_end import PipelineConfig, phantom_study

pytestmark = [pytest.mark.slow]


def children(pid: int) -> dict[int, str]:
    """Child pid -> role, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"--role" in cmdline:
            found[int(entry.name)] = cmdline[cmdline.index(b"--role") + 1].decode()
    return found


def test_a_killed_role_is_restarted(tmp_path: Path) -> None:
    config = PipelineConfig(directory=tmp_path / "node", roles=("receiver", "scheduler"))
    node = NodeProcess(config).start(timeout=120)
    try:
        roles = wait_for(lambda: (lambda c: c if len(c) == 2 else None)(children(node.pid)), 30, "two role processes", 0.2)
        scheduler_pid = next(pid for pid, role in roles.items() if role == "scheduler")
        os.kill(scheduler_pid, signal.SIGKILL)
        restarted = wait_for(
            lambda: (lambda c: c if "scheduler" in c.values() and scheduler_pid not in c else None)(children(node.pid)),
            30, "the scheduler to be restarted", 0.2,
        )
        assert sorted(restarted.values()) == ["receiver", "scheduler"]
        assert "role scheduler exited" in node.log()
    finally:
        node.stop(timeout=60)
    assert children(node.pid) == {}


def test_stuck_job_times_out_and_fails_after_max_attempts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MSKNODE_FAULTS", "worker.before_finish=sleep:30")
    config = PipelineConfig(directory=tmp_path / "node", roles=("receiver", "scheduler", "worker"),
                            peers=(Peer("modality", "PYSCU"),))
    config.model = tiny_model(tmp_path / "tiny-model")
    original_write = config.write

    def write() -> Path:
        path = original_write()
        text = path.read_text().replace("lease_seconds = 30.0\n", "lease_seconds = 30.0\njob_timeout_seconds = 3.0\nmax_attempts = 2\n")
        path.write_text(text)
        return path

    config.write = write  # type: ignore[method-assign]
    node = NodeProcess(config).start(timeout=120)
    try:
        [path] = phantom_study(tmp_path / "study", 1, study_key="stuck")
        import pydicom

        ds = pydicom.dcmread(path)
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MSKNODE")
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()

        def failed_job():  # type: ignore[no-untyped-def]
            from storage.models import Job

            with node.database() as db, db.session() as session:
                job = session.query(Job).one_or_none()
                return job if job is not None and job.state == "failed" else None

        job = wait_for(failed_job, 180, "the job to be failed after 2 timed-out attempts")
        assert job.attempts == 2 and "abandoned after 2 attempt" in job.last_error
        assert node.log().count("exceeded 3 s; handing it back") == 2
    finally:
        node.stop(timeout=60)
