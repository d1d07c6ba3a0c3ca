"""Throw-away PACS for the demo and the end-to-end tests: Orthanc (Debian package) on loopback, or, where
Orthanc is not installed, a small pynetdicom Storage SCP that keeps what it receives in a folder."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


ORTHANC_AE = "ORTHANC"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def orthanc_binary() -> str | None:
    found = shutil.which("Orthanc")
    if found:
        return found
    return "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None


class Orthanc:
    def __init__(self, directory: Path, modalities: dict[str, tuple[str, str, int]]) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise FileNotFoundError("Orthanc is not installed (Debian package orthanc)")
        self.binary = binary
        self.directory = directory
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modalities = modalities
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "orthanc.log"
        self.http_headers: dict[str, str] = {}  # sent with every REST request (e.g. basic auth)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """Orthanc's configuration file (a subclass adds plugins: tests/helpers/orthanc.py)."""
        return {
            "Name": "msknode-test-pacs",
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {name: list(value) for name, value in self.modalities.items()},
            "Plugins": [],
            "ConcurrentJobs": 2,
            "StableAge": 3600,
            "SaveJobs": False,
        }

    def start(self, timeout: float = 60.0) -> "Orthanc":
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([self.binary, str(path)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise TimeoutError("Orthanc did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    # -- REST --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, data: bytes | None = None, content_type: str | None = None,
                 raw: bool = False) -> Any:
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self.http_headers)
        if content_type:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=120) as response:
            body = response.read()
        if raw:
            return body
        return json.loads(body) if body else None

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        if isinstance(payload, (bytes, bytearray)):
            return self._request("POST", path, bytes(payload), "application/dicom")
        return self._request("POST", path, json.dumps(payload).encode(), "application/json")

    def upload(self, dicom_file: Path) -> dict[str, Any]:
        return self.post("/instances", dicom_file.read_bytes())

    def store_to(self, modality: str, resource_id: str) -> Any:
        """Orthanc's C-STORE SCU: push a resource to a configured modality (synchronously)."""
        return self.post(f"/modalities/{modality}/store", {"Resources": [resource_id], "Synchronous": True})

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        return self.get(f"/studies/{study_id}/series?expand")

    def instance_file(self, instance_id: str) -> bytes:
        return self._request("GET", f"/instances/{instance_id}/file", raw=True)


class FolderPACS:
    """A pynetdicom Storage SCP writing every instance it receives to ``directory`` (the demo's fallback PACS)."""

    def __init__(self, directory: Path, ae_title: str = "DEMOPACS") -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.directory = directory
        self.ae_title = ae_title
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)

        def on_store(event):  # type: ignore[no-untyped-def]
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            dataset.save_as(directory / f"{dataset.SOPInstanceUID}.dcm", enforce_file_format=True)
            return 0x0000

        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.dcm"))

    def stop(self) -> None:
        self._server.shutdown()
