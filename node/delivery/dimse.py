"""The DIMSE destination: C-STORE of results to a peer, one association per batch.

TCP_NODELAY on its socket (small SR/SC messages otherwise wait for delayed ACKs); uncompressed transfer
syntaxes are offered. Outcomes per result (see :class:`~node.delivery.destinations.Outcome`):

- Success (0x0000) → delivered. Warning (0xB000, 0xB006, 0xB007) → delivered, with the warning as status.
- Transient: connection refused or timed out, association rejected *transient* or aborted, no response,
  0xA7xx (out of resources), a local TLS configuration problem (kept until it is fixed).
- Permanent: association rejected *permanent* (e.g. our AE title unknown to the peer), SOP class not
  accepted, an unreadable result file, any other failure status (PS3.4 Annex B.2.3).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from node.delivery.destinations import (
    DELIVERED,
    PERMANENT,
    TRANSIENT,
    Outcome,
    ResultReader,
    register,
)
from node.dicom.scu import set_tcp_nodelay
from node.dicom.tls import TlsConfigError, client_tls_args
from node.runtime.faults import fault_point
from node.settings import PeerSettings, SenderSettings
from storage.outbox import Delivery

log = logging.getLogger("msknode.sender")

WARNING_STATUSES = {0xB000, 0xB006, 0xB007}
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def classify_status(status: int) -> Outcome:
    """A C-STORE response status as an outcome (PS3.4 Annex B.2.3; 0xA7xx = out of resources)."""
    if status == 0x0000:
        return Outcome(DELIVERED, "0x0000", "success")
    if status in WARNING_STATUSES:
        return Outcome(DELIVERED, f"0x{status:04X}", "delivered with warning")
    if 0xA700 <= status <= 0xA7FF:
        return Outcome(TRANSIENT, f"0x{status:04X}", "destination out of resources")
    return Outcome(PERMANENT, f"0x{status:04X}", "destination refused the instance")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _not_accepted(item: Delivery) -> Outcome:
    return Outcome(PERMANENT, "0x0122", f"destination does not accept SOP class {item.sop_class_uid} (uncompressed offered)")


class DimseDestination:
    """C-STORE SCU towards one peer per :meth:`deliver` call."""

    def __init__(self, calling_ae_title: str, settings: SenderSettings) -> None:
        self.calling_ae_title = calling_ae_title
        self.settings = settings

    def deliver(self, peer: PeerSettings, items: Sequence[Delivery], read: ResultReader) -> Iterator[tuple[Delivery, Outcome]]:
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
                yield from ((item, Outcome(TRANSIENT, "tls-config", str(exc))) for item in items)
                return
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            yield from self.not_associated(peer, items, assoc)
            return
        set_tcp_nodelay(assoc)
        try:
            accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
            for index, item in enumerate(items):
                if not assoc.is_established:
                    yield from ((rest, Outcome(TRANSIENT, "aborted", "association lost")) for rest in items[index:])
                    return
                if item.sop_class_uid not in accepted:
                    yield item, _not_accepted(item)
                    continue
                try:
                    dataset = read(item)
                except (OSError, pydicom.errors.InvalidDicomError) as exc:
                    yield item, Outcome(PERMANENT, "local", f"result file unreadable: {exc}")
                    continue
                except Exception as exc:  # anything else ends this item's attempt only (retried, aged out)
                    yield item, Outcome(TRANSIENT, "local", f"reading the result failed: {_describe(exc)}")
                    continue
                fault_point("sender.before_send")
                try:
                    status = assoc.send_c_store(dataset)
                except Exception as exc:  # e.g. a dataset pynetdicom cannot encode; the association goes on
                    yield item, Outcome(TRANSIENT, "local", f"C-STORE failed: {_describe(exc)}")
                    continue
                if status is None or "Status" not in status or not isinstance(status.Status, int):
                    yield item, Outcome(TRANSIENT, "no-response", "no C-STORE response (timeout or abort)")
                    continue
                yield item, classify_status(int(status.Status))
        finally:
            if assoc.is_established:
                assoc.release()

    @staticmethod
    def not_associated(peer: PeerSettings, items: Sequence[Delivery], assoc) -> Iterator[tuple[Delivery, Outcome]]:  # type: ignore[no-untyped-def]
        primitive = assoc.acceptor.primitive if assoc.is_rejected else None
        if primitive is not None and primitive.result == 0x01:
            reason = f"association rejected permanently (source {primitive.result_source}, reason {primitive.diagnostic})"
            log.error("destination %s rejected us permanently: %s", peer.name, reason)
            yield from ((item, Outcome(PERMANENT, "rejected", reason)) for item in items)
            return
        refused = {cx.abstract_syntax for cx in assoc.rejected_contexts}
        if refused and not assoc.accepted_contexts:
            # The peer answered but accepted none of our presentation contexts (pynetdicom then aborts).
            log.error("destination %s accepts none of the result SOP classes", peer.name)
            yield from ((item, _not_accepted(item)) for item in items)
            return
        # pynetdicom reports a refused or timed-out connection as an aborted association.
        reason = "association rejected (transient)" if assoc.is_rejected else (
            "could not associate (connection refused, timed out or aborted)")
        yield from ((item, Outcome(TRANSIENT, "no-association", reason)) for item in items)


register("dimse", DimseDestination)
