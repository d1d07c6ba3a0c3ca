"""The IT admin CLI against a running node: peers changed live, the queue's problem items, status.

The CLI runs as a subprocess (``python -m node``), the node is a real ``msknode serve`` process and the
peers are DCMTK's echoscu/storescu and a pynetdicom SCU, exactly as an admin and a modality would see it.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from storage.db import Database, utcnow
from storage.migrate import upgrade
from storage.models import Job, Notification, OutboxItem, Study
from tests.helpers.dicomdata import make_instances
from tests.helpers.node import MSKNODE, NODE_AE, REPO_ROOT, NodeConfig, NodeProcess
from tests.helpers.tools import echoscu, require_tool, storescu

PATIENT_NAME, PATIENT_ID = "Phantom^Intake", "PHANTOM"  # what tests.helpers.dicomdata writes


@dataclass
class JsonLogConfig(NodeConfig):
    """The default receiver node, logging one JSON object per line."""

    def write(self) -> Path:
        path = super().write()
        text = path.read_text().replace("[logging]\n", '[logging]\nformat = "json"\n')
        path.write_text(text)
        return path


def cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    """``msknode ARGS -c CONFIG`` as its own process, as an admin runs it next to the node."""
    return subprocess.run([*MSKNODE, *args, "-c", str(config)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli_in_process(*args: str, config: Path) -> Result:
    """The same commands through Typer's runner, for the cases that need no running node (faster)."""
    from typer.testing import CliRunner

    from node.cli import app

    result = CliRunner().invoke(app, [*args, "-c", str(config)], env={"COLUMNS": "200"})
    return Result(result.exit_code, result.stdout, result.stderr)


def wait_until(predicate, what: str, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting until {what}")


@pytest.mark.dcmtk
def test_peers_change_live_without_touching_open_associations(tmp_path: Path) -> None:
    require_tool("echoscu")
    node = NodeProcess(JsonLogConfig(directory=tmp_path / "node")).start()
    config = node.config.path
    config_text = config.read_text()
    files = make_instances(tmp_path / "in", 3)
    try:
        assert echoscu(node.port, calling="NEWSCU").returncode != 0  # unknown: rejected

        added = cli("peers", "add", "newscu", "--ae-title", "NEWSCU", "--host", "127.0.0.1", "--port", "11113",
                    config=config)
        assert added.returncode == 0, added.stderr
        wait_until(lambda: echoscu(node.port, calling="NEWSCU").returncode == 0, "the new peer may associate")
        stored = storescu(node.port, files[:1], calling="NEWSCU")
        assert stored.returncode == 0, stored.stderr

        # An association opened before the removal keeps storing; new ones are refused.
        ae = AE(ae_title="NEWSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert assoc.is_established
        try:
            removed = cli("peers", "remove", "newscu", config=config)
            assert removed.returncode == 0, removed.stderr
            wait_until(lambda: echoscu(node.port, calling="NEWSCU").returncode != 0, "the removed peer is refused")
            statuses = [assoc.send_c_store(pydicom.dcmread(path)).Status for path in files[1:]]
        finally:
            assoc.release()
        assert statuses == [0x0000, 0x0000]

        listed = cli("peers", "list", "--json", config=config)
        status = cli("status", "--json", config=config)
        table = cli("status", config=config)
        rows = node.wait_for_associations_closed()
    finally:
        node.stop()

    assert node.instance_count() == 3
    open_before_removal = [row for row in rows if row.calling_ae_title == "NEWSCU" and row.instance_count == 2]
    assert len(open_before_removal) == 1 and open_before_removal[0].outcome == "released"
    newscu_rejections = [row.reject_reason for row in rows if row.calling_ae_title == "NEWSCU" and row.outcome == "rejected"]
    assert newscu_rejections and set(newscu_rejections) == {"calling-ae-not-recognised"}

    assert config.read_text() == config_text  # the overlay lives in the database, not in the file
    peers = {peer["name"]: peer for peer in json.loads(listed.stdout)}
    assert "newscu" not in peers and peers["dcmtk-storescu"]["source"] == "config"

    report = json.loads(status.stdout)
    assert report["roles_alive"] == {"receiver": 1}
    assert report["processes"][0]["alive"] is True
    assert report["processes"][0]["detail"]["listening"] == f"127.0.0.1:{node.port}"
    assert "receiver" in table.stdout and "queues" in table.stdout

    # JSON logs: every line is one JSON object, and no patient name or ID anywhere.
    log_lines = [line for line in node.log().splitlines() if line and not line.startswith("--- start")]
    assert log_lines
    for line in log_lines:
        record = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(record)
    for text in (node.log(), listed.stdout, status.stdout, table.stdout):
        assert PATIENT_NAME not in text and PATIENT_ID not in text


def test_peer_commands_refuse_bad_input_naming_the_field(tmp_path: Path) -> None:
    config = NodeConfig(directory=tmp_path).write()
    bad_port = cli_in_process("peers", "add", "x", "--ae-title", "X", "--host", "127.0.0.1", "--port", "0", config=config)
    assert bad_port.returncode == 2 and "port:" in bad_port.stderr
    taken = cli_in_process("peers", "add", "x", "--ae-title", "STORESCU", "--host", "127.0.0.1", config=config)
    assert taken.returncode == 2 and "ae_title:" in taken.stderr and "dcmtk-storescu" in taken.stderr
    unresolvable = cli_in_process("peers", "add", "x", "--ae-title", "X", "--host", "no-such-host.invalid", config=config)
    assert unresolvable.returncode == 2 and "host:" in unresolvable.stderr
    missing = cli_in_process("peers", "remove", "nobody", config=config)
    assert missing.returncode == 2 and "no peer named 'nobody'" in missing.stderr

    edited = cli_in_process("peers", "edit", "dcmtk-storescu", "--priority", "urgent", "--receives-results", config=config)
    assert edited.returncode == 0, edited.stderr
    peers = {p["name"]: p for p in json.loads(cli_in_process("peers", "list", "--json", config=config).stdout)}
    changed = peers["dcmtk-storescu"]
    assert (changed["priority"], changed["receives_results"], changed["ae_title"], changed["source"]) == (
        "urgent", True, "STORESCU", "database")

    # Nothing listens on the peer's port: the echo fails with the reason and exit code 1.
    echo = cli_in_process("peers", "echo", "dcmtk-storescu", "--timeout", "2", config=config)
    assert echo.returncode == 1 and "FAILED" in echo.stderr


def _seed_problems(url: str) -> tuple[int, int, int]:
    upgrade(url)
    database = Database(url)
    now = utcnow()
    try:
        with database.session() as session:
            study = Study(study_instance_uid="1.2.826.0.1.3", first_received_at=now, last_received_at=now,
                          status="failed", revision=1)
            session.add(study)
            session.flush()
            job = Job(study_id=study.id, study_revision=1, state="failed", attempts=3, created_at=now,
                      finished_at=now, last_error="worker died 3 times")
            session.add(job)
            session.flush()
            item = OutboxItem(job_id=job.id, study_instance_uid=study.study_instance_uid, sop_instance_uid="1.2.9",
                              sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", kind="SR", path="r.dcm",
                              destination="pacs", state="dead", attempts=5, last_status="0xC000",
                              last_error="destination refused the instance",
                              next_attempt_at=now, created_at=now - timedelta(hours=1))
            session.add(item)
            note = Notification(study_id=study.id, study_instance_uid=study.study_instance_uid, job_id=job.id,
                                channel="webhook", target="https://hooks.example.org/T0KEN-in-path", priority=2,
                                payload={}, state="dead", attempts=7, next_attempt_at=now,
                                created_at=now - timedelta(hours=30), last_error="HTTP 500")
            session.add(note)
            session.flush()
            return job.id, item.id, note.id
    finally:
        database.dispose()


def test_queue_list_retry_and_discard(tmp_path: Path) -> None:
    node_config = NodeConfig(directory=tmp_path)
    config = node_config.write()
    job_id, item_id, note_id = _seed_problems(node_config.url)

    listed = json.loads(cli_in_process("queue", "list", "--json", config=config).stdout)
    assert {(item["id"], item["state"]) for item in listed} == {
        (f"job:{job_id}", "failed"), (f"out:{item_id}", "dead"), (f"note:{note_id}", "dead")}
    dead_only = json.loads(cli_in_process("queue", "list", "--json", "--state", "dead", config=config).stdout)
    assert [item["id"] for item in dead_only] == [f"out:{item_id}", f"note:{note_id}"]
    assert "0xC000" in dead_only[0]["reason"]
    assert dead_only[1]["destination"] == "hooks.example.org"  # never the URL's path (it may hold a token)

    # A notification given up is announced again from scratch (attempts and age reset), then discarded.
    assert cli_in_process("queue", "retry", f"note:{note_id}", config=config).returncode == 0
    note_again = cli_in_process("queue", "retry", f"note:{note_id}", config=config)  # pending now, not dead
    assert note_again.returncode == 1 and "no dead notification" in note_again.stderr
    assert cli_in_process("queue", "discard", f"note:{note_id}", config=config).returncode == 0

    assert cli_in_process("queue", "retry", f"job:{job_id}", config=config).returncode == 0
    assert cli_in_process("queue", "retry", f"out:{item_id}", config=config).returncode == 0
    again = cli_in_process("queue", "retry", f"out:{item_id}", config=config)  # no longer dead
    assert again.returncode == 1 and "no dead letter" in again.stderr
    job_discard = cli_in_process("queue", "discard", f"job:{job_id}", config=config)
    assert job_discard.returncode == 2 and "out:N" in job_discard.stderr
    assert cli_in_process("queue", "discard", f"out:{item_id}", config=config).returncode == 0
    garbled = cli_in_process("queue", "retry", "12", config=config)
    assert garbled.returncode == 2 and "job:N" in garbled.stderr

    database = Database(node_config.url)
    try:
        with database.session() as session:
            job = session.get(Job, job_id)
            item = session.get(OutboxItem, item_id)
            assert (job.state, job.attempts) == ("queued", 0)  # type: ignore[union-attr]
            assert item.state == "discarded"  # type: ignore[union-attr]
            note = session.get(Notification, note_id)
            assert (note.state, note.attempts) == ("discarded", 0)  # type: ignore[union-attr]
    finally:
        database.dispose()
    assert json.loads(cli_in_process("queue", "list", "--json", config=config).stdout) == []


def test_commands_say_when_the_database_is_down(tmp_path: Path) -> None:
    config = tmp_path / "down.toml"
    config.write_text('[storage]\ndatabase_url = "postgresql://msknode@127.0.0.1:1/none"\n')
    for args in (("status",), ("queue", "list"), ("peers", "list")):
        result = cli_in_process(*args, config=config)
        assert result.returncode == 1 and "database unavailable (postgresql)" in result.stderr
