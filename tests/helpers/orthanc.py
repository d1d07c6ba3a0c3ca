"""Orthanc as the PACS in end-to-end tests (the class lives in node.demo.pacs, shared with ``msknode demo``)."""

from __future__ import annotations

from pathlib import Path

from node.demo.pacs import ORTHANC_AE, orthanc_binary
from node.demo.pacs import Orthanc as _Orthanc
from tests.helpers.components import component_missing

__all__ = ["ORTHANC_AE", "Orthanc"]


class Orthanc(_Orthanc):
    def __init__(self, directory: Path, modalities: dict[str, tuple[str, str, int]]) -> None:
        if orthanc_binary() is None:
            component_missing("Orthanc not installed (Debian package orthanc; `make test` installs it when run as root)")
        super().__init__(directory, modalities)
