"""``msknode serve`` on one machine: one child process per role, restarted if it dies.

Roles share only the database and the spool, so each runs as its own process (``msknode serve --role
NAME``): inference never shares an interpreter (or a GIL) with the receiver. Children are started with
PR_SET_PDEATHSIG so that a supervisor killed with SIGKILL takes its roles with it instead of leaving them
holding the DICOM port (SIGKILL: exactly what happened to the parent).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("msknode.supervisor")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


@dataclass
class Child:
    role: str
    index: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff: float = 1.0
    next_start: float = field(default=0.0)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}" if self.index else self.role


class Supervisor:
    """Start every role, restart the ones that die (with backoff), stop them all on SIGTERM."""

    def __init__(self, roles: list[tuple[str, int]], config_path: Path | None, grace_seconds: float = 15.0) -> None:
        self.children = [Child(role, i) for role, count in roles for i in range(count)]
        self.config_path = config_path
        self.grace_seconds = grace_seconds

    def _command(self, child: Child) -> list[str]:
        command = [sys.executable, "-m", "node", "serve", "--role", child.role]
        if self.config_path is not None:
            command += ["--config", str(self.config_path)]
        return command

    def _start(self, child: Child) -> None:
        env = dict(os.environ, MSKNODE_ROLE_INSTANCE=str(child.index))
        child.process = subprocess.Popen(self._command(child), preexec_fn=_die_with_parent, env=env)
        child.started_at = time.monotonic()
        log.info("started role %s (pid %d)", child.name, child.process.pid)

    def run(self, stop: threading.Event) -> None:
        for child in self.children:
            self._start(child)
        try:
            while not stop.wait(0.5):
                now = time.monotonic()
                for child in self.children:
                    process = child.process
                    if process is not None and process.poll() is None:
                        if now - child.started_at > 60:
                            child.backoff = 1.0  # it has been healthy for a while
                        continue
                    if process is not None:
                        log.error("role %s exited with %s; restarting in %.0f s", child.name, process.returncode, child.backoff)
                        child.process = None
                        child.next_start = now + child.backoff
                        child.backoff = min(child.backoff * 2, 60.0)
                        child.restarts += 1
                    elif now >= child.next_start:
                        self._start(child)
        finally:
            self.stop_all()

    def stop_all(self) -> None:
        running = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in running:
            child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + self.grace_seconds
        for child in running:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.process.wait(remaining)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                log.warning("role %s did not stop in time; killing it", child.name)
                child.process.kill()  # type: ignore[union-attr]
                child.process.wait()  # type: ignore[union-attr]
