"""Encoding and validator helpers for the result-builder tests."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from tests.helpers.components import component_missing


def encode(dataset: Dataset) -> bytes:
    """The Part 10 file bytes of ``dataset`` (file meta enforced)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def decode(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def write(dataset: Dataset, path: Path) -> Path:
    path.write_bytes(encode(dataset))
    return path


def dciodvfy_errors(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of ``dciodvfy -new``; skips when dicom3tools is missing."""
    tool = shutil.which("dciodvfy")
    if tool is None:  # every object type we emit is checked with it: required (a failure under CI)
        component_missing("dciodvfy not installed (Debian package dicom3tools)")
    result = subprocess.run([tool, "-new", str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


def dsrdump(path: Path) -> str:
    """DCMTK's dsrdump output; fails the test when it cannot parse the SR; skips when DCMTK is missing."""
    tool = shutil.which("dsrdump")
    if tool is None:
        component_missing("dsrdump not installed (Debian package dcmtk)")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout
