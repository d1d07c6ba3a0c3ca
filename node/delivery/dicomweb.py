"""The DICOMweb destination: results to a peer's ``url`` by STOW-RS (PS3.18 10.5), one POST per result over one
kept-alive HTTP connection per batch, so each outcome is known (and recorded by the sender) before the next
transfer starts, exactly as with C-STORE.

Outcomes per result (see :class:`~node.delivery.destinations.Outcome`):

- 200 → delivered. 202 with the instance in Referenced SOP Sequence (a warning) → delivered, status ``202``.
- Transient (backoff, dead after ``sender.max_age_hours``): connection refused / reset, timeouts, 5xx, 408, 429,
  a Failure Reason 0xA7xx (out of resources) for the instance, a local problem reading the secret file or the
  CA file (kept until it is fixed, like ``tls-config`` for DIMSE).
- Permanent (dead letter now): 400, 401, 403, 404, 405, 409, 413, 415 and any other 4xx, a Failure Reason
  other than 0xA7xx, a redirect (never followed: credentials are not sent elsewhere), an unreadable result.

Auth: ``auth = "bearer"`` (``Authorization: Bearer <secret_file>``) or ``"basic"`` (``username`` + the password in
``secret_file``). HTTPS verifies the certificate and host name against ``ca_file`` (else the system CAs) unless
``verify_tls = false``; ``[sender.tls]`` ``certificate`` / ``private_key``, when set, are presented to a
destination that requires mutual TLS. Timeouts: ``sender.timeout_seconds`` for connect, each read and each write.
"""

from __future__ import annotations

import io
import logging
import ssl
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pydicom

from node.delivery.destinations import DELIVERED, PERMANENT, TRANSIENT, Outcome, ResultReader, register
from node.dicom.tls import TlsConfigError, check_private_key_mode
from node.runtime.faults import fault_point
from node.settings import PeerSettings, SenderSettings, TlsSettings
from storage.outbox import Delivery

log = logging.getLogger("msknode.sender")

_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"
TRANSIENT_HTTP = {408, 425, 429}


class LocalConfigError(Exception):
    """A local file the destination needs cannot be used (kept queued: an admin fixes it)."""


def _read_secret(path: Path | None, key: str) -> str:
    if path is None:
        raise LocalConfigError(f"{key}: not set")
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise LocalConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if not value:
        raise LocalConfigError(f"{key}: {path} is empty")
    return value


def request_settings(peer: PeerSettings, client_tls: TlsSettings | None = None,
                     ) -> tuple[dict[str, str], httpx.BasicAuth | None, ssl.SSLContext | bool]:
    """(headers, basic auth, TLS verification) for ``peer``; :class:`LocalConfigError` when a file is unusable.

    ``client_tls``: ``[sender.tls]``; its ``certificate`` / ``private_key``, when set, are presented to an https
    destination that requires mutual TLS."""
    headers = {"Accept": "application/dicom+json"}
    basic = None
    if peer.auth == "bearer":
        headers["Authorization"] = "Bearer " + _read_secret(peer.secret_file, f"peers.{peer.name}.secret_file")
    elif peer.auth == "basic":
        basic = httpx.BasicAuth(peer.username or "", _read_secret(peer.secret_file, f"peers.{peer.name}.secret_file"))
    if not peer.url or not peer.url.startswith("https://"):
        return headers, basic, True
    try:
        context = ssl.create_default_context(cafile=str(peer.ca_file) if peer.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise LocalConfigError(f"peers.{peer.name}.ca_file: cannot load {peer.ca_file}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not peer.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client_tls is not None and client_tls.certificate is not None and client_tls.private_key is not None:
        try:
            check_private_key_mode(Path(client_tls.private_key), "sender.tls.private_key")
            context.load_cert_chain(str(client_tls.certificate), str(client_tls.private_key))
        except (OSError, ssl.SSLError, TlsConfigError) as exc:
            raise LocalConfigError(f"sender.tls: cannot use the client certificate: {exc}") from None
    return headers, basic, context


def multipart_body(part: bytes) -> tuple[bytes, str]:
    """One Part 10 file as a ``multipart/related; type="application/dicom"`` body and its Content-Type."""
    boundary = f"msknode-{uuid.uuid4().hex}"
    body = b"".join([b"--", boundary.encode(), b"\r\nContent-Type: application/dicom\r\n\r\n", part,
                     b"\r\n--", boundary.encode(), b"--\r\n"])
    return body, f'multipart/related; type="application/dicom"; boundary="{boundary}"'


def _items(body: object, keyword: str) -> list[dict]:
    if not isinstance(body, dict):
        return []
    element = body.get(keyword)
    values = element.get("Value") if isinstance(element, dict) else None
    return [item for item in values if isinstance(item, dict)] if isinstance(values, list) else []


def _uid(item: dict) -> str | None:
    element = item.get(_SOP_INSTANCE)
    values = element.get("Value") if isinstance(element, dict) else None
    return str(values[0]) if isinstance(values, list) and values else None


def _failure_reason(item: dict) -> int | None:
    element = item.get(_FAILURE_REASON)
    values = element.get("Value") if isinstance(element, dict) else None
    try:
        return int(values[0]) if isinstance(values, list) and values else None
    except (TypeError, ValueError):
        return None


def classify_response(status: int, body: object, sop_instance_uid: str) -> Outcome:
    """A STOW-RS answer about one instance as an outcome (PS3.18 10.5.3)."""
    failed = [item for item in _items(body, _FAILED_SOP_SEQUENCE) if _uid(item) in (sop_instance_uid, None)]
    stored = [item for item in _items(body, _REFERENCED_SOP_SEQUENCE) if _uid(item) == sop_instance_uid]
    if failed and not stored:
        reason = _failure_reason(failed[0])
        code = f"0x{reason:04X}" if reason is not None else str(status)
        if reason is not None and 0xA700 <= reason <= 0xA7FF:
            return Outcome(TRANSIENT, code, f"HTTP {status}: destination out of resources")
        return Outcome(PERMANENT, code, f"HTTP {status}: destination refused the instance (Failure Reason {code})")
    if status == 200:
        return Outcome(DELIVERED, "200", "stored")
    if status == 202:
        if stored:
            return Outcome(DELIVERED, "202", "stored with a warning")
        return Outcome(TRANSIENT, "202", "HTTP 202 without this instance in the response; sent again")
    if 200 <= status < 300:
        return Outcome(DELIVERED, str(status), "stored")
    if 300 <= status < 400:
        return Outcome(PERMANENT, str(status), f"HTTP {status}: redirect not followed (check the peer's url)")
    if status in TRANSIENT_HTTP or status >= 500:
        return Outcome(TRANSIENT, str(status), f"HTTP {status}: destination unavailable")
    if status in (401, 403):
        return Outcome(PERMANENT, str(status), f"HTTP {status}: destination refused our credentials")
    return Outcome(PERMANENT, str(status), f"HTTP {status}: destination refused the request")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


class DicomwebDestination:
    """STOW-RS client towards one peer per :meth:`deliver` call."""

    def __init__(self, calling_ae_title: str, settings: SenderSettings) -> None:
        self.calling_ae_title = calling_ae_title
        self.settings = settings

    def deliver(self, peer: PeerSettings, items: Sequence[Delivery], read: ResultReader) -> Iterator[tuple[Delivery, Outcome]]:
        if not peer.url:
            yield from ((item, Outcome(PERMANENT, "config", f"peer {peer.name} has no url")) for item in items)
            return
        try:
            headers, basic, verify = request_settings(peer, self.settings.tls)
        except LocalConfigError as exc:  # a local problem: keep the rows and retry once it is fixed
            yield from ((item, Outcome(TRANSIENT, "auth-config", str(exc))) for item in items)
            return
        endpoint = f"{peer.url}/studies"
        timeout = httpx.Timeout(self.settings.timeout_seconds)
        with httpx.Client(headers=headers, auth=basic, verify=verify, timeout=timeout, follow_redirects=False,
                          trust_env=False) as client:
            for item in items:
                try:
                    dataset = read(item)
                    buffer = io.BytesIO()
                    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
                except (OSError, pydicom.errors.InvalidDicomError) as exc:
                    yield item, Outcome(PERMANENT, "local", f"result file unreadable: {exc}")
                    continue
                except Exception as exc:  # anything else ends this item's attempt only (retried, aged out)
                    yield item, Outcome(TRANSIENT, "local", f"reading the result failed: {_describe(exc)}")
                    continue
                body, content_type = multipart_body(buffer.getvalue())
                fault_point("sender.before_send")
                try:
                    response = client.post(endpoint, content=body, headers={"Content-Type": content_type})
                except httpx.TimeoutException as exc:
                    yield item, Outcome(TRANSIENT, "timeout", f"STOW-RS timed out: {_describe(exc)}")
                    continue
                except httpx.HTTPError as exc:  # refused, reset, TLS failure, DNS: transient, aged out
                    yield item, Outcome(TRANSIENT, "no-connection", f"STOW-RS failed: {_describe(exc)}")
                    continue
                try:
                    answer = response.json() if response.content else None
                except ValueError:
                    answer = None
                outcome = classify_response(response.status_code, answer, item.sop_instance_uid)
                if outcome.kind != DELIVERED:
                    log.warning("STOW-RS of delivery %d to %s: HTTP %d (%s)", item.id, peer.name,
                                response.status_code, outcome.detail)
                yield item, outcome


register("dicomweb", DicomwebDestination)
