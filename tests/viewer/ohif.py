"""A real OHIF v3 viewer on a real PACS for the viewer tests: Orthanc with its DICOMweb plugin, the ready-built
OHIF app (npm @ohif/app, pinned in tests/viewer/package-lock.json), and one small HTTP server that serves the
app and proxies ``/dicom-web/`` to Orthanc, so the browser sees one origin (no CORS to configure).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from node.demo.pacs import free_port, orthanc_binary
from tests.helpers.components import component_missing
from tests.helpers.orthanc import Orthanc

VIEWER_DIR = Path(__file__).resolve().parent
OHIF_DIST = VIEWER_DIR / "node_modules" / "@ohif" / "app" / "dist"
DCMJS = VIEWER_DIR / "node_modules" / "dcmjs"
DICOMWEB_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))
CHROMIUM = Path("/usr/bin/chromium")
INSTALL_HINT = "`make test` runs tests/setup/install_viewer.sh (npm ci in tests/viewer)"
# Orthanc's DICOMweb plugin as OHIF reads it (full metadata: no per-instance reads for the study's metadata).
DICOMWEB_SETTINGS = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"}


def dicomweb_plugin() -> Path | None:
    for directory in DICOMWEB_PLUGIN_DIRS:
        candidate = directory / "libOrthancDicomWeb.so"
        if candidate.exists():
            return candidate
    return None


def require_ohif() -> Path:
    if not (OHIF_DIST / "index.html").exists():
        component_missing(f"OHIF viewer not installed at {OHIF_DIST} ({INSTALL_HINT})")
    return OHIF_DIST


def require_node_and_dcmjs() -> str:
    node = shutil.which("node")
    if node is None:
        component_missing("node not installed (Debian package nodejs)")
    if not (DCMJS / "package.json").exists():
        component_missing(f"dcmjs not installed at {DCMJS} ({INSTALL_HINT})")
    return node


class DicomWebOrthanc:
    """Orthanc on loopback with the DICOMweb plugin (HTTP only: the tests upload through its REST API)."""

    def __init__(self, directory: Path) -> None:
        binary, plugin = orthanc_binary(), dicomweb_plugin()
        if binary is None:
            component_missing("Orthanc not installed (Debian package orthanc; `make test` installs it as root)")
        if plugin is None:
            component_missing("Orthanc DICOMweb plugin not installed (Debian package orthanc-dicomweb)")
        self.binary, self.plugin, self.directory = binary, plugin, directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> DicomWebOrthanc:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "msknode-viewer-test",
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "index"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "Plugins": [str(self.plugin)],
            "DicomWeb": DICOMWEB_SETTINGS,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
        }
        path = self.directory / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([self.binary, str(path)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                plugins = self.get("/plugins")
                if "dicom-web" not in plugins:
                    raise RuntimeError(f"Orthanc started without the DICOMweb plugin: {plugins}")
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
                self.process.wait(5)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.loads(response.read())

    def upload(self, data: bytes) -> dict[str, Any]:
        request = urllib.request.Request(self.url + "/instances", data=data, method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())


class DicomWebPacs(Orthanc):
    """Orthanc as the PACS of the product loop (C-STORE in and out, ``modalities`` it pushes to: the node) that
    OHIF reads through the same DICOMweb plugin settings as :class:`DicomWebOrthanc`."""

    def __init__(self, directory: Path, modalities: dict[str, tuple[str, str, int]]) -> None:
        plugin = dicomweb_plugin()
        if plugin is None:
            component_missing("Orthanc DICOMweb plugin not installed (Debian package orthanc-dicomweb)")
        super().__init__(directory, modalities)
        self.plugin = plugin

    def config(self) -> dict[str, Any]:
        config = super().config()
        config.update({"Plugins": [str(self.plugin)], "DicomWeb": DICOMWEB_SETTINGS})
        return config


def app_config(origin: str) -> str:
    """OHIF's window.config: one DICOMweb source at this origin's /dicom-web (proxied to Orthanc)."""
    root = f"{origin}/dicom-web"
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (msknode viewer test)",
            "name": "orthanc",
            "wadoUriRoot": root,
            "qidoRoot": root,
            "wadoRoot": root,
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "dicomUploadEnabled": False,
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


class ViewerServer:
    """Serves the OHIF dist (index.html for every app route), our app-config.js, and proxies /dicom-web/."""

    def __init__(self, dist: Path, orthanc: DicomWebOrthanc | DicomWebPacs) -> None:
        self.dist, self.orthanc = dist.resolve(), orthanc
        self.port = free_port()
        self.requests: list[tuple[str, int]] = []  # (path, status) of every proxied DICOMweb request
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.handle(self)

            def do_POST(self) -> None:  # noqa: N802
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="viewer-http", daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ViewerServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path
        if path.startswith("/dicom-web/"):
            self._proxy(request)
            return
        plain = path.split("?", 1)[0]
        if plain == "/app-config.js":
            self._send(request, 200, app_config(self.origin).encode(), "application/javascript")
            return
        target = (self.dist / plain.lstrip("/")).resolve()
        if plain in ("", "/") or not target.is_file() or self.dist not in target.parents:
            target = self.dist / "index.html"  # the app's own routes (/viewer, /basic, ...)
        types = {".js": "application/javascript", ".css": "text/css", ".html": "text/html", ".wasm": "application/wasm",
                 ".json": "application/json", ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon",
                 ".woff2": "font/woff2"}
        self._send(request, 200, target.read_bytes(), types.get(target.suffix, "application/octet-stream"))

    def _proxy(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else None
        upstream = urllib.request.Request(self.orthanc.url + request.path, data=body, method=request.command)
        for header in ("Accept", "Content-Type"):
            if request.headers.get(header):
                upstream.add_header(header, request.headers[header])
        upstream.add_header("Host", f"127.0.0.1:{self.port}")  # Orthanc builds BulkDataURIs from it
        for header, value in getattr(self.orthanc, "http_headers", {}).items():  # e.g. the PACS's basic auth
            upstream.add_header(header, value)
        try:
            with urllib.request.urlopen(upstream, timeout=120) as response:
                status, data, content_type = response.status, response.read(), response.headers.get("Content-Type")
        except urllib.error.HTTPError as error:
            status, data, content_type = error.code, error.read(), error.headers.get("Content-Type")
        self.requests.append((request.path, status))
        self._send(request, status, data, content_type or "application/octet-stream")

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, data: bytes, content_type: str) -> None:
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(data)))
        request.send_header("Cache-Control", "no-store")
        request.end_headers()
        request.wfile.write(data)
