"""Orthanc as the PACS in end-to-end tests (the class lives in node.demo.pacs, shared with ``msknode demo``), and
Orthanc with its DICOMweb plugin (Debian orthanc-dicomweb) for the STOW-RS tests."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from node.demo.pacs import ORTHANC_AE, orthanc_binary
from node.demo.pacs import Orthanc as _Orthanc
from tests.helpers.components import component_missing

__all__ = ["ORTHANC_AE", "DicomWebOrthanc", "Orthanc"]

DICOMWEB_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))


def dicomweb_plugin() -> Path | None:
    for directory in DICOMWEB_PLUGIN_DIRS:
        candidate = directory / "libOrthancDicomWeb.so"
        if candidate.exists():
            return candidate
    return None


class Orthanc(_Orthanc):
    def __init__(self, directory: Path, modalities: dict[str, tuple[str, str, int]]) -> None:
        if orthanc_binary() is None:
            component_missing("Orthanc not installed (Debian package orthanc; `make test` installs it when run as root)")
        super().__init__(directory, modalities)


class DicomWebOrthanc(Orthanc):
    """Orthanc with the DICOMweb plugin at ``/dicom-web/``, HTTP basic authentication (``user`` / ``password``) and
    ``servers``: DICOMweb servers it can push to (``/dicom-web/servers/{name}/stow``), name -> (url, headers)."""

    def __init__(self, directory: Path, user: str, password: str,
                 servers: dict[str, tuple[str, dict[str, str]]] | None = None) -> None:
        plugin = dicomweb_plugin()
        if plugin is None:
            component_missing("Orthanc DICOMweb plugin not installed (Debian package orthanc-dicomweb)")
        super().__init__(directory, {})
        self.plugin, self.user, self.password = plugin, user, password
        self.servers = servers or {}
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.http_headers = {"Authorization": f"Basic {token}"}

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        config = super().config()
        config.update({
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [str(self.plugin)],
            "DicomWeb": {
                "Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                "Servers": {name: {"Url": url, "HttpHeaders": headers} for name, (url, headers) in self.servers.items()},
            },
        })
        return config

    def stow_to(self, server: str, resource_id: str) -> Any:
        """Orthanc's STOW-RS client: push a resource to a configured DICOMweb server (synchronously)."""
        return self.post(f"/dicom-web/servers/{server}/stow", {"Resources": [resource_id], "Synchronous": True})
