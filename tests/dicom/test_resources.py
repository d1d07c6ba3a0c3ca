"""Running out of disk: the watermark refuses new associations and stores in progress, a really full
filesystem gives a failure status with nothing half-written, and intake recovers when space returns."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from tests.helpers.dicomdata import make_instances, small_instance
from tests.helpers.node import NODE_AE
from tests.helpers.tools import require_tool, storescu

OUT_OF_RESOURCES = 0xA700
HUGE_MB = 1 << 40  # far above any real free space


def scu() -> AE:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(small_instance().SOPClassUID, ExplicitVRLittleEndian)
    return ae


@pytest.mark.dcmtk
def test_watermark_rejects_new_associations_transiently(node_factory, tmp_path: Path) -> None:
    """Configured above the real free space: a sender is turned away before it sends a byte."""
    node = node_factory(min_free_disk_mb=HUGE_MB)
    files = make_instances(tmp_path / "in", 1)
    result = storescu(node.port, files)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Rejected Transient" in output, output
    assert "Temporary Congestion" in output or "temporary-congestion" in output.lower(), output
    assert node.instance_count() == 0 and node.spool_files() == [] and node.incoming_files() == []
    (row,) = node.associations()
    assert (row.outcome, row.reject_reason) == ("rejected", "disk-below-watermark")


def test_watermark_crossed_during_an_association_gives_a700_and_stores_nothing(in_process_node) -> None:
    node = in_process_node()
    assoc = scu().associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established  # there was room when the association started
    try:
        node.receiver.min_free_disk_mb = HUGE_MB  # the disk "fills" before the C-STORE
        status = assoc.send_c_store(small_instance(seed=1))
        assert status.Status == OUT_OF_RESOURCES
        assert node.instances() == [] and node.spool_files() == [] and node.incoming_files() == []

        node.receiver.min_free_disk_mb = 0  # space returns: the same association stores again
        assert assoc.send_c_store(small_instance(seed=2)).Status == 0x0000
    finally:
        assoc.release()
    assert len(node.instances()) == 1 and len(node.spool_files()) == 1


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A 6 MB tmpfs mounted on a temporary directory (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (run the suite as root, e.g. `make test` in CI)")
    require_tool("mount")
    mountpoint = tmp_path / "small-fs"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mountpoint)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


# pynetdicom's reader thread dies with the ENOSPC it hit: expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_really_full_filesystem_fails_cleanly_and_recovers(in_process_node, small_filesystem: Path,
                                                             tmp_path: Path) -> None:
    """The spool lives on a 6 MB tmpfs that a filler file leaves ~0.5 MB free; a 2 MB instance cannot fit.

    The watermark is 0 so the check that is exercised is the real ENOSPC path, not the watermark.
    """
    node = in_process_node(spool_dir=small_filesystem / "spool")
    assert node.incoming.is_relative_to(small_filesystem)

    filler = small_filesystem / "filler"
    free = shutil.disk_usage(small_filesystem).free
    with open(filler, "wb") as handle:
        handle.write(b"\0" * (free - 512 * 1024))
    big = small_instance(rows=1024, columns=1024, seed=5)  # 2 MB of pixel data

    assoc = scu().associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(big)
        failed = status is None or "Status" not in status or status.Status != 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
    assert failed, "a 2 MB instance was acknowledged on a filesystem with 0.5 MB free"
    # The node finishes a broken association asynchronously (within its 1 s reaper period).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (node.incoming_files() or node.associations()[-1].outcome == "open"):
        time.sleep(0.2)
    assert node.associations()[-1].outcome == "aborted"
    if status is not None and "Status" in status:
        assert status.Status in (OUT_OF_RESOURCES, 0x0110, 0xC000)
    assert node.instances() == []
    assert node.spool_files() == [], "no half-written instance may remain"
    assert node.incoming_files() == [], "no partial temporary file may remain"

    filler.unlink()  # space returns
    assoc = scu().associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(big).Status == 0x0000
    finally:
        assoc.release()
    (row,) = node.instances()
    assert row.sop_instance_uid == big.SOPInstanceUID
    assert (node.spool / row.spool_path).stat().st_size == row.size_bytes > 2 * 1024 * 1024
