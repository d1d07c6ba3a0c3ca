"""Stopping and starting the node: nothing received is lost, nothing half-received survives.

A slow sender (pynetdicom whose socket writes are throttled, against a node with a 16 KB maximum PDU)
keeps a C-STORE in flight for as long as a test needs to signal the node in the middle of it.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from tests.helpers.dicomdata import make_instances, small_instance
from tests.helpers.node import MSKNODE, NODE_AE, REPO_ROOT, NodeProcess
from tests.helpers.tools import storescu

pytestmark = pytest.mark.slow


def studies_json(node: NodeProcess) -> list[dict[str, object]]:
    result = subprocess.run(
        [*MSKNODE, "studies", "--json", "-c", str(node.config.path)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class SlowSender(threading.Thread):
    """Sends one large instance, pausing ``pause`` seconds before every PDU it writes."""

    def __init__(self, port: int, pause: float, rows: int = 1024) -> None:
        super().__init__(daemon=True)
        self.dataset = small_instance(rows=rows, columns=1024, seed=9)
        self.port, self.pause = port, pause
        self.status: object = "not sent"
        self.established = threading.Event()

    def run(self) -> None:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(self.dataset.SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AE)
        if not assoc.is_established:
            self.status = "not established"
            self.established.set()
            return
        send = assoc.dul.socket.send

        def throttled(data: bytes) -> None:
            time.sleep(self.pause)
            send(data)

        assoc.dul.socket.send = throttled  # type: ignore[method-assign]
        self.established.set()
        try:
            response = assoc.send_c_store(self.dataset)
            self.status = response.Status if response is not None and "Status" in response else None
        except Exception as exc:  # the node went away mid-transfer
            self.status = exc
        finally:
            if assoc.is_established:
                assoc.release()


def largest_partial(node: NodeProcess) -> int:
    """Size of the biggest file in ``.incoming`` (0 if none; files may vanish while we look)."""
    sizes = [0]
    for path in node.incoming_files():
        try:
            sizes.append(path.stat().st_size)
        except FileNotFoundError:
            pass
    return max(sizes)


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.dcmtk
def test_restart_keeps_everything(node_factory, database_url: str, tmp_path: Path) -> None:
    node = node_factory(database_url=database_url)
    files = make_instances(tmp_path / "a", 3) + make_instances(tmp_path / "b", 2)
    assert storescu(node.port, files).returncode == 0
    node.wait_for_associations_closed()
    before = studies_json(node)
    assert sorted(study["instances"] for study in before) == [2, 3]
    for study in before:
        assert {"study_instance_uid", "instances", "status", "last_received"} <= set(study)
        assert study["status"] == "received"
    spool_before = {path: path.read_bytes() for path in node.spool_files()}

    assert node.stop() == 0
    assert "stopped" in node.log()
    node.start()
    assert studies_json(node) == before
    assert {path: path.read_bytes() for path in node.spool_files()} == spool_before
    assert [row.outcome for row in node.associations()] == ["released"]
    # And it still receives after the restart.
    more = make_instances(tmp_path / "c", 1)
    assert storescu(node.port, more).returncode == 0
    assert node.study_and_series_counts() == (3, 3)


def test_sigkill_mid_association_then_restart_recovers(node_factory) -> None:
    node = node_factory(max_pdu_size=16384)
    sender = SlowSender(node.port, pause=0.02)
    sender.start()
    assert sender.established.wait(30)
    wait_for(lambda: largest_partial(node) > 100_000, 60, "a partial file")
    node.kill()
    sender.join(60)
    assert sender.status != 0x0000
    assert node.incoming_files(), "the crash should have left the partial file (the test needs it)"
    assert [row.outcome for row in node.associations()] == ["open"]

    node.start()
    assert node.incoming_files() == [], "the partial file of the interrupted transfer was not swept"
    (row,) = node.associations()
    assert row.outcome == "interrupted" and row.ended_at is not None
    assert node.instance_count() == 0 and node.spool_files() == []
    log = node.log()
    assert "marked interrupted" in log
    assert "unacknowledged partial file" in log


def test_sigterm_with_an_association_open_stops_within_the_grace_period(node_factory) -> None:
    node = node_factory(max_pdu_size=16384)
    sender = SlowSender(node.port, pause=0.1)  # ~13 s for 2 MB: longer than the 10 s grace period
    sender.start()
    assert sender.established.wait(30)
    wait_for(lambda: largest_partial(node) > 16_384, 60, "a transfer in progress")

    started = time.monotonic()
    assert node.stop(timeout=30) == 0
    stopped_after = time.monotonic() - started
    sender.join(30)
    assert sender.status != 0x0000
    assert stopped_after < 25, f"took {stopped_after:.1f} s to stop"
    assert "aborting association" in node.log()
    # Nothing half-written: no partial file, no stored file, no index row; the association is closed.
    assert node.incoming_files() == []
    assert node.spool_files() == [] and node.instance_count() == 0
    assert [row.outcome for row in node.associations()] == ["aborted"]
