"""DICOM TLS (PS3.15 B.1 / the BCP 195 profiles): ``ssl.SSLContext`` objects built from :class:`TlsSettings`.

pynetdicom takes the context as it is: ``AE.start_server(..., ssl_context=...)`` for the SCP and
``AE.associate(..., tls_args=(context, server_hostname))`` for the SCU. Both contexts refuse anything below
TLS 1.2 and keep Python's default cipher list (which already excludes the suites BCP 195 forbids: no RC4,
no 3DES, no export or NULL ciphers, no anonymous key exchange).

Private keys: a key file that group or others may read is refused with an error naming the setting, the
same way OpenSSH refuses such a key, rather than silently used.
"""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

from node.settings import TlsSettings


class TlsConfigError(ValueError):
    """A TLS setting cannot be used; the message names the key (``node.tls.private_key``...)."""


def _readable_file(path: Path | None, key: str) -> Path:
    if path is None:
        raise TlsConfigError(f"{key}: not set")
    if not path.is_file():
        raise TlsConfigError(f"{key}: file not found: {path}")
    return path


def check_private_key_mode(path: Path, key: str) -> None:
    """Refuse a private key that anyone but its owner may read (mode must be 0600 or 0400)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TlsConfigError(f"{key}: {path} has mode {mode:04o}; a private key must be 0600 or stricter")


def _load_identity(context: ssl.SSLContext, settings: TlsSettings, section: str) -> None:
    certificate = _readable_file(settings.certificate, f"{section}.certificate")
    private_key = _readable_file(settings.private_key, f"{section}.private_key")
    check_private_key_mode(private_key, f"{section}.private_key")
    try:
        context.load_cert_chain(certfile=str(certificate), keyfile=str(private_key))
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{section}.certificate/private_key: cannot load ({exc.reason or exc})") from exc


def _load_trust(context: ssl.SSLContext, settings: TlsSettings, section: str) -> None:
    bundle = _readable_file(settings.ca_certificates, f"{section}.ca_certificates")
    try:
        context.load_verify_locations(cafile=str(bundle))
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{section}.ca_certificates: cannot load ({exc.reason or exc})") from exc


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets shake hands on their first read, not inside ``accept``.

    pynetdicom wraps each accepted socket in the server's single accept thread; with the default eager
    handshake one client that connects and says nothing would stop every other peer from connecting.
    Deferred, the handshake runs in the association's own thread, under the receiver's socket timeout.
    """

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, **kwargs):  # type: ignore[no-untyped-def,override]
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False, **kwargs)


def server_context(settings: TlsSettings, section: str = "node.tls") -> ssl.SSLContext:
    """The SCP's context: our certificate; with ``require_client_certificate`` a client must present one
    signed by ``ca_certificates`` (mutual TLS)."""
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(context, settings, section)
    if settings.require_client_certificate:
        if settings.ca_certificates is None:
            raise TlsConfigError(f"{section}.ca_certificates: needed to verify client certificates "
                                 "(require_client_certificate is on)")
        _load_trust(context, settings, section)
        context.verify_mode = ssl.CERT_REQUIRED
    elif settings.ca_certificates is not None:
        _load_trust(context, settings, section)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(settings: TlsSettings, section: str = "sender.tls") -> ssl.SSLContext:
    """The SCU's context: verifies the destination against ``ca_certificates`` (unless ``verify_peer`` is
    off) and presents our certificate when one is configured (for peers that require mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.verify_peer:
        if settings.ca_certificates is None:
            raise TlsConfigError(f"{section}.ca_certificates: needed to verify the destination "
                                 "(or set verify_peer = false)")
        _load_trust(context, settings, section)
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.certificate is not None or settings.private_key is not None:
        _load_identity(context, settings, section)
    return context


def client_tls_args(settings: TlsSettings, host: str, section: str = "sender.tls") -> tuple[ssl.SSLContext, str]:
    """``tls_args`` for ``AE.associate``: the context and the name the destination's certificate must carry."""
    return client_context(settings, section), host
