"""The sender role: C-STORE result objects from the outbox to every destination peer.

One association per destination per round, TCP_NODELAY on its socket (small SR/SC messages otherwise wait
for delayed ACKs). Outcomes per instance:

- Success (0x0000) → delivered. Warning (0xB000, 0xB006, 0xB007) → delivered, warning logged.
- Transient: connection refused or timed out, association rejected *transient* or aborted, no response,
  0xA7xx (out of resources) → retried after an escalating delay (``sender.backoff_seconds``).
- Permanent: association rejected *permanent* (e.g. our AE title unknown to the peer), SOP class or transfer
  syntax not accepted even with the uncompressed fallback, any other failure status → dead letter with the
  reason. Nothing is retried forever: a row older than ``sender.max_age_hours`` is dead-lettered.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pydicom
from pynetdicom import AE
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.runtime.faults import fault_point
from node.dicom.scu import set_tcp_nodelay
from node.settings import PeerSettings, SenderSettings, backoff_delay
from node.dicom.tls import TlsConfigError, client_tls_args
from storage.db import as_utc, utcnow
from storage.outbox import Delivery, Outbox
from storage.spool import Spool

log = logging.getLogger("msknode.sender")

WARNING_STATUSES = {0xB000, 0xB006, 0xB007}
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@dataclass(frozen=True)
class Outcome:
    kind: str  # delivered, transient, permanent
    status: str
    detail: str


def classify_status(status: int) -> Outcome:
    if status == 0x0000:
        return Outcome("delivered", "0x0000", "success")
    if status in WARNING_STATUSES:
        return Outcome("delivered", f"0x{status:04X}", "delivered with warning")
    if 0xA700 <= status <= 0xA7FF:
        return Outcome("transient", f"0x{status:04X}", "destination out of resources")
    return Outcome("permanent", f"0x{status:04X}", "destination refused the instance")


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
    ) -> None:
        self.calling_ae_title = calling_ae_title
        self.peers = peers
        self.outbox = outbox
        self.spool = spool
        self.settings = settings
        self.owner = owner or f"sender@{socket.gethostname()}:{os.getpid()}"
        self.batch_size = batch_size

    def _peer(self, name: str) -> PeerSettings | None:
        for peer in self.peers():
            if peer.name == name:
                return peer
        return None

    def run_once(self) -> int:
        """Deliver what is due to every destination; returns the number of rows handled."""
        handled = 0
        for destination in self.outbox.destinations_due():
            lease = self.settings.timeout_seconds * 4 + 60
            items = self.outbox.claim(self.owner, lease, destination, self.batch_size)
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

    def _deliver(self, peer: PeerSettings, items: list[Delivery]) -> None:
        ae = AE(ae_title=self.calling_ae_title)
        timeout = self.settings.timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        for sop_class in sorted({item.sop_class_uid for item in items}):
            ae.add_requested_context(sop_class, UNCOMPRESSED)
        tls_args = None
        if peer.tls:
            try:
                tls_args = client_tls_args(self.settings.tls, peer.host)
            except TlsConfigError as exc:  # a local problem: keep the rows and retry once it is fixed
                for item in items:
                    self._give_up_or_retry(item, "tls-config", str(exc))
                return
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            primitive = assoc.acceptor.primitive if assoc.is_rejected else None
            if primitive is not None and primitive.result == 0x01:
                reason = f"association rejected permanently (source {primitive.result_source}, reason {primitive.diagnostic})"
                for item in items:
                    self.outbox.dead_letter(item.id, self.owner, "rejected", reason)
                log.error("destination %s rejected us permanently: %s", peer.name, reason)
                return
            refused = {cx.abstract_syntax for cx in assoc.rejected_contexts}
            if refused and not assoc.accepted_contexts:
                # The peer answered but accepted none of our presentation contexts (pynetdicom then aborts).
                for item in items:
                    self.outbox.dead_letter(
                        item.id, self.owner, "0x0122",
                        f"destination does not accept SOP class {item.sop_class_uid} (uncompressed offered)",
                    )
                log.error("destination %s accepts none of the result SOP classes", peer.name)
                return
            # pynetdicom reports a refused or timed-out connection as an aborted association.
            reason = "association rejected (transient)" if assoc.is_rejected else (
                "could not associate (connection refused, timed out or aborted)")
            for item in items:
                self._give_up_or_retry(item, "no-association", reason)
            return
        set_tcp_nodelay(assoc)
        try:
            accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
            for index, item in enumerate(items):
                if not assoc.is_established:
                    for rest in items[index:]:
                        self._give_up_or_retry(rest, "aborted", "association lost")
                    return
                if item.sop_class_uid not in accepted:
                    self.outbox.dead_letter(
                        item.id, self.owner, "0x0122",
                        f"destination does not accept SOP class {item.sop_class_uid} (uncompressed offered)",
                    )
                    continue
                try:
                    dataset = pydicom.dcmread(self.spool.absolute(item.path))
                except (OSError, pydicom.errors.InvalidDicomError) as exc:
                    self.outbox.dead_letter(item.id, self.owner, "local", f"result file unreadable: {exc}")
                    continue
                fault_point("sender.before_send")
                status = assoc.send_c_store(dataset)
                if status is None or "Status" not in status:
                    self._give_up_or_retry(item, "no-response", "no C-STORE response (timeout or abort)")
                    continue
                outcome = classify_status(int(status.Status))
                if outcome.kind == "delivered":
                    self.outbox.delivered(item.id, self.owner, outcome.status)
                    if outcome.status != "0x0000":
                        log.warning("delivery %d to %s: %s %s", item.id, peer.name, outcome.status, outcome.detail)
                elif outcome.kind == "transient":
                    self._give_up_or_retry(item, outcome.status, outcome.detail)
                else:
                    self.outbox.dead_letter(item.id, self.owner, outcome.status, outcome.detail)
                    log.error("dead letter %d to %s: %s", item.id, peer.name, outcome.status)
        finally:
            if assoc.is_established:
                assoc.release()
