"""Debian command-line tools the integration tests drive, with skips that name the missing package."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.helpers.components import component_missing

# tool -> Debian package that provides it
DEBIAN_PACKAGES = {
    "storescu": "dcmtk",
    "echoscu": "dcmtk",
    "storescp": "dcmtk",
    "dcmcjpeg": "dcmtk",
    "dcmcjpls": "dcmtk",
    "dcmconv": "dcmtk",
    "ojph_compress": "openjph-tools",
    "initdb": "postgresql",
    "dciodvfy": "dicom3tools",
    "dsrdump": "dcmtk",
    "dcmdump": "dcmtk",
    "mount": "mount",
}

# DCMTK 3.6.7 storescu proposes only uncompressed syntaxes unless told; the flag per transfer syntax UID.
STORESCU_SYNTAX_FLAGS = {
    "1.2.840.10008.1.2": "-xi",  # implicit VR little endian only
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def require_tool(tool: str) -> str:
    """Return the tool's path, or skip the test naming the Debian package that provides it (fail under CI)."""
    path = shutil.which(tool)
    if path is None:
        package = DEBIAN_PACKAGES.get(tool, "?")
        component_missing(
            f"{tool} not installed (Debian package {package}; `make test` installs it when run as root)"
        )
    return path


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    calling: str = "STORESCU",
    called: str = "MSKNODE",
    host: str = "127.0.0.1",
    syntax_flag: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK storescu (TCP_NODELAY on, as the benchmark and a well-configured PACS would)."""
    require_tool("storescu")
    args = ["storescu", "-aet", calling, "-aec", called, "-to", "30", "-ta", "30", "-td", "30"]
    if syntax_flag:
        args.append(syntax_flag)
    args += [*extra, host, str(port), *map(str, files)]
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def echoscu(
    port: int, *, calling: str = "ECHOSCU", called: str = "MSKNODE", host: str = "127.0.0.1"
) -> subprocess.CompletedProcess[str]:
    require_tool("echoscu")
    args = ["echoscu", "-aet", calling, "-aec", called, "-to", "10", "-ta", "10", "-td", "10", host, str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=30, env=dict(os.environ, TCP_NODELAY="1"))


def start_storescp(directory: Path, port: int, *extra: str, ae_title: str = "PACS") -> subprocess.Popen[bytes]:
    """A DCMTK storescp writing into ``directory`` (created), listening on ``port`` before this returns.

    TCP_NODELAY on, as a well-configured PACS would run it; stop it with ``terminate()`` / ``wait()``.
    """
    from tests.helpers.node import wait_for_port

    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([require_tool("storescp"), "-od", str(directory), "-aet", ae_title, *extra, str(port)],
                               env=dict(os.environ, TCP_NODELAY="1"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port("127.0.0.1", port, 10, process)
    return process
