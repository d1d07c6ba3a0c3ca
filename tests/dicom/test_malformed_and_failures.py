"""Broken data over the wire and a broken database: a failure status, and nothing left behind.

Senders here are pynetdicom SCUs: DCMTK's storescu refuses to send broken files. Given a file path and
``STORE_SEND_CHUNKED_DATASET``, pynetdicom sends the file's dataset bytes as they are, truncation
included (without it, it would parse and re-encode the file, repairing the lengths).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE
from sqlalchemy import create_engine, text

from tests.helpers.dicomdata import small_instance, split_part10, truncated_copy, write_instance
from tests.helpers.node import NODE_AE

CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


@pytest.fixture(autouse=True)
def send_files_verbatim(monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def send(port: int, what, syntax: str = ExplicitVRLittleEndian) -> int:  # type: ignore[no-untyped-def]
    """C-STORE one dataset or file over a fresh association; returns the status."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(small_instance().SOPClassUID, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(what)
    finally:
        assoc.release()
    assert status is not None and "Status" in status, "no C-STORE response"
    return int(status.Status)


def assert_nothing_kept(node) -> None:  # type: ignore[no-untyped-def]
    assert node.instances() == []
    assert node.spool_files() == []
    assert node.incoming_files() == []


@pytest.mark.parametrize("missing", [("StudyInstanceUID",), ("StudyInstanceUID", "SeriesInstanceUID")])
def test_dataset_missing_uids_is_refused(in_process_node, missing: tuple[str, ...]) -> None:
    node = in_process_node()
    ds = small_instance()
    for keyword in missing:
        delattr(ds, keyword)
    assert send(node.port, ds) == CANNOT_UNDERSTAND
    assert_nothing_kept(node)


def test_truncated_native_pixel_data_is_refused(in_process_node, tmp_path: Path) -> None:
    node = in_process_node()
    whole = write_instance(small_instance(rows=128, columns=128), tmp_path / "whole.dcm")
    cut = truncated_copy(whole, tmp_path / "cut.dcm", keep_fraction=0.7)  # inside the 32 KB of pixels
    assert send(node.port, cut) == CANNOT_UNDERSTAND
    assert_nothing_kept(node)
    assert send(node.port, whole) == 0x0000  # control: the whole file is accepted
    assert len(node.instances()) == 1


def test_truncated_encapsulated_pixel_data_is_refused(in_process_node, tmp_path: Path) -> None:
    node = in_process_node()
    ds = small_instance(rows=128, columns=128)
    ds.compress(JPEG2000Lossless)
    whole = write_instance(ds, tmp_path / "whole-j2k.dcm")
    _, body = split_part10(whole)
    cut = truncated_copy(whole, tmp_path / "cut-j2k.dcm", keep_fraction=0.9)  # inside the fragment
    assert len(cut.read_bytes()) > len(whole.read_bytes()) - len(body) + 200
    assert send(node.port, cut, JPEG2000Lossless) == CANNOT_UNDERSTAND
    assert_nothing_kept(node)
    assert send(node.port, whole, JPEG2000Lossless) == 0x0000
    assert len(node.instances()) == 1


def corrupt_length(source: Path, target: Path, element: bytes, new_vr_and_length: bytes) -> Path:
    """Rewrite the VR/length of one explicit-VR element (found by its tag bytes) in a copy of ``source``."""
    data = bytearray(source.read_bytes())
    end_of_meta = len(data) - len(split_part10(source)[1])
    position = bytes(data[end_of_meta:]).find(element)
    assert position > 0
    start = end_of_meta + position + 4
    data[start : start + len(new_vr_and_length)] = new_vr_and_length
    target.write_bytes(bytes(data))
    return target


def test_element_length_running_past_the_end_is_refused(in_process_node, tmp_path: Path) -> None:
    """Patient Name declares 65535 bytes: parsed leniently it swallows the rest, UIDs included."""
    node = in_process_node()
    whole = write_instance(small_instance(), tmp_path / "whole.dcm")
    broken = corrupt_length(whole, tmp_path / "broken.dcm", b"\x10\x00\x10\x00PN", b"PN\xff\xff")
    assert send(node.port, broken) == CANNOT_UNDERSTAND
    assert_nothing_kept(node)


def test_element_length_running_past_the_end_after_the_uids_is_refused(in_process_node, tmp_path: Path) -> None:
    """Rows turned into an OB with a 2.6 MB length: it swallows Columns and the pixel data."""
    node = in_process_node()
    whole = write_instance(small_instance(), tmp_path / "whole.dcm")
    broken = corrupt_length(whole, tmp_path / "broken.dcm", b"\x28\x00\x10\x00US", b"OB")
    assert send(node.port, broken) == CANNOT_UNDERSTAND
    assert_nothing_kept(node)


def test_database_unavailable_fails_the_store_and_leaves_no_orphan(in_process_node, database_url: str) -> None:
    """The index table disappears under a running receiver (as on a broken or locked database)."""
    node = in_process_node(database_url=database_url)
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE instances RENAME TO instances_away"))
        assert send(node.port, small_instance(seed=1)) == PROCESSING_FAILURE
        assert node.spool_files() == [], "a file the index does not know was left in the spool"
        assert node.incoming_files() == []
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE instances_away RENAME TO instances"))
    finally:
        engine.dispose()
    # Recovery: the database is back, and so is intake (no restart).
    assert send(node.port, small_instance(seed=2)) == 0x0000
    assert len(node.instances()) == 1 and len(node.spool_files()) == 1
    # Nothing of the failed instance was committed: its study is not in the index either.
    with node.runtime.database.session() as session:
        studies = session.execute(text("SELECT count(*) FROM studies")).scalar()
    assert studies == 1
