"""``/healthz``: is this node able to take and process studies right now?

Healthy only when all four hold: the database answers, the spool is writable and above
``storage.min_free_disk_mb``, the SCP accepts TCP connections on ``node.host:port``, and a live worker
reports its engine loaded. Each check gives a small JSON detail, so a 503 says which one failed.
The SCP check is a bare TCP connect (closed at once): a C-ECHO would need the node to be its own peer and
would add an audit row per probe.
"""

from __future__ import annotations

import socket
import tempfile
from typing import Any

from node.settings import Settings
from node.runtime.status import engine_from_roles, engines_from_roles, live_roles, spool_disk
from storage.db import Database
from storage.status import ping


def _check(function, *args: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    try:
        return function(*args)
    except Exception as exc:  # a check must report, never raise
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def check_database(database: Database) -> dict[str, Any]:
    ping(database)
    return {"ok": True}


def check_spool(settings: Settings) -> dict[str, Any]:
    directory = settings.storage.spool_dir
    if not directory.is_dir():
        return {"ok": False, "error": f"spool directory {directory} does not exist"}
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".healthz-"):
            pass  # created, then deleted on close
    except OSError as exc:
        return {"ok": False, "writable": False, "error": f"cannot write to {directory}: {exc.strerror}"}
    disk = spool_disk(settings)
    result: dict[str, Any] = {
        "ok": disk["above_watermark"],
        "writable": True,
        "free_bytes": disk["free_bytes"],
        "min_free_bytes": disk["min_free_bytes"],
    }
    if not disk["above_watermark"]:
        result["error"] = "free disk below storage.min_free_disk_mb"
    return result


def scp_address(settings: Settings) -> tuple[str, int]:
    """Where to probe the SCP: a wildcard listen address is reached through loopback."""
    host = settings.node.host
    if host in ("0.0.0.0", "", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, settings.node.port


def check_scp(settings: Settings, timeout: float = 2.0) -> dict[str, Any]:
    host, port = scp_address(settings)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        return {"ok": False, "address": f"{host}:{port}", "error": exc.strerror or type(exc).__name__}
    return {"ok": True, "address": f"{host}:{port}"}


def check_engine(database: Database) -> dict[str, Any]:
    roles = live_roles(database)
    engine = engine_from_roles(roles)
    if engine is None:
        return {"ok": False, "error": "no live worker reports a loaded engine"}
    models = [{key: item.get(key) for key in ("configured_name", "family", "name", "version", "encoder_sha256",
                                               "heads", "reported_heads", "backend", "precision", "device", "model")
               if key in item} for item in engines_from_roles(roles)]
    return {"ok": True, **engine, "models": models}  # the first model's keys at the top (one-model readers)


def check_health(settings: Settings, database: Database) -> tuple[bool, dict[str, Any]]:
    """``(healthy, {"database": {...}, "spool": {...}, "scp": {...}, "engine": {...}})``."""
    database_check = _check(check_database, database)
    checks = {
        "database": database_check,
        "spool": _check(check_spool, settings),
        "scp": _check(check_scp, settings),
        "engine": _check(check_engine, database) if database_check["ok"]
        else {"ok": False, "error": "database unavailable"},
    }
    return all(check["ok"] for check in checks.values()), checks
