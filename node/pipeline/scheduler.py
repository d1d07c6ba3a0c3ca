"""The scheduler role: APScheduler jobs for study completion and housekeeping.

- completion: every ``pipeline.poll_seconds``, queue the studies that have settled (storage.completion);
- spool hygiene: every 10 minutes, remove partial receive files older than an hour (never acknowledged);
- retention: every 5 minutes, purge finished, delivered studies past ``retention.days``, and the oldest
  finished ones while free disk is below twice the watermark (undelivered work is never deleted).
"""

from __future__ import annotations

import logging
import threading

from apscheduler.schedulers.background import BackgroundScheduler

from node.peers import PeerDirectory
from node.pipeline.triage import Triage
from node.settings import Settings
from storage import completion
from storage.db import Database
from storage.queue import JobQueue
from storage.retention import Retention
from storage.spool import Spool

log = logging.getLogger("msknode.scheduler")


class Scheduler:
    def __init__(self, settings: Settings, database: Database, spool: Spool) -> None:
        self.settings = settings
        self.database = database
        self.spool = spool
        self.queue = JobQueue(database)
        self.triage = Triage(settings.triage, None)  # queue-time rules name only calling_ae / peer
        self.peers = PeerDirectory(settings, database)  # file + database overlay, so CLI edits apply

    def _initial_priority(self, calling_ae_title: str | None) -> int:
        """The rank a new job is queued with, as triage decides it (Triage.starting); the queue stores it as given."""
        peer = self.peers.by_ae_title(calling_ae_title)
        # The peer's priority, or a higher one from a triage rule that names only the sender (node/pipeline/triage.py).
        return self.triage.starting(calling_ae_title, peer.name if peer else None, peer.priority if peer else None).rank

    def _settle_seconds_for(self, calling_ae_title: str | None) -> float:
        peer = self.peers.by_ae_title(calling_ae_title)
        if peer is not None and peer.settle_seconds is not None:
            return peer.settle_seconds
        return self.settings.pipeline.settle_seconds

    def completion_tick(self) -> None:
        try:
            decisions = completion.tick(
                self.database,
                self.queue,
                self._settle_seconds_for,
                self.settings.pipeline.force_complete_seconds,
                self._initial_priority,
            )
        except Exception:
            log.exception("completion pass failed")
            return
        for decision in decisions:
            if decision.complete:
                log.info(
                    "study %s revision %d complete%s: queued",
                    decision.study_instance_uid, decision.revision, " (forced)" if decision.forced else "",
                )

    def sweep(self) -> None:
        removed = self.spool.sweep_incoming(older_than_seconds=3600)
        if removed:
            log.info("removed %d stale partial receive file(s)", removed)

    def retention(self) -> None:
        settings = self.settings
        try:
            Retention(self.database, self.spool).run(
                settings.retention.days,
                lambda: self.spool.has_room(settings.storage.min_free_disk_mb * 2),
                emergency=settings.retention.emergency_cleanup,
            )
        except Exception:
            log.exception("retention pass failed")
        try:  # notification payloads and the association audit: kept as long as the studies, no longer
            Retention(self.database, self.spool).purge_records(settings.retention.days)
        except Exception:
            log.exception("retention of notifications and audit rows failed")

    def run(self, stop: threading.Event) -> None:
        scheduler = BackgroundScheduler(timezone="UTC")
        scheduler.add_job(self.completion_tick, "interval", seconds=self.settings.pipeline.poll_seconds,
                          max_instances=1, coalesce=True, id="completion")
        scheduler.add_job(self.sweep, "interval", minutes=10, max_instances=1, coalesce=True, id="sweep")
        scheduler.add_job(self.retention, "interval", minutes=5, max_instances=1, coalesce=True, id="retention")
        scheduler.start()
        try:
            stop.wait()
        finally:
            scheduler.shutdown(wait=True)
