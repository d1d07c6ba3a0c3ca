"""Every accepted transfer syntax, sent by a real peer, is stored byte-identical and indexed with its syntax.

Sources: the files pydicom ships as test data, files made from them with DCMTK (implicit VR, JPEG lossless
SV1, JPEG-LS near-lossless) and an HTJ2K file encoded with OpenJPH. DCMTK's storescu sends each with the
flag that makes it propose that syntax; HTJ2K (which DCMTK 3.6.7 cannot send) goes through pynetdicom.

"Byte-identical" is measured against the bytes the peer really sends. storescu does not send a file's
bytes verbatim: DCMTK re-encodes the dataset it read (for example sequences with undefined length get
explicit lengths, and Data Set Trailing Padding is not sent). So each source is first normalised with ``dcmconv`` (same transfer syntax, DCMTK's
encoding); storescu sends that file's dataset unchanged, and the node must store exactly it.

Several pydicom test files share one SOP Instance UID (the MR_small family), and DCMTK's lossless
conversions keep the source's UID: the node then keeps the newest copy. So each case is checked right
after its own send, against the index row for that SOP Instance UID.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE

from tests.helpers.dicomdata import comparable_dataset_bytes, small_instance, split_part10, write_instance
from tests.helpers.node import NODE_AE, NodeConfig, NodeProcess
from tests.helpers.tools import STORESCU_SYNTAX_FLAGS, require_tool, storescu

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


@dataclass(frozen=True)
class Case:
    key: str
    transfer_syntax: str
    pydicom_file: str | None = None  # from pydicom's test data
    dcmtk: tuple[str, ...] = ()  # DCMTK converter + flags applied to a small synthetic CR


CASES = [
    Case("j2k_lossy", "1.2.840.10008.1.2.4.91", "JPEG2000.dcm"),
    Case("j2k_lossless", "1.2.840.10008.1.2.4.90", "MR_small_jp2klossless.dcm"),
    Case("jpeg_baseline", "1.2.840.10008.1.2.4.50", "SC_rgb_jpeg_dcmtk.dcm"),
    Case("jpeg_extended", "1.2.840.10008.1.2.4.51", "JPEG-lossy.dcm"),
    Case("rle", "1.2.840.10008.1.2.5", "MR_small_RLE.dcm"),
    Case("deflated", "1.2.840.10008.1.2.1.99", "image_dfl.dcm"),
    Case("explicit_be", "1.2.840.10008.1.2.2", "MR_small_bigendian.dcm"),
    Case("jpegls_lossless", "1.2.840.10008.1.2.4.80", "MR_small_jpeg_ls_lossless.dcm"),
    Case("explicit_le", "1.2.840.10008.1.2.1", "CT_small.dcm"),
    Case("implicit_le", "1.2.840.10008.1.2", dcmtk=("dcmconv", "+ti")),
    Case("jpeg_lossless_sv1", "1.2.840.10008.1.2.4.70", dcmtk=("dcmcjpeg", "+e1")),
    Case("jpegls_near_lossless", "1.2.840.10008.1.2.4.81", dcmtk=("dcmcjpls", "+en")),
]


@pytest.fixture(scope="module")
def matrix_node(tmp_path_factory: pytest.TempPathFactory):
    """One node for the whole matrix (starting one per case would cost more than the sends)."""
    node = NodeProcess(NodeConfig(directory=tmp_path_factory.mktemp("matrix-node"))).start()
    yield node
    node.stop()


def source_file(case: Case, work: Path) -> Path:
    """The file to send: the case's source, re-encoded by DCMTK in the same transfer syntax (see above)."""
    require_tool("dcmconv")
    if case.pydicom_file:
        path = get_testdata_file(case.pydicom_file)
        if path is None:
            pytest.skip(f"pydicom test file {case.pydicom_file} not available")
        source = Path(path)
    else:
        # A small unsigned 12-bit CR (JPEG-LS near-lossless in DCMTK refuses signed pixels like CT_small's).
        tool, *flags = case.dcmtk
        require_tool(tool)
        base = write_instance(small_instance(seed=3), work / "base.dcm")
        source = work / f"{case.key}-converted.dcm"
        run_tool([tool, *flags, str(base), str(source)])
    target = work / f"{case.key}.dcm"
    run_tool(["dcmconv", "-p", str(source), str(target)])  # -p: DIMSE never sends trailing padding
    return target


def run_tool(args: list[str]) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{args[0]}: {result.stderr}"


def assert_stored_identical(node: NodeProcess, source: Path, transfer_syntax: str) -> None:
    sop_uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    rows = [row for row in node.instances() if row.sop_instance_uid == sop_uid]
    assert len(rows) == 1, f"expected one index row for {sop_uid}, found {len(rows)}"
    row = rows[0]
    assert row.transfer_syntax_uid == transfer_syntax
    stored = node.spool / row.spool_path
    assert stored.is_file()
    assert row.size_bytes == stored.stat().st_size
    stored_syntax, _ = split_part10(stored)
    assert stored_syntax == transfer_syntax
    assert comparable_dataset_bytes(stored) == comparable_dataset_bytes(source)
    assert node.incoming_files() == []


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_storescu_stores_byte_identical(case: Case, matrix_node: NodeProcess, tmp_path: Path) -> None:
    source = source_file(case, tmp_path)
    _, body = split_part10(source)
    assert split_part10(source)[0] == case.transfer_syntax, "the source file is not in the syntax under test"
    flag = STORESCU_SYNTAX_FLAGS[case.transfer_syntax]
    result = storescu(matrix_node.port, [source], syntax_flag=flag)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_stored_identical(matrix_node, source, case.transfer_syntax)


def test_deflated_stream_is_kept_as_received(matrix_node: NodeProcess, tmp_path: Path) -> None:
    """The node stores the deflate stream it received, not an inflated or re-deflated copy of its own."""
    source = source_file(next(c for c in CASES if c.key == "deflated"), tmp_path)
    result = storescu(matrix_node.port, [source], syntax_flag="-xd", extra=["+cl", "1"])
    assert result.returncode == 0, result.stdout + result.stderr
    sop_uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    (row,) = [r for r in matrix_node.instances() if r.sop_instance_uid == sop_uid]
    stored = matrix_node.spool / row.spool_path
    _, stored_body = split_part10(stored)
    # Still deflated (much smaller than the inflated dataset) and inflates to the source's dataset.
    assert len(stored_body) < len(comparable_dataset_bytes(stored))
    assert comparable_dataset_bytes(stored) == comparable_dataset_bytes(source)


def test_htj2k_sent_by_pynetdicom_is_stored_byte_identical(
    matrix_node: NodeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tool("ojph_compress")
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes, not a re-encoding
    from tests.engines.dicom_fixtures import encode

    uncompressed = small_instance(rows=64, columns=64, seed=7)
    encoded = encode(uncompressed, "htj2k_lossless", tmp_path / "htj2k")
    source = write_instance(encoded, tmp_path / "htj2k.dcm")
    syntax = "1.2.840.10008.1.2.4.201"
    assert split_part10(source)[0] == syntax

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(encoded.SOPClassUID, [syntax])
    assoc = ae.associate("127.0.0.1", matrix_node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(source)
    finally:
        assoc.release()
    assert status.Status == 0x0000
    assert_stored_identical(matrix_node, source, syntax)
