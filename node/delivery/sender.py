"""The sender role: deliver result objects from the outbox to every destination peer.

For each destination with rows due, one batch is claimed (with a lease) and handed to the peer's
:class:`~node.delivery.destinations.Destination` (DIMSE, :mod:`node.delivery.dimse`, or DICOMweb STOW-RS,
:mod:`node.delivery.dicomweb`), and each
outcome is recorded as soon as it is known: delivered → done; transient → retried after an escalating delay
(``sender.backoff_seconds``); permanent → dead letter with the reason. Nothing is retried forever: a row
older than ``sender.max_age_hours`` is dead-lettered.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence

import pydicom

from node.delivery import dicomweb, dimse  # noqa: F401 -- register the DICOMweb and DIMSE destinations
from node.delivery.destinations import (
    DELIVERED,
    TRANSIENT,
    Destination,
    Outcome,
    build,
    protocol_of,
)
from node.delivery.dimse import classify_status
from node.settings import PeerSettings, SenderSettings, backoff_delay
from storage.db import as_utc, utcnow
from storage.outbox import Delivery, Outbox
from storage.spool import Spool

log = logging.getLogger("msknode.sender")

__all__ = ["Sender", "Outcome", "backoff_delay", "classify_status"]


class Sender:
    def __init__(
        self,
        calling_ae_title: str,
        peers: Callable[[], Sequence[PeerSettings]],
        outbox: Outbox,
        spool: Spool,
        settings: SenderSettings,
        owner: str | None = None,
        batch_size: int = 32,
        lease_seconds: float | None = None,
    ) -> None:
        self.calling_ae_title = calling_ae_title
        self.peers = peers
        self.outbox = outbox
        self.spool = spool
        self.settings = settings
        self.owner = owner or f"sender@{socket.gethostname()}:{os.getpid()}"
        self.batch_size = batch_size
        # A claimed batch's lease; renewed every third of it while the batch sends (see _deliver).
        self.lease_seconds = lease_seconds or settings.timeout_seconds * 4 + 60
        self._destinations: dict[str, Destination] = {}

    def _peer(self, name: str) -> PeerSettings | None:
        for peer in self.peers():
            if peer.name == name:
                return peer
        return None

    def run_once(self) -> int:
        """Deliver what is due to every destination; returns the number of rows handled."""
        handled = 0
        for destination in self.outbox.destinations_due():
            items = self.outbox.claim(self.owner, self.lease_seconds, destination, self.batch_size,
                                      max_senders=self.settings.max_concurrent_per_destination)
            if not items:
                continue
            peer = self._peer(destination)
            if peer is None or not peer.receives_results:
                for item in items:
                    self.outbox.dead_letter(item.id, self.owner, "config", f"destination {destination!r} is no longer configured to receive results")
                handled += len(items)
                continue
            self._deliver(peer, items)
            handled += len(items)
        return handled

    def run(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # keep the role alive; the lease makes the rows come back
                log.exception("sender round failed")
                busy = 0
            if not busy:
                stop.wait(poll_seconds)

    # -- one destination ---------------------------------------------------------------------
    def _give_up_or_retry(self, item: Delivery, status: str, error: str) -> None:
        age_hours = (utcnow() - as_utc(item.created_at)).total_seconds() / 3600
        if age_hours >= self.settings.max_age_hours:
            self.outbox.dead_letter(
                item.id, self.owner, status, f"gave up after {item.attempts} attempt(s) over {age_hours:.1f} h: {error}"
            )
            log.error("dead letter %d to %s: gave up (%s)", item.id, item.destination, error)
            return
        delay = backoff_delay(self.settings.backoff_seconds, item.attempts)
        self.outbox.retry_later(item.id, self.owner, status, error, delay)
        log.warning("delivery %d to %s failed (%s); retry in %.0f s", item.id, item.destination, error, delay)

    def _destination(self, peer: PeerSettings) -> Destination:
        protocol = protocol_of(peer)
        if protocol not in self._destinations:
            self._destinations[protocol] = build(protocol, calling_ae_title=self.calling_ae_title, settings=self.settings)
        return self._destinations[protocol]

    def _read_result(self, item: Delivery) -> pydicom.Dataset:
        return pydicom.dcmread(self.spool.absolute(item.path))

    def _deliver(self, peer: PeerSettings, items: list[Delivery]) -> None:
        """Send one claimed batch; every item ends its attempt, whatever is raised on the way.

        A thread renews the lease of the items still to be sent every third of the lease, so a slow peer's
        batch is never claimed again by another sender mid-send. An exception out of the destination ends the
        attempt of every item it had not answered for (transient: counted, backed off, aged out after
        ``max_age_hours``) instead of leaving them ``sending`` until the lease expires.
        """
        unsettled = {item.id: item for item in items}
        lock = threading.Lock()
        finished = threading.Event()
        renewer = threading.Thread(target=self._renew_while_sending, args=(unsettled, lock, finished),
                                   name="msknode-sender-lease", daemon=True)
        renewer.start()
        try:
            try:
                for item, outcome in self._destination(peer).deliver(peer, items, self._read_result):
                    with lock:
                        unsettled.pop(item.id, None)
                    self._record_safely(peer, item, outcome)
            except Exception as exc:
                log.exception("delivery to %s failed mid-batch; ending the attempt of the items not yet sent",
                              peer.name)
                with lock:
                    rest = list(unsettled.values())
                    unsettled.clear()
                failure = Outcome(TRANSIENT, "error", f"delivery failed: {type(exc).__name__}: {exc}"[:500])
                for item in rest:
                    self._record_safely(peer, item, failure)
        finally:
            finished.set()
            renewer.join()

    def _renew_while_sending(self, unsettled: dict[int, Delivery], lock: threading.Lock,
                             finished: threading.Event) -> None:
        while not finished.wait(self.lease_seconds / 3):
            with lock:
                ids = list(unsettled)
            if not ids:
                continue
            try:
                lost = self.outbox.renew(self.owner, ids, self.lease_seconds)
            except Exception:  # the database is away: try again at the next third of the lease
                log.warning("cannot renew the lease of %d delivery(ies); retrying", len(ids), exc_info=True)
                continue
            for item_id in lost:
                log.warning("lease on delivery %d lost; another sender records its outcome", item_id)

    def _record_safely(self, peer: PeerSettings, item: Delivery, outcome: Outcome) -> None:
        try:
            self._record(peer, item, outcome)
        except Exception:  # the database is away: the row comes back when its lease expires
            log.exception("cannot record the outcome of delivery %d (%s); it is retried after its lease",
                          item.id, outcome.kind)

    def _record(self, peer: PeerSettings, item: Delivery, outcome: Outcome) -> None:
        if outcome.kind == DELIVERED:
            self.outbox.delivered(item.id, self.owner, outcome.status)
            if outcome.status not in ("0x0000", "200"):  # a DIMSE warning status, an HTTP 202
                log.warning("delivery %d to %s: %s %s", item.id, peer.name, outcome.status, outcome.detail)
        elif outcome.kind == TRANSIENT:
            self._give_up_or_retry(item, outcome.status, outcome.detail)
        else:
            self.outbox.dead_letter(item.id, self.owner, outcome.status, outcome.detail)
            log.error("dead letter %d to %s: %s %s", item.id, peer.name, outcome.status, outcome.detail)
