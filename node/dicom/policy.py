"""Association policy: who may open an association with the node, decided before anything is transferred.

Pure decisions (no networking, no database) so that they can be tested exhaustively and so that a peer
directory edited at run time applies to the next association without a restart.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from node.settings import NodeSettings, PeerSettings

# PS3.8 9.3.4: A-ASSOCIATE-RJ result / source / reason
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03
REASON_CALLING_AE_NOT_RECOGNISED = 0x03
REASON_CALLED_AE_NOT_RECOGNISED = 0x07
REASON_TEMPORARY_CONGESTION = 0x01
REASON_LOCAL_LIMIT_EXCEEDED = 0x02


@dataclass(frozen=True)
class AssociationDecision:
    """Accept or reject an association request (A-ASSOCIATE-RJ result, source and reason when rejected)."""

    accepted: bool
    peer_name: str | None = None
    result: int = 0
    source: int = 0
    diagnostic: int = 0
    reason: str | None = None  # short machine-readable reason for the audit log

    @classmethod
    def reject(
        cls, result: int, source: int, diagnostic: int, reason: str, peer: str | None = None
    ) -> AssociationDecision:
        return cls(False, peer, result, source, diagnostic, reason)


def _normalise_address(address: str) -> str:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def find_peer(peers: Sequence[PeerSettings], calling_ae_title: str) -> PeerSettings | None:
    for peer in peers:
        if peer.ae_title == calling_ae_title.strip():
            return peer
    return None


def decide(
    node: NodeSettings,
    peers: Sequence[PeerSettings],
    calling_ae_title: str,
    called_ae_title: str,
    peer_address: str,
    active_associations: int,
    disk_has_room: Callable[[], bool],
) -> AssociationDecision:
    """Accept or reject an association request.

    ``active_associations`` counts the associations already open, not this one.
    """
    calling = calling_ae_title.strip()
    address = _normalise_address(peer_address)
    peer = find_peer(peers, calling)
    peer_name = peer.name if peer else None

    # accept_unknown_callers lets AE titles that are no peer in; a known peer's rules always hold: a peer
    # with may_send = false is refused, and its AE title is only believed from its own host.
    if peer is None and not node.accept_unknown_callers:
        return AssociationDecision.reject(
            REJECTED_PERMANENT,
            SOURCE_SERVICE_USER,
            REASON_CALLING_AE_NOT_RECOGNISED,
            "calling-ae-not-recognised",
            peer_name,
        )
    if peer is not None:
        if not peer.may_send:
            return AssociationDecision.reject(
                REJECTED_PERMANENT,
                SOURCE_SERVICE_USER,
                REASON_CALLING_AE_NOT_RECOGNISED,
                "calling-ae-may-not-send",
                peer_name,
            )
        if address not in {_normalise_address(a) for a in peer.addresses}:
            return AssociationDecision.reject(
                REJECTED_PERMANENT,
                SOURCE_SERVICE_USER,
                REASON_CALLING_AE_NOT_RECOGNISED,
                "calling-host-not-recognised",
                peer_name,
            )

    if node.require_called_ae_title and called_ae_title.strip() != node.ae_title:
        return AssociationDecision.reject(
            REJECTED_PERMANENT,
            SOURCE_SERVICE_USER,
            REASON_CALLED_AE_NOT_RECOGNISED,
            "called-ae-not-recognised",
            peer_name,
        )

    if active_associations >= node.max_associations:
        return AssociationDecision.reject(
            REJECTED_TRANSIENT,
            SOURCE_SERVICE_PROVIDER_PRESENTATION,
            REASON_LOCAL_LIMIT_EXCEEDED,
            "local-limit-exceeded",
            peer_name,
        )

    if not disk_has_room():
        return AssociationDecision.reject(
            REJECTED_TRANSIENT,
            SOURCE_SERVICE_PROVIDER_PRESENTATION,
            REASON_TEMPORARY_CONGESTION,
            "disk-below-watermark",
            peer_name,
        )

    return AssociationDecision(True, peer_name)
