"""Header-only inspection of received files: UIDs present, file whole, pixels never decoded."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from node.dicom.header_checks import HeaderError, read_header

SAMPLES = {
    "CT_small.dcm": "1.2.840.10008.1.2.1",
    "MR_small_bigendian.dcm": "1.2.840.10008.1.2.2",
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",
}


@pytest.mark.parametrize(("name", "syntax"), sorted(SAMPLES.items()))
def test_reads_uids_and_syntax(name: str, syntax: str) -> None:
    path = Path(get_testdata_file(name))
    info = read_header(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert info.transfer_syntax_uid == syntax
    assert info.study_instance_uid == ds.StudyInstanceUID
    assert info.sop_instance_uid == ds.SOPInstanceUID
    assert info.modality == ds.get("Modality")


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm"])
@pytest.mark.parametrize("cut", [2, 300])
def test_truncated_files_are_refused(tmp_path: Path, name: str, cut: int) -> None:
    data = Path(get_testdata_file(name)).read_bytes()
    truncated = tmp_path / "t.dcm"
    truncated.write_bytes(data[:-cut])
    with pytest.raises(HeaderError, match="truncated|unparseable"):
        read_header(truncated)


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_missing_uid_is_refused(tmp_path: Path, keyword: str) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    delattr(ds, keyword)
    path = tmp_path / "m.dcm"
    ds.save_as(path)
    with pytest.raises(HeaderError, match=keyword):
        read_header(path)


def test_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    with pytest.raises(HeaderError):
        read_header(path)
