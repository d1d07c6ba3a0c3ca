"""Notifications: announce triaged studies by webhook (JSON POST, optionally HMAC-signed) and e-mail (SMTP).

The worker queues one row per channel in its result transaction (:func:`entries_for`); the notifier loop,
run inside the sender role, claims due rows with a lease (storage/notifications.py), delivers them, retries
failures after ``notifications.backoff_seconds`` (the last value repeats) and gives a row up (``dead``, the
reason kept) once it is older than ``notifications.max_age_hours``.

Payloads carry no patient name, patient ID or accession number unless ``notifications.include_phi`` is set:
the study is named by its Study Instance UID and a dashboard link by database id. STARTTLS verifies the mail
server's certificate and host name (``ssl.create_default_context``, ``smtp.ca_file`` for a private CA).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import smtplib
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from node.settings import NotificationSettings, backoff_delay, priority_rank
from storage.db import as_utc, utcnow
from storage.notifications import NotificationEntry, Notifications, PendingNotification

log = logging.getLogger("msknode.notifier")

SIGNATURE_HEADER = "X-Msknode-Signature"


def build_payload(
    settings: NotificationSettings,
    *,
    study_id: int,
    study_instance_uid: str,
    accession_number: str | None,
    priority: str,
    findings: dict[str, Any],
    created_at: datetime,
    model: str,
    patient: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """The JSON body of a notification; the accession number and ``patient`` (name, id) only with ``include_phi``."""
    payload: dict[str, Any] = {
        "event": "study.triaged",
        "priority": priority.upper(),
        "study_instance_uid": study_instance_uid,
        "findings": findings,
        "link": f"{settings.dashboard_url.rstrip('/')}/studies/{study_id}",
        "model": model,
        "created_at": as_utc(created_at).isoformat(),
    }
    if settings.include_phi:
        payload["accession_number"] = accession_number or None
    if settings.include_phi and patient is not None:
        payload["patient_name"] = patient.get("name")
        payload["patient_id"] = patient.get("id")
    return payload


def entries_for(
    settings: NotificationSettings, priority_rank_value: int, payload: dict[str, Any]
) -> list[NotificationEntry]:
    """One entry per configured channel when the priority reaches ``min_priority``; none otherwise."""
    if priority_rank_value < priority_rank(settings.min_priority):
        return []
    entries = [NotificationEntry("webhook", hook.url, payload) for hook in settings.webhooks]
    if settings.smtp is not None:
        entries.append(NotificationEntry("smtp", ",".join(settings.smtp.to), payload))
    return entries


def sign(body: bytes, secret: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the exact request body (the receiver recomputes and compares)."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _read_secret(path: Path) -> bytes:
    return Path(path).read_bytes().strip()


class DeliveryError(Exception):
    """A failed attempt; the row is retried after the backoff."""


class Notifier:
    """Delivers due notification rows; one instance per sender process."""

    def __init__(self, settings: NotificationSettings, store: Notifications, owner: str | None = None) -> None:
        self.settings = settings
        self.store = store
        self.owner = owner or f"notifier@{socket.gethostname()}:{os.getpid()}"

    def run(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # keep the sender role alive; leases bring rows back
                log.exception("notifier round failed")
                busy = 0
            if not busy:
                stop.wait(poll_seconds)

    def run_once(self) -> int:
        """Deliver what is due; returns the number of rows handled."""
        timeouts = [hook.timeout_seconds for hook in self.settings.webhooks]
        if self.settings.smtp is not None:
            timeouts.append(self.settings.smtp.timeout_seconds)
        lease = max(timeouts, default=10.0) * 2 + 30
        rows = self.store.claim(self.owner, lease)
        for row in rows:
            try:
                self.deliver(row)
            except Exception as exc:  # noqa: BLE001 - every failure is retried or given up, never lost
                self._retry_or_give_up(row, f"{type(exc).__name__}: {exc}")
            else:
                self.store.sent(row.id, self.owner)
                log.info("notification %d (%s) sent for study %s", row.id, row.channel,
                         row.payload.get("study_instance_uid"))
        return len(rows)

    def _retry_or_give_up(self, row: PendingNotification, error: str) -> None:
        age_hours = (utcnow() - as_utc(row.created_at)).total_seconds() / 3600
        if age_hours >= self.settings.max_age_hours:
            reason = f"gave up after {row.attempts} attempt(s) over {age_hours:.1f} h: {error}"
            self.store.dead(row.id, self.owner, reason)
            log.error("notification %d (%s): gave up (%s)", row.id, row.channel, error)
            return
        delay = backoff_delay(self.settings.backoff_seconds, row.attempts)
        self.store.retry_later(row.id, self.owner, error, delay)
        log.warning("notification %d (%s) failed (%s); retry in %.1f s", row.id, row.channel, error, delay)

    def deliver(self, row: PendingNotification) -> None:
        if row.channel == "webhook":
            self._post(row)
        elif row.channel == "smtp":
            self._mail(row)
        else:
            raise DeliveryError(f"unknown channel {row.channel!r}")

    # -- channels ----------------------------------------------------------------------------
    def _post(self, row: PendingNotification) -> None:
        hook = next((h for h in self.settings.webhooks if h.url == row.target), None)
        if hook is None:
            raise DeliveryError("webhook no longer configured")
        body = json.dumps(row.payload, sort_keys=True, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "msknode-notifier"}
        if hook.secret_file is not None:
            headers[SIGNATURE_HEADER] = sign(body, _read_secret(hook.secret_file))
        request = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=hook.timeout_seconds) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            raise DeliveryError(f"HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DeliveryError(f"cannot reach the webhook: {reason}") from None
        if not 200 <= status < 300:
            raise DeliveryError(f"HTTP {status}")

    def _mail(self, row: PendingNotification) -> None:
        smtp = self.settings.smtp
        if smtp is None:
            raise DeliveryError("smtp no longer configured")
        payload = row.payload
        message = EmailMessage()
        message["From"] = smtp.from_address
        message["To"] = ", ".join(smtp.to)
        message["Subject"] = (f"[msknode] {payload.get('priority')} study "
                              f"{payload.get('accession_number') or payload.get('study_instance_uid')}")
        findings = payload.get("findings") or {}
        lines = [
            f"Priority: {payload.get('priority')} (rule: {findings.get('rule')})",
            f"Study Instance UID: {payload.get('study_instance_uid')}",
        ]
        if "accession_number" in payload:  # include_phi
            lines.append(f"Accession number: {payload.get('accession_number') or '-'}")
        if "patient_name" in payload:
            lines.append(f"Patient: {payload.get('patient_name')} ({payload.get('patient_id')})")
        lines += [f"{name}: {value}" for name, value in (findings.get("values") or {}).items()]
        lines += ["", f"Dashboard: {payload.get('link')}", f"Model: {payload.get('model')}"]
        message.set_content("\n".join(lines) + "\n")
        with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout_seconds) as client:
            if smtp.starttls:  # verifying: certificate chain and host name (smtplib's default verifies neither)
                client.starttls(context=ssl.create_default_context(
                    cafile=str(smtp.ca_file) if smtp.ca_file is not None else None))
            if smtp.username and smtp.password_file:
                client.login(smtp.username, _read_secret(smtp.password_file).decode())
            client.send_message(message)
