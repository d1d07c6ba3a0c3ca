"""A real ``msknode serve`` subprocess on a free loopback port, and ways to look at what it stored.

Tests talk to the node only as a peer would (DCMTK, pynetdicom, raw sockets) and inspect the result the
way an admin would: the spool directory, the database rows and the log.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from storage.db import Database
from storage.models import Association, Instance, InstanceReplacement, Series, Study

REPO_ROOT = Path(__file__).resolve().parents[2]
MSKNODE = [sys.executable, "-m", "node"]
NODE_AE = "MSKNODE"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the node binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy (and return that), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Peer:
    name: str
    ae_title: str
    host: str = "127.0.0.1"
    port: int = 104
    may_send: bool = True
    receives_results: bool = False
    priority: str = "routine"
    # DICOMweb: the token it presents to the node's STOW-RS (written hashed), and how results reach it
    stow_token: str | None = None
    protocol: str = "dimse"
    url: str | None = None
    auth: str = "none"
    username: str | None = None
    secret_file: Path | None = None


DEFAULT_PEERS = (
    Peer("dcmtk-storescu", "STORESCU"),
    Peer("dcmtk-echoscu", "ECHOSCU"),
    Peer("pynetdicom", "PYSCU"),
)


@dataclass
class NodeConfig:
    """What a test may vary; everything else is the node's defaults."""

    directory: Path
    port: int = field(default_factory=free_port)
    database_url: str | None = None  # default: SQLite in ``directory``
    max_associations: int = 10
    max_pdu_size: int = 0
    min_free_disk_mb: int = 0
    fsync: bool = True
    peers: Sequence[Peer] = DEFAULT_PEERS
    log_level: str = "INFO"
    acse_timeout_seconds: float = 10.0
    extra_node: dict[str, Any] = field(default_factory=dict)
    # Intake tests run the receiver role alone (one process, no model loaded); pipeline tests add the rest.
    roles: Sequence[str] = ("receiver",)
    # The web role's port (written as [web] only when set; the dashboard tests add "web" to the roles).
    web_port: int | None = None
    # The dicomweb role's port (written as [dicomweb] only when set; STOW-RS tests add "dicomweb" to the roles).
    dicomweb_port: int | None = None
    # TOML appended as it is (whole tables, e.g. "[dicomweb.tls]\n...")
    extra_toml: str = ""

    @property
    def spool_dir(self) -> Path:
        return self.directory / "spool"

    @property
    def path(self) -> Path:
        return self.directory / "msknode.toml"

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.directory / 'msknode.db'}"

    def write(self) -> Path:
        def toml_value(value: Any) -> str:
            if isinstance(value, bool):
                return "true" if value else "false"
            if isinstance(value, (int, float)):
                return str(value)
            return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = [
            "[node]",
            f'ae_title = "{NODE_AE}"',
            'host = "127.0.0.1"',
            f"port = {self.port}",
            f"max_associations = {self.max_associations}",
            f"max_pdu_size = {self.max_pdu_size}",
            f"acse_timeout_seconds = {self.acse_timeout_seconds}",
            "dimse_timeout_seconds = 30",
            "network_timeout_seconds = 30",
            *(f"{key} = {toml_value(value)}" for key, value in self.extra_node.items()),
            "",
            "[storage]",
            f"database_url = {toml_value(self.url)}",
            f"spool_dir = {toml_value(self.spool_dir)}",
            f"min_free_disk_mb = {self.min_free_disk_mb}",
            f"fsync = {toml_value(self.fsync)}",
            "",
            "[pipeline]",
            "roles = [" + ", ".join(toml_value(role) for role in self.roles) + "]",
            "",
            "[logging]",
            f'level = "{self.log_level}"',
            "",
        ]
        if self.web_port is not None:
            lines += [
                "[web]",
                'host = "127.0.0.1"',
                f"port = {self.web_port}",
                f"secret_key_file = {toml_value(self.directory / 'web-secret')}",
                "",
            ]
        if self.dicomweb_port is not None:
            lines += [
                "[dicomweb]",
                'host = "127.0.0.1"',
                f"port = {self.dicomweb_port}",
                "timeout_seconds = 20",
                "",
            ]
        for peer in self.peers:
            lines += [
                "[[peers]]",
                f'name = "{peer.name}"',
                f'ae_title = "{peer.ae_title}"',
                f'host = "{peer.host}"',
                f"port = {peer.port}",
                f"may_send = {toml_value(peer.may_send)}",
                f"receives_results = {toml_value(peer.receives_results)}",
                f'priority = "{peer.priority}"',
                f'protocol = "{peer.protocol}"',
                f'auth = "{peer.auth}"',
                *([f"stow_token_sha256 = {toml_value(hashlib.sha256(peer.stow_token.encode()).hexdigest())}"]
                  if peer.stow_token else []),
                *([f"url = {toml_value(peer.url)}"] if peer.url else []),
                *([f"username = {toml_value(peer.username)}"] if peer.username else []),
                *([f"secret_file = {toml_value(peer.secret_file)}"] if peer.secret_file else []),
                "",
            ]
        if self.extra_toml:
            lines += ["", self.extra_toml, ""]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(lines))
        return self.path


class NodeProcess:
    """``msknode serve -c <config>`` as a child process; its combined output goes to ``log_path``."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = config.directory / "serve.log"
        self.starts = 0

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def spool(self) -> Path:
        return self.config.spool_dir

    @property
    def incoming(self) -> Path:
        return self.config.spool_dir / ".incoming"

    def start(self, timeout: float = 60.0) -> "NodeProcess":
        self.config.write()
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n--- start {self.starts} ---\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            [*MSKNODE, "serve", "-c", str(self.config.path)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        log.close()
        try:
            self._wait_until_listening(timeout)
        except Exception:
            self.kill()
            raise RuntimeError(f"msknode serve did not start:\n{self.log()}") from None
        return self

    def _wait_until_listening(self, timeout: float) -> None:
        """Wait for this start's "listening" log line.

        Not a TCP connect probe: a connection that never sends an A-ASSOCIATE-RQ stays open on the node
        until its ACSE timeout, which would skew association-limit and shutdown tests.
        """
        marker = f"--- start {self.starts} ---"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}")
            text = self.log()
            if "listening as" in text[text.rfind(marker):]:
                return
            time.sleep(0.1)
        raise TimeoutError(f"not listening after {timeout} s")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"msknode serve did not stop within {timeout} s of SIGTERM") from None

    def kill(self) -> None:
        """SIGKILL: the crash case (no clean-up code runs)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- what the node stored ------------------------------------------------------------------
    def spool_files(self) -> list[Path]:
        """Committed instance files (everything under the spool except ``.incoming``)."""
        return sorted(p for p in self.spool.rglob("*.dcm") if ".incoming" not in p.parts)

    def incoming_files(self) -> list[Path]:
        return sorted(p for p in self.incoming.iterdir()) if self.incoming.exists() else []

    @contextmanager
    def database(self) -> Iterator[Database]:
        database = Database(self.config.url)
        try:
            yield database
        finally:
            database.dispose()

    def instances(self) -> list[Instance]:
        with self.database() as db, db.session() as session:
            return list(session.scalars(select(Instance).order_by(Instance.id)))

    def instance_count(self) -> int:
        with self.database() as db, db.session() as session:
            return int(session.scalar(select(func.count(Instance.id))) or 0)

    def associations(self) -> list[Association]:
        with self.database() as db, db.session() as session:
            return list(session.scalars(select(Association).order_by(Association.started_at)))

    def replacements(self) -> list[InstanceReplacement]:
        with self.database() as db, db.session() as session:
            return list(session.scalars(select(InstanceReplacement)))

    def study_and_series_counts(self) -> tuple[int, int]:
        with self.database() as db, db.session() as session:
            return (
                int(session.scalar(select(func.count(Study.id))) or 0),
                int(session.scalar(select(func.count(Series.id))) or 0),
            )

    def wait_for_associations_closed(self, timeout: float = 10.0) -> list[Association]:
        """Association rows are finished by the node after the peer's release arrives: wait for it."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.associations()
            if all(row.outcome != "open" for row in rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)
