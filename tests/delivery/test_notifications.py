"""Notification delivery against real local servers: a webhook receiver (http.server) that checks the HMAC
signature and fails once with 500, an SMTP server (aiosmtpd), and giving up after ``max_age_hours``."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import select, update

from node.delivery.notifier import SIGNATURE_HEADER, Notifier, build_payload, entries_for
from node.settings import NotificationSettings
from storage.db import Database, utcnow
from storage.migrate import upgrade
from storage.models import Notification
from storage.notifications import Notifications, add_for_job
from tests.helpers.node import free_port

SECRET = b"s3cret-for-tests"


class WebhookReceiver:
    """A local HTTP endpoint recording every POST; answers the first ``fail_first`` requests with 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append((dict(self.headers), body))
                status = 500 if len(receiver.requests) <= receiver.fail_first else 204
                self.send_response(status)
                self.end_headers()

            def log_message(self, *_args) -> None:  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "WebhookReceiver":
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[tuple[Database, Notifications]]:
    url = f"sqlite:///{tmp_path}/n.db"
    upgrade(url)
    database = Database(url)
    yield database, Notifications(database)
    database.dispose()


def queue_announcement(database: Database, settings: NotificationSettings, rank: int = 2,
                       patient: dict[str, str] | None = None) -> dict:
    """What the worker does in its result transaction (a study row is not needed: study_id may be NULL)."""
    payload = build_payload(
        settings, study_id=42, study_instance_uid="1.2.3.4", accession_number="ACC-1", priority="urgent",
        findings={"rule": "fracture", "when": "fracture >= 0.85", "values": {"fracture": 0.93}},
        created_at=utcnow(), model="demo-mae 1", patient=patient or {"name": "Doe^Jane", "id": "PID-4711"},
    )
    entries = entries_for(settings, rank, payload)
    with database.session() as session:
        add_for_job(session, 7, None, "1.2.3.4", rank, entries, utcnow())  # type: ignore[arg-type]
    return payload


def test_webhook_is_signed_retried_after_a_500_and_carries_no_phi(store, tmp_path: Path) -> None:
    database, notifications = store
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    with WebhookReceiver(fail_first=1) as receiver:
        settings = NotificationSettings.model_validate({
            "dashboard_url": "https://node.example.org",
            "backoff_seconds": [0.2],
            "webhooks": [{"url": receiver.url, "secret_file": str(secret_file), "timeout_seconds": 5}],
        })
        queue_announcement(database, settings)
        notifier = Notifier(settings, notifications, owner="test")
        assert notifier.run_once() == 1  # answered 500: rescheduled
        with database.session() as session:
            row = session.scalar(select(Notification))
            assert (row.state, row.last_error) == ("pending", "DeliveryError: HTTP 500")
        assert notifier.run_once() == 0  # not due before the backoff
        time.sleep(0.3)
        assert notifier.run_once() == 1
        assert notifier.run_once() == 0  # sent rows are not sent again
    with database.session() as session:
        row = session.scalar(select(Notification))
        assert (row.state, row.attempts) == ("sent", 2)

    assert len(receiver.requests) == 2
    headers, body = receiver.requests[-1]
    expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == expected
    assert headers[SIGNATURE_HEADER] != "sha256=" + hmac.new(b"other", body, hashlib.sha256).hexdigest()
    payload = json.loads(body)
    assert payload["priority"] == "URGENT" and payload["study_instance_uid"] == "1.2.3.4"
    assert payload["link"] == "https://node.example.org/studies/42"
    assert payload["findings"]["values"] == {"fracture": 0.93}
    assert b"Doe" not in body and b"PID-4711" not in body and "patient_name" not in payload
    assert b"ACC-1" not in body and "accession_number" not in payload  # an identifier too: only with include_phi


def test_include_phi_adds_the_patient_and_below_min_priority_nothing_is_queued(store) -> None:
    database, notifications = store
    settings = NotificationSettings.model_validate({"include_phi": True, "min_priority": "high",
                                                    "webhooks": [{"url": "http://127.0.0.1:9/x"}]})
    payload = queue_announcement(database, settings, rank=1)
    assert (payload["patient_name"], payload["patient_id"]) == ("Doe^Jane", "PID-4711")
    assert payload["accession_number"] == "ACC-1"
    queue_announcement(database, settings, rank=0)  # routine: below min_priority
    assert notifications.counts() == {"pending": 1}


def test_unreachable_webhook_is_given_up_after_max_age_with_the_reason(store) -> None:
    database, notifications = store
    settings = NotificationSettings.model_validate({
        "max_age_hours": 1, "backoff_seconds": [0.1],
        "webhooks": [{"url": "http://127.0.0.1:9/nobody", "timeout_seconds": 2}],
    })
    queue_announcement(database, settings)
    notifier = Notifier(settings, notifications, owner="test")
    notifier.run_once()
    with database.session() as session:
        assert session.scalar(select(Notification.state)) == "pending"
        session.execute(update(Notification).values(created_at=utcnow() - timedelta(hours=2),
                                                    next_attempt_at=utcnow()))
    notifier.run_once()
    with database.session() as session:
        row = session.scalar(select(Notification))
    assert row.state == "dead"
    assert row.last_error.startswith("gave up after 2 attempt(s)") and "cannot reach the webhook" in row.last_error


def test_email_goes_through_a_local_smtp_server(store) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Sink

    class Recorder(Sink):
        def __init__(self) -> None:
            self.messages: list[tuple[str, list[str], bytes]] = []

        async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's naming
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
            return "250 OK"

    recorder = Recorder()
    port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        database, notifications = store
        settings = NotificationSettings.model_validate({
            "smtp": {"host": "127.0.0.1", "port": port, "from_address": "msknode@example.org",
                     "to": ["radiology@example.org", "oncall@example.org"], "timeout_seconds": 5},
        })
        queue_announcement(database, settings)
        assert Notifier(settings, notifications, owner="test").run_once() == 1
    finally:
        controller.stop()
    assert notifications.counts() == {"sent": 1}
    (sender, recipients, content), = recorder.messages
    assert sender == "msknode@example.org" and recipients == ["radiology@example.org", "oncall@example.org"]
    message = message_from_bytes(content)
    assert message["Subject"] == "[msknode] URGENT study 1.2.3.4"
    text = message.get_payload(decode=True).decode()
    assert "1.2.3.4" in text and "fracture: 0.93" in text and "/studies/42" in text
    assert "Doe" not in text and "PID-4711" not in text and "ACC-1" not in text


@pytest.fixture(scope="module")
def smtp_pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 (openssl): (ca.pem, server.pem, server.key)."""
    directory = tmp_path_factory.mktemp("smtp-pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=msknode test smtp ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-subj", "/CN=127.0.0.1",
            "-out", "server.csr")
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-sha256", "-extfile", "server.ext", "-out", "server.pem")
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


@pytest.mark.parametrize("trusted", [False, True], ids=["unknown-ca", "ca_file"])
def test_starttls_verifies_the_server_certificate(store, smtp_pki, trusted: bool) -> None:
    """STARTTLS with a verifying context: a server whose certificate no trusted CA signed gets nothing (the
    mail, and a login, would otherwise go to whoever answers); ``ca_file`` trusts a hospital's own CA."""
    import ssl

    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Sink

    ca, cert, key = smtp_pki
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    received: list[bytes] = []

    class Recorder(Sink):
        async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's naming
            received.append(envelope.content)
            return "250 OK"

    port = free_port()
    controller = Controller(Recorder(), hostname="127.0.0.1", port=port, tls_context=server_tls,
                            require_starttls=True)
    controller.start()
    try:
        database, notifications = store
        smtp = {"host": "127.0.0.1", "port": port, "from_address": "msknode@example.org",
                "to": ["radiology@example.org"], "timeout_seconds": 5, "starttls": True}
        if trusted:
            smtp["ca_file"] = str(ca)
        settings = NotificationSettings.model_validate({"smtp": smtp, "backoff_seconds": [60]})
        queue_announcement(database, settings)
        Notifier(settings, notifications, owner="test").run_once()
    finally:
        controller.stop()
    with database.session() as session:
        row = session.scalar(select(Notification))
    if trusted:
        assert row.state == "sent" and len(received) == 1
    else:
        assert row.state == "pending" and received == []
        assert "CERTIFICATE_VERIFY_FAILED" in row.last_error


def test_smtp_login_needs_both_username_and_password_file() -> None:
    from node.settings import ConfigError, parse_settings

    with pytest.raises(ConfigError) as caught:
        parse_settings({"notifications": {"smtp": {"host": "smtp.example.org", "from_address": "n@example.org",
                                                   "to": ["r@example.org"], "username": "msknode"}}})
    assert caught.value.problems == [
        "notifications.smtp: password_file: username and password_file are given together (or neither)"
    ]
