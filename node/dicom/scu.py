"""Small SCU operations used by the CLI (and later the sender): C-ECHO to a configured peer."""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.settings import PeerSettings


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    round_trip_ms: float
    error: str | None = None


def set_tcp_nodelay(assoc) -> None:  # type: ignore[no-untyped-def]
    """Disable Nagle on an association's socket: small DIMSE messages otherwise wait ~40 ms for delayed ACKs.

    pynetdicom exposes no option for it, so this reaches the socket through the DUL (see
    dicom-outputs-perf.md 2.1)."""
    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


def _connect_error(host: str, port: int, timeout: float) -> str | None:
    """Why a TCP connection to the peer fails (e.g. "Connection refused"), or None if it connects."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def echo(
    calling_ae_title: str,
    peer: PeerSettings,
    timeout: float = 10.0,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> EchoResult:
    """Associate, C-ECHO and release; the round trip covers the whole exchange.

    ``tls_args`` (from :func:`node.dicom.tls.client_tls_args`) makes it a DICOM TLS association."""
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    started = time.perf_counter()
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        elapsed = (time.perf_counter() - started) * 1000
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            reason = f"association rejected (result {primitive.result}, source {primitive.result_source}, reason {primitive.diagnostic})" if primitive else "association rejected"
        elif (unreachable := _connect_error(peer.host, peer.port, timeout)) is not None:
            # pynetdicom reports a refused or timed-out connection as an abort too: tell them apart.
            reason = f"no association (peer down or unreachable: {unreachable})"
        elif assoc.is_aborted:
            reason = "association aborted by the peer"
        else:
            reason = "no association (peer down or unreachable)"
        return EchoResult(False, elapsed, reason)
    set_tcp_nodelay(assoc)
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    elapsed = (time.perf_counter() - started) * 1000
    if status is None or "Status" not in status:
        return EchoResult(False, elapsed, "no response to C-ECHO")
    if status.Status != 0x0000:
        return EchoResult(False, elapsed, f"C-ECHO status 0x{status.Status:04X}")
    return EchoResult(True, elapsed)
