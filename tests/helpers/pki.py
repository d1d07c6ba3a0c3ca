"""A throw-away PKI made with the openssl command line: a CA, a server certificate for localhost / 127.0.0.1,
a client certificate from the same CA and one from another CA."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.components import component_missing


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by another CA
    stranger_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(directory: Path, name: str, ca: str, subject: str, san: str | None) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-subj", subject,
             "-out", f"{name}.csr", cwd=directory)
    extensions = directory / f"{name}.ext"
    extensions.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", extensions.name, "-out", f"{name}.pem",
             cwd=directory)
    os.chmod(directory / f"{name}.key", 0o600)


def make_pki(directory: Path) -> Pki:
    if shutil.which("openssl") is None:
        component_missing("openssl not installed (Debian package openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "otherca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN=msknode test {ca}", cwd=directory)
    _issue(directory, "server", "ca", "/CN=localhost", "DNS:localhost,IP:127.0.0.1")
    _issue(directory, "client", "ca", "/CN=pacs-client", None)
    _issue(directory, "stranger", "otherca", "/CN=stranger", None)
    return Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key",
               directory / "client.pem", directory / "client.key",
               directory / "stranger.pem", directory / "stranger.key")
