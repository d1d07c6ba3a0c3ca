"""Storing and indexing with real senders, on SQLite and on PostgreSQL: concurrency and duplicates."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.helpers.dicomdata import make_instances, small_instance, split_part10, write_instance
from tests.helpers.node import NodeProcess
from tests.helpers.tools import require_tool, storescu

pytestmark = pytest.mark.dcmtk


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_four_concurrent_storescu_senders_each_instance_indexed_once(node_factory, database_url, tmp_path) -> None:
    require_tool("storescu")
    node: NodeProcess = node_factory(database_url=database_url)
    # 100 distinct instances; two studies spread over the senders so studies and series are created
    # concurrently by several associations at once.
    files = make_instances(tmp_path / "a", 50, seed=0) + make_instances(tmp_path / "b", 50, seed=1000)
    batches = [files[i::4] for i in range(4)]
    env = dict(os.environ, TCP_NODELAY="1")
    senders = [
        subprocess.Popen(
            ["storescu", "-aet", "STORESCU", "-aec", "MSKNODE", "127.0.0.1", str(node.port), *map(str, batch)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for batch in batches
    ]
    outputs = [sender.communicate(timeout=180)[0] for sender in senders]
    assert [sender.returncode for sender in senders] == [0, 0, 0, 0], "\n".join(outputs)

    sent = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID): path for path in files}
    rows = node.instances()
    assert len(rows) == 100
    assert {row.sop_instance_uid for row in rows} == set(sent)
    stored = node.spool_files()
    assert len(stored) == 100
    assert {node.spool / row.spool_path for row in rows} == set(stored)
    for row in rows:  # each stored file is the one sent for that UID
        assert row.sha256 == sha256(node.spool / row.spool_path)
        assert split_part10(node.spool / row.spool_path)[1] == split_part10(sent[row.sop_instance_uid])[1]
    assert node.incoming_files() == []
    assert node.study_and_series_counts() == (2, 2)
    associations = node.wait_for_associations_closed()
    assert sorted((a.outcome, a.instance_count) for a in associations) == [("released", 25)] * 4


def test_duplicates_and_replacements(node_factory, database_url, tmp_path) -> None:
    node: NodeProcess = node_factory(database_url=database_url)
    original = small_instance(seed=1)
    first = write_instance(original, tmp_path / "first.dcm")

    assert storescu(node.port, [first]).returncode == 0
    assert storescu(node.port, [first]).returncode == 0  # identical bytes again: success, nothing new
    (row,) = node.instances()
    assert len(node.spool_files()) == 1
    assert node.replacements() == []
    old_path = node.spool / row.spool_path
    assert split_part10(old_path)[1] == split_part10(first)[1]
    assert [a.instance_count for a in node.wait_for_associations_closed()] == [1, 1]  # both acknowledged

    changed = small_instance(seed=2, sop_uid=original.SOPInstanceUID, study_uid=original.StudyInstanceUID,
                             series_uid=original.SeriesInstanceUID)
    second = write_instance(changed, tmp_path / "second.dcm")
    assert split_part10(second)[1] != split_part10(first)[1]
    result = storescu(node.port, [second])
    assert result.returncode == 0, result.stdout + result.stderr

    (row_after,) = node.instances()
    stored = node.spool_files()
    assert len(stored) == 1, "the replaced copy must be removed"
    assert not old_path.exists()
    new_path = node.spool / row_after.spool_path
    assert stored == [new_path]
    assert split_part10(new_path)[1] == split_part10(second)[1], "the newer copy is the one kept"
    assert row_after.sha256 == sha256(new_path) != row.sha256
    assert row_after.replaced_count == 1
    (replacement,) = node.replacements()
    assert (replacement.sop_instance_uid, replacement.old_sha256, replacement.new_sha256) == (
        original.SOPInstanceUID, row.sha256, row_after.sha256,
    )
    assert node.incoming_files() == []


def test_received_bytes_are_hashed_as_they_arrive_not_read_back(in_process_node, tmp_path, monkeypatch) -> None:
    """A multi-megabyte instance in many PDUs: the indexed SHA-256 (and the name it gives the file) is the stored
    file's, computed while pynetdicom wrote it: the spool never reads the file back to hash it."""
    import storage.spool

    node = in_process_node()
    monkeypatch.setattr(storage.spool, "sha256_of", lambda path: pytest.fail("the received file was read back"))
    files = [write_instance(small_instance(rows=1200, columns=1100, seed=seed), tmp_path / f"big{seed}.dcm")
             for seed in (1, 2)]
    result = storescu(node.port, files, extra=["--max-send-pdu", "16384"])  # about 160 data fragments each
    assert result.returncode == 0, result.stdout + result.stderr
    rows = node.instances()
    assert len(rows) == 2
    sent = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID): path for path in files}
    for row in rows:
        stored = node.spool / row.spool_path
        assert row.sha256 == sha256(stored) and row.size_bytes == stored.stat().st_size
        assert row.sha256[:16] in stored.name
        assert split_part10(stored)[1] == split_part10(sent[row.sop_instance_uid])[1]
    assert node.incoming_files() == []
