"""``msknode status`` and the role heartbeats it reads.

Every role process runs a :class:`HeartbeatThread` that upserts its ``role_heartbeats`` row every
``HEARTBEAT_SECONDS`` with a small ``detail`` dict (the worker's says which engine is loaded). A role is
*alive* while its row was seen within ``ALIVE_SECONDS``. :func:`collect_status` gathers what an admin
looks at first: roles alive, queue depths, oldest pending work, dead letters, free disk, engine.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from node.settings import Settings
from storage.counters import BeatFailures, Counters
from storage.db import Database, utcnow
from storage.status import Heartbeats, oldest_pending_seconds, queue_depths

log = logging.getLogger("msknode.status")

HEARTBEAT_SECONDS = 5.0
ALIVE_SECONDS = 20.0  # four missed beats


def role_owner(role: str) -> str:
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


class HeartbeatThread:
    """Report this role process as alive, with ``detail`` (a dict the role may update while it runs)."""

    def __init__(self, database: Database, role: str, detail: dict[str, Any],
                 interval: float = HEARTBEAT_SECONDS) -> None:
        self.heartbeats = Heartbeats(database)
        self.role = role
        self.owner = role_owner(role)
        self.detail = detail
        # A failed beat is logged, counted and shown in the detail; the next beat tries again.
        self.failures = BeatFailures(Counters(database), detail, "heartbeat", role, "role")
        self.interval = interval
        self.started_at = utcnow()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"msknode-heartbeat-{role}", daemon=True)

    def start(self) -> "HeartbeatThread":
        self._thread.start()
        return self

    def beat(self) -> None:
        """One beat; never raises (a dead heartbeat thread would show a live role as dead)."""
        try:
            self.heartbeats.beat(self.owner, self.role, self.started_at, dict(self.detail))
        except SQLAlchemyError as exc:
            self.failures.failed(exc)
            log.warning("cannot record the %s heartbeat (database unavailable?); %d beat(s) failed in a row",
                        self.role, self.failures.consecutive)
        except Exception as exc:
            self.failures.failed(exc)
            log.exception("cannot record the %s heartbeat; retrying at the next beat", self.role)
        else:
            self.failures.succeeded()

    def _loop(self) -> None:
        self.beat()
        while not self._stop.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        """Stop beating and remove the row: a role stopped on purpose is not shown as dead."""
        self._stop.set()
        self._thread.join(self.interval + 5)
        try:
            self.heartbeats.forget(self.owner)
        except SQLAlchemyError:
            pass


def live_roles(database: Database) -> list[dict[str, Any]]:
    """Heartbeat rows with an ``alive`` flag."""
    rows = Heartbeats(database).list()
    for row in rows:
        row["alive"] = row["seen_seconds_ago"] <= ALIVE_SECONDS
    return rows


def engine_from_roles(roles: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The engine a live worker reports (backend, precision, device, model), or None."""
    for row in roles:
        if row["role"] == "worker" and row["alive"] and row["detail"].get("engine_loaded"):
            return dict(row["detail"].get("engine") or {})
    return None


def engines_from_roles(roles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every model a live worker reports loaded (configured name, family, name, version, hash, backend...), in
    configuration order; [] when none."""
    for row in roles:
        if row["role"] == "worker" and row["alive"] and row["detail"].get("engine_loaded"):
            listed = row["detail"].get("engines")
            return [dict(item) for item in listed] if listed else [dict(row["detail"].get("engine") or {})]
    return []


def configured_models(settings: Settings) -> list[dict[str, Any]]:
    """The configured models and what each applies to (``[[models]]`` or the one ``[engine] model``)."""
    out = []
    for entry in settings.model_entries:
        applies = {key: getattr(entry, key) for key in ("modalities", "body_parts", "view_positions", "lateralities",
                                                         "sop_classes") if getattr(entry, key)}
        out.append({"name": entry.name, "path": str(entry.path), "applies_to": applies or "every eligible image",
                    "heads": "all" if entry.heads is None else list(entry.heads)})
    return out


def spool_disk(settings: Settings) -> dict[str, Any]:
    """Free space of the spool's filesystem (its nearest existing ancestor if the spool is not made yet)."""
    path = settings.storage.spool_dir.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    watermark = settings.storage.min_free_disk_mb * 1024 * 1024
    return {
        "path": str(settings.storage.spool_dir),
        "free_bytes": usage.free,
        "total_bytes": usage.total,
        "min_free_bytes": watermark,
        "above_watermark": usage.free >= watermark,
    }


def collect_status(settings: Settings, database: Database) -> dict[str, Any]:
    """Everything ``msknode status`` shows, JSON-able."""
    roles = live_roles(database)
    depths = queue_depths(database)
    alive: dict[str, int] = {}
    for row in roles:
        if row["alive"]:
            alive[row["role"]] = alive.get(row["role"], 0) + 1
    return {
        "node": {"ae_title": settings.node.ae_title, "host": settings.node.host, "port": settings.node.port},
        "database": settings.storage.database_url.split(":", 1)[0].split("+", 1)[0],
        "roles_configured": list(dict.fromkeys(settings.pipeline.roles)),
        "roles_alive": alive,
        "processes": roles,
        "queues": depths,
        "oldest_pending_seconds": {k: round(v, 1) for k, v in oldest_pending_seconds(database).items()},
        "dead_letters": depths["outbox"].get("dead", 0) + depths["notifications"].get("dead", 0),
        "failed_jobs": depths["jobs"].get("failed", 0),
        "disk": spool_disk(settings),
        "engine": engine_from_roles(roles),
        "engines": engines_from_roles(roles),
        "engine_configured": {"model": ", ".join(str(e.path) for e in settings.model_entries),
                              "backend": settings.engine.backend},
        "models_configured": configured_models(settings),
    }
