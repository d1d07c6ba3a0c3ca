"""A throwaway PostgreSQL cluster from Debian's binaries, for the PostgreSQL variant of the storage tests.

``initdb`` refuses to run as root, so as root the cluster is created and run as the ``postgres`` system
user (``runuser -u postgres --``) in a directory it owns; otherwise as the current user. It listens on a
free loopback port with trust authentication and is stopped (``pg_ctl stop -m immediate``) at the end.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.components import component_missing
from tests.helpers.node import free_port, wait_for_port


class PostgresUnavailable(Exception):
    """Why no cluster could be started (a skip reason locally, a failure under CI)."""


def find_bin_dir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


@dataclass
class PostgresCluster:
    bin_dir: Path
    data_dir: Path
    port: int
    user: str
    run_as: list[str]

    def _run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.run_as, *args], capture_output=True, text=True, timeout=timeout)

    @classmethod
    def start(cls) -> "PostgresCluster":
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise PostgresUnavailable(
                "PostgreSQL initdb not installed (Debian package postgresql; `make test` installs it when run as root)"
            )
        run_as: list[str] = []
        user = pwd.getpwuid(os.getuid()).pw_name
        base = Path(tempfile.mkdtemp(prefix="msknode-pg-"))
        if os.getuid() == 0:
            try:
                pg_user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and no 'postgres' user to run initdb as") from None
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root and runuser (Debian util-linux) is missing")
            os.chown(base, pg_user.pw_uid, pg_user.pw_gid)
            run_as = ["runuser", "-u", "postgres", "--"]
            user = "postgres"
        cluster = cls(bin_dir, base / "data", free_port(), user, run_as)
        init = cluster._run(
            str(bin_dir / "initdb"), "-D", str(cluster.data_dir), "-A", "trust", "-U", user, "-E", "UTF8",
            "--no-sync",
        )
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {init.stderr.strip()[-500:]}")
        options = (
            f"-c listen_addresses=127.0.0.1 -p {cluster.port} -c unix_socket_directories={base} "
            "-c fsync=off -c max_connections=200"
        )
        started = cluster._run(
            str(bin_dir / "pg_ctl"), "-D", str(cluster.data_dir), "-o", options, "-l", str(base / "server.log"),
            "-w", "-t", "60", "start",
        )
        if started.returncode != 0:
            log = (base / "server.log").read_text(errors="replace") if (base / "server.log").exists() else ""
            raise PostgresUnavailable(f"pg_ctl start failed: {started.stderr.strip()} {log[-500:]}")
        wait_for_port("127.0.0.1", cluster.port, 30)
        return cluster

    def stop(self) -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "stop")
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def start_or_give_up() -> PostgresCluster:
    """A started cluster; when none can be started, skip naming why (fail under CI)."""
    try:
        return PostgresCluster.start()
    except PostgresUnavailable as exc:
        component_missing(str(exc))

