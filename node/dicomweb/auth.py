"""Who may store by STOW-RS: a bearer token per peer (only its SHA-256 is configured), checked in constant time,
the peer's ``may_send`` and, with ``[dicomweb] check_peer_host``, its host addresses. Pure (no I/O).

Mutual TLS (``[dicomweb.tls] require_client_certificate``) is checked earlier, in the TLS handshake: a client
without a certificate from ``ca_certificates`` never gets to send a request. The token then names the peer.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from node.settings import PeerSettings


def hash_token(token: str) -> str:
    """The value configured as a peer's ``stow_token_sha256``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class AuthDecision:
    """``status`` 0 when accepted, else the HTTP status (401, 403); ``reason`` is recorded in the audit row."""

    status: int
    peer: PeerSettings | None = None
    reason: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status == 0


def _normalise(address: str) -> str:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(peers: Sequence[PeerSettings], authorization: str | None, client_address: str,
                 check_peer_host: bool = True) -> AuthDecision:
    """The peer a STOW-RS request comes from, or why it is refused."""
    token = bearer_token(authorization)
    if token is None:
        return AuthDecision(401, None, "no-bearer-token")
    presented = hash_token(token)
    match = None
    for peer in peers:  # every peer compared (constant time each), so timing tells nothing of which matched
        if peer.stow_token_sha256 and hmac.compare_digest(presented, peer.stow_token_sha256):
            match = peer
    if match is None:
        return AuthDecision(401, None, "token-not-recognised")
    if not match.may_send:
        return AuthDecision(403, match, "peer-may-not-send")
    if check_peer_host and _normalise(client_address) not in {_normalise(a) for a in match.addresses}:
        return AuthDecision(403, match, "calling-host-not-recognised")
    return AuthDecision(0, match)
