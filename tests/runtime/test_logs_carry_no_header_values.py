"""pydicom's value warnings quote the value ("Invalid value for VR DA: 'PHI-ID-90210'"); none may reach a
role's log or the CLI's output (issue #14, item 6). Each case runs in a fresh interpreter set up as the
role or the command is (``configure_logging`` at DEBUG, or ``node.cli.main``), with pydicom's default
validation, and reads a header full of malformed and unusual values as the worker does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.helpers.node import REPO_ROOT

TOKENS = ("Quixotez", "Dulcinella", "PHI-ID-90210", "ACC-SECRET-7")


def malformed_header(path: Path) -> Path:
    """Patient values with a bad VR, odd characters, overlong components, a second value, a bad date."""
    saved = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.PatientName = "Quixotez^Dulcinella^" + "x" * 70 + "\x07\u00e9\\Quixotez^Other"
        ds.PatientID = "PHI-ID-90210\x01" + "y" * 70
        ds.add_new(0x00101000, "DA", "PHI-ID-90210")  # Other Patient IDs under a wrong VR
        ds.add_new(0x00100030, "DA", "1999-Quixotez")  # Patient's Birth Date, malformed
        ds.AccessionNumber = "ACC-SECRET-7" + "\u0000" * 3 + "z" * 40
        ds.add_new(0x00200052, "UI", "1.2.Quixotez.840")  # Frame of Reference UID that is no UID
        ds.save_as(path, enforce_file_format=True)
    finally:
        pydicom_config.settings.writing_validation_mode = saved
    return path


READ_AS_THE_WORKER = """
import logging, sys, pydicom
from pydicom.dataset import Dataset
ds = pydicom.dcmread(sys.argv[1], stop_before_pixels=True)
for element in ds:
    str(element.value)
ds = pydicom.dcmread(sys.argv[1])
copy = Dataset()  # as the result builders copy the patient/study attributes
for element in ds:
    repr(element.value)
    try:
        setattr(copy, element.keyword, element.value)
    except Exception:
        pass
logging.getLogger("msknode.test").warning("headers read")
"""


def run(code: str, path: Path) -> str:
    result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_role_log_never_quotes_header_values(tmp_path: Path, fmt: str) -> None:
    path = malformed_header(tmp_path / "bad.dcm")
    output = run(f"from node.runtime.logs import configure_logging\nconfigure_logging('DEBUG', {fmt!r})\n"
                 + READ_AS_THE_WORKER, path)
    assert "headers read" in output  # the log works
    assert "UserWarning" in output  # that a warning happened is still visible, without its text
    assert [token for token in TOKENS if token in output] == []


def test_the_cli_never_prints_header_values(tmp_path: Path) -> None:
    path = malformed_header(tmp_path / "bad.dcm")
    code = ("import node.cli\n"
            "def read_headers():\n" + "".join(f"    {line}\n" for line in READ_AS_THE_WORKER.strip().splitlines())
            + "node.cli.app = read_headers\nnode.cli.main()\n")
    output = run(code, path)
    assert [token for token in TOKENS if token in output] == []


def test_without_the_protection_the_values_would_show(tmp_path: Path) -> None:
    """The scan above can find the values: plain Python prints pydicom's warnings with them."""
    path = malformed_header(tmp_path / "bad.dcm")
    output = run("import logging\nlogging.basicConfig()\n" + READ_AS_THE_WORKER, path)
    assert [token for token in TOKENS if token in output]
