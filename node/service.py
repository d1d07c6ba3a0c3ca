"""Running the node: ``msknode serve`` wires settings, storage and the receiver, and stops cleanly."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

from node.receiver import Receiver
from node.settings import Settings
from storage.db import Database
from storage.index import Index
from storage.migrate import upgrade
from storage.spool import Spool

log = logging.getLogger("msknode.serve")

ROLES = ("all", "receiver")


@dataclass
class Runtime:
    """What a running node holds; built by :func:`open_runtime`."""

    settings: Settings
    database: Database
    index: Index
    spool: Spool


def open_runtime(settings: Settings) -> Runtime:
    """Migrate the database and open the spool (every role does this at start)."""
    revision = upgrade(settings.storage.database_url)
    log.info("database at revision %s", revision)
    database = Database(settings.storage.database_url)
    spool = Spool(settings.storage.spool_dir, fsync=settings.storage.fsync)
    return Runtime(settings, database, Index(database), spool)


def build_receiver(runtime: Runtime) -> Receiver:
    settings = runtime.settings
    return Receiver(
        node=settings.node,
        peers=lambda: settings.peers,
        index=runtime.index,
        spool=runtime.spool,
        min_free_disk_mb=settings.storage.min_free_disk_mb,
    )


def serve(settings: Settings, role: str = "all", stop_event: threading.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or ``stop_event``); open associations get a grace period, then abort."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    runtime = open_runtime(settings)
    interrupted = runtime.index.close_interrupted_associations()
    if interrupted:
        log.warning("%d association(s) were open when the node last stopped; marked interrupted", interrupted)
    swept = runtime.spool.sweep_incoming()
    if swept:
        log.info("removed %d unacknowledged partial file(s) from the spool", swept)

    stop = stop_event or threading.Event()

    def _request_stop(signum: int, _frame: object) -> None:
        log.info("signal %s received: stopping", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _request_stop)
        signal.signal(signal.SIGINT, _request_stop)

    receiver = build_receiver(runtime)
    receiver.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        receiver.stop()
        runtime.database.dispose()
        log.info("stopped")
