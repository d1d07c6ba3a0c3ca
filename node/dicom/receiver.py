"""The receiver role: a pynetdicom Verification and Storage SCP that never decodes pixel data.

Each C-STORE arrives as a Part 10 file written by pynetdicom in chunks straight to the spool's
``.incoming`` directory (``STORE_RECV_CHUNKED_DATASET``), so a 500 MB instance never sits in memory.
The file is SHA-256-hashed as it is written (the spool names it by that hash). The handler reads only the
header, makes the file durable (fsync + atomic rename + directory fsync), commits its index row, and only
then answers Success. Every association, accepted or rejected, is written
to the audit table. Logs name AE titles and UIDs, never patient names or IDs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from node.dicom.policy import decide
from node.dicom.provenance import ResultRecognition
from node.dicom.pynetdicom_patches import (
    copy_contexts_cheaply,
    discard_partial_transfer,
    drop_standard_log_handlers,
    enable_chunked_storage,
    make_quiet,
    received_digest,
)
from node.settings import NodeSettings, PeerSettings
from node.dicom.tls import server_context
from node.intake import STATUS_SUCCESS, Intake, Refused
from storage.intake import IntakeRepository
from storage.spool import Spool

log = logging.getLogger("msknode.receiver")

# PS3.4 B.2.3 C-STORE status codes (node/intake.py holds those intake answers with)
STATUS_PROCESSING_FAILURE = 0x0110

# Transfer syntaxes accepted as proposed (stored as received, never transcoded).
ACCEPTED_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

# pynetdicom's maximum_associations, set out of reach: node.dicom.policy counts accepted associations only.
PYNETDICOM_LIMIT_OFF = 1_000_000
# Reserves a slot in ``_ids`` between the policy's decision and the audit row's id.
_RESERVED = "reserved"


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


class Receiver:
    """The Storage SCP. ``peers`` is a callable so a peer directory changed at run time applies at once."""

    def __init__(
        self,
        node: NodeSettings,
        peers: Callable[[], Sequence[PeerSettings]],
        index: IntakeRepository,
        spool: Spool,
        min_free_disk_mb: int,
        recognition: ResultRecognition | None = None,
    ) -> None:
        self.node = node
        self.peers = peers
        self.index = index
        self.spool = spool
        # The protocol-neutral intake path (node/intake.py), shared with the DICOMweb STOW-RS edge.
        self.intake = Intake(index, spool, min_free_disk_mb, recognition)
        self._server: ThreadedAssociationServer | None = None
        self._counts: dict[int, int] = {}
        self._ids: dict[int, str] = {}
        self._assocs: dict[int, Any] = {}  # accepted and not yet finished (keeps ids from being reused)
        self._lock = threading.Lock()
        self._reaper_stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self.ae = self._make_ae()
        # Built here so a bad certificate or a readable key stops start-up with the key's name.
        self._ssl_context = server_context(node.tls) if node.tls.enabled else None

    @property
    def min_free_disk_mb(self) -> int:
        return self.intake.min_free_disk_mb

    @min_free_disk_mb.setter
    def min_free_disk_mb(self, value: int) -> None:
        self.intake.min_free_disk_mb = value

    @property
    def recognition(self) -> ResultRecognition:
        return self.intake.recognition

    # -- set-up ------------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        # Chunked receive into the spool's .incoming; unknown and private storage SOP classes too.
        enable_chunked_storage(self.spool.incoming)
        drop_standard_log_handlers()  # INFO/DEBUG lines nobody keeps, an Event built per received PDU
        ae = AE(ae_title=self.node.ae_title)
        ae.maximum_pdu_size = self.node.max_pdu_size
        # Our policy enforces the limit (a slot reserved atomically in EVT_REQUESTED, with an audit row).
        # pynetdicom's own check is switched off: it counts every open TCP connection, so a burst of health
        # probes or a port scan would reject a PACS "Local Limit Exceeded" with nothing logged or audited.
        ae.maximum_associations = PYNETDICOM_LIMIT_OFF
        ae.acse_timeout = self.node.acse_timeout_seconds
        ae.dimse_timeout = self.node.dimse_timeout_seconds
        ae.network_timeout = self.node.network_timeout_seconds
        ae.require_called_aet = False  # decided (and audited) by node.dicom.policy
        ae.add_supported_context(Verification, ACCEPTED_TRANSFER_SYNTAXES[:4])
        for context in AllStoragePresentationContexts:  # every storage SOP class pynetdicom knows
            ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        return ae

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.server_address[:2]

    def start(self) -> None:
        """Start listening (in background threads)."""
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
        ]
        self._server = self.ae.start_server(
            (self.node.host, self.node.port), block=False, evt_handlers=handlers, ssl_context=self._ssl_context
        )
        copy_contexts_cheaply(self._server)
        self.index.start_writer()
        self._reaper_stop.clear()
        self._reaper = threading.Thread(target=self._reap_loop, name="msknode-reaper", daemon=True)
        self._reaper.start()
        host, port = self.address
        log.info("listening as %s on %s:%s%s", self.node.ae_title, host, port, " (TLS)" if self._ssl_context else "")

    def _reap_loop(self) -> None:
        while not self._reaper_stop.wait(1.0):
            self._reap()

    def _reap(self) -> None:
        """Finish associations whose thread ended without any event.

        pynetdicom ends an association silently when its state machine raises (for example ENOSPC while
        writing a received dataset): no EVT_ABORTED, no EVT_CONN_CLOSE. Without this its audit row would
        stay 'open', its partial file would stay in ``.incoming`` and it would hold a slot of
        ``max_associations`` for ever.
        """
        with self._lock:
            dead = [assoc for assoc in self._assocs.values() if not assoc.is_alive()]
        for assoc in dead:
            discard_partial_transfer(assoc)
            self._finish(assoc, "aborted")

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, let open associations finish for ``grace_seconds``, then abort the rest."""
        if self._server is None:
            return
        server = self._server
        server.shutdown()  # no new associations
        deadline = time.monotonic() + grace_seconds
        # Only accepted associations get the grace period: a bare TCP connection that never sent an
        # A-ASSOCIATE-RQ (a /healthz probe, a load balancer's check) would otherwise hold the stop until
        # its ACSE timeout.
        while time.monotonic() < deadline and self._accepted_open(server):
            time.sleep(0.1)
        remaining = server.active_associations
        for assoc in remaining:
            if id(assoc) in self._ids:
                log.warning("aborting association %s at shutdown", self._ids[id(assoc)])
            assoc.abort()
        server.server_close()
        self._server = None
        self._reaper_stop.set()
        if self._reaper is not None:
            self._reaper.join(5)
        self._reap()

    def _accepted_open(self, server: ThreadedAssociationServer) -> bool:
        with self._lock:
            return any(id(assoc) in self._ids for assoc in server.active_associations)

    # -- association events ------------------------------------------------------------------
    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor
        calling = (rq.primitive.calling_ae_title or "").strip() if rq.primitive else ""
        called = (rq.primitive.called_ae_title or "").strip() if rq.primitive else ""
        address, port = rq.address, rq.port
        # Count accepted associations only: a bare TCP connection that never sends an A-ASSOCIATE-RQ
        # (a load balancer's health check, a port scan) must not take a slot until its ACSE timeout.
        self._reap()
        peers = self.peers()  # an in-memory snapshot (node/peers.py): no DNS, no database wait here
        with self._lock:  # count and reserve in one step: two requests racing for the last slot get one
            open_associations = sum(1 for key in self._ids if key != id(assoc))
            decision = decide(
                self.node,
                peers,
                calling,
                called,
                address,
                active_associations=open_associations,
                disk_has_room=lambda: self.spool.has_room(self.min_free_disk_mb),
            )
            if decision.accepted:
                self._ids[id(assoc)] = _RESERVED
        try:
            association_id = self.index.association_requested(
                calling, called, address, port, decision.peer_name, decision.reason
            )
        except SQLAlchemyError:
            with self._lock:
                self._ids.pop(id(assoc), None)
            log.exception("cannot record association from %s (%s): rejecting", calling, address)
            assoc.acse.send_reject(0x02, 0x03, 0x01)  # transient: the sender should retry later
            assoc.kill()
            return
        if not decision.accepted:
            log.warning(
                "rejected association %s: calling=%s called=%s from %s reason=%s",
                association_id, calling, called, address, decision.reason,
            )
            assoc.acse.send_reject(decision.result, decision.source, decision.diagnostic)
            assoc.kill()
            return
        with self._lock:
            self._ids[id(assoc)] = association_id
            self._counts[id(assoc)] = 0
            self._assocs[id(assoc)] = assoc
        log.info("accepted association %s: calling=%s called=%s from %s", association_id, calling, called, address)

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom rejected in negotiation after our policy accepted: logged and audited as a rejection with
        pynetdicom's result-source-reason (``negotiation-rejected-1-1-3``), never as an abort."""
        self._record_late_rejection(event.assoc)

    @staticmethod
    def _late_rejection(assoc: Any) -> str | None:
        """The reason of an A-ASSOCIATE-RJ pynetdicom sent (its primitive is set before it is sent), or None."""
        primitive = assoc.acceptor.primitive
        if primitive is None or getattr(primitive, "result", None) not in (0x01, 0x02):
            return None
        rsd = "-".join(f"{getattr(primitive, name, 0) or 0:x}" for name in ("result", "result_source", "diagnostic"))
        return f"negotiation-rejected-{rsd}"

    def _record_late_rejection(self, assoc: Any) -> None:
        reason = self._late_rejection(assoc) or "negotiation-rejected"
        with self._lock:
            association_id = self._ids.pop(id(assoc), None)
            self._counts.pop(id(assoc), None)
            self._assocs.pop(id(assoc), None)
        if association_id is None:
            return  # recorded already (EVT_REJECTED and the peer's close both come here), or ours
        calling = (assoc.requestor.ae_title or "").strip()
        log.warning("rejected association %s: calling=%s from %s reason=%s", association_id, calling,
                    assoc.requestor.address, reason)
        if association_id == _RESERVED:
            return
        try:
            self.index.association_rejected(association_id, reason)
        except SQLAlchemyError:
            log.exception("cannot record the rejection of association %s", association_id)

    def _finish(self, assoc: Any, outcome: str) -> None:
        with self._lock:
            association_id = self._ids.pop(id(assoc), None)
            count = self._counts.pop(id(assoc), 0)
            self._assocs.pop(id(assoc), None)
        if association_id is None or association_id == _RESERVED:
            return  # rejected, or already finished
        try:
            self.index.association_ended(association_id, outcome, count)
        except SQLAlchemyError:
            log.exception("cannot record the end of association %s", association_id)
        log.info("association %s %s after %d instance(s)", association_id, outcome, count)

    def _on_released(self, event: evt.Event) -> None:
        self._finish(event.assoc, "released")

    def _on_aborted(self, event: evt.Event) -> None:
        discard_partial_transfer(event.assoc)
        self._finish(event.assoc, "aborted")

    def _on_conn_open(self, event: evt.Event) -> None:
        """Bound every read on the accepted socket by the network timeout; switch to event-driven reactors.

        pynetdicom's accepted sockets block without limit, so a peer that stops half-way through a PDU
        (or a TLS handshake) would hold its thread and its association slot for ever; with a timeout the
        read fails, pynetdicom treats it as a closed connection, and the usual abort clean-up runs.
        """
        try:
            event.assoc.dul.socket.socket.settimeout(self.node.network_timeout_seconds)
        except (AttributeError, OSError):
            pass
        make_quiet(event.assoc)

    def _on_conn_close(self, event: evt.Event) -> None:
        # A TCP close without A-RELEASE or A-ABORT is an abort as far as completeness goes. After a release the
        # peer's close may be seen before EVT_RELEASED: the association then counts as released.
        if event.assoc.is_released:
            self._finish(event.assoc, "released")
            return
        if self._late_rejection(event.assoc):  # the peer closed on our A-ASSOCIATE-RJ before EVT_REJECTED ran
            self._record_late_rejection(event.assoc)
            return
        discard_partial_transfer(event.assoc)
        self._finish(event.assoc, "aborted")

    def _on_c_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    # -- C-STORE -----------------------------------------------------------------------------
    def _on_c_store(self, event: evt.Event) -> int | Dataset:
        assoc = event.assoc
        with self._lock:
            association_id = self._ids.get(id(assoc))
        temp_path = Path(event.dataset_path)
        # Hashed while pynetdicom wrote it (node/dicom/pynetdicom_patches.py): the spool need not read it back.
        digest = received_digest(temp_path)
        calling = assoc.requestor.ae_title.strip()
        if association_id is None:  # cannot happen for an accepted association; be safe
            temp_path.unlink(missing_ok=True)
            return _failure(STATUS_PROCESSING_FAILURE, "association not registered")

        requested_uid = str(event.request.AffectedSOPInstanceUID or "").strip()
        # Watermark, header checks, fsync + rename + index commit: node/intake.py, shared with STOW-RS.
        result = self.intake.store(temp_path, calling_ae_title=calling, association_id=association_id,
                                   expected_sop_instance_uid=requested_uid, content_digest=digest)
        if isinstance(result, Refused):
            return _failure(result.status, result.reason)
        with self._lock:
            self._counts[id(assoc)] = self._counts.get(id(assoc), 0) + 1
        return STATUS_SUCCESS
