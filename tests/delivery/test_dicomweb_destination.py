"""Results out by STOW-RS: the sender's ``dicomweb`` destination against a real STOW-RS server (another
``msknode serve --role dicomweb``, over HTTP and over mutual TLS) — delivered once; 503 backs off and is then
delivered; a refused instance (409 + Failure Reason) and refused credentials (401) are dead letters at once;
no listener, a silent server and an unreadable secret stay queued. Orthanc is tested in
tests/pipeline/test_dicomweb_end_to_end.py."""

from __future__ import annotations

import io
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.delivery.destinations import protocol_of
from node.delivery.dicomweb import classify_response
from node.delivery.sender import Sender
from node.settings import PeerSettings, SenderSettings, TlsSettings
from storage.db import Database
from storage.migrate import upgrade
from storage.models import Job, OutboxItem, Study
from storage.outbox import Outbox
from storage.spool import Spool
from tests.helpers.dicomdata import small_instance
from tests.helpers.node import NodeConfig, NodeProcess, Peer, free_port, wait_for_port
from tests.helpers.pki import make_pki

TOKEN = "sender-" + uuid.uuid4().hex
HUGE_MB = 1 << 40


@pytest.fixture()
def env(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/s.db"
    upgrade(url)
    database = Database(url)
    spool = Spool(tmp_path / "spool", fsync=False)
    yield database, spool, tmp_path
    database.dispose()


def queue_result(database: Database, spool: Spool, ds: pydicom.Dataset, destination: str = "archive") -> int:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path = spool.write_result(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, buffer.getvalue())
    now = datetime.now(timezone.utc)
    with database.session() as session:
        study = session.query(Study).filter_by(study_instance_uid=ds.StudyInstanceUID).one_or_none()
        if study is None:
            study = Study(study_instance_uid=ds.StudyInstanceUID, first_received_at=now, last_received_at=now,
                          status="done")
            session.add(study)
            session.flush()
        job = Job(study_id=study.id, study_revision=1, state="done", priority=0, attempts=1, created_at=now)
        session.add(job)
        session.flush()
        item = OutboxItem(job_id=job.id, study_instance_uid=ds.StudyInstanceUID, sop_instance_uid=ds.SOPInstanceUID,
                          sop_class_uid=ds.SOPClassUID, kind="SR", path=path, destination=destination,
                          state="pending", priority=0, attempts=0, next_attempt_at=now, created_at=now)
        session.add(item)
        session.flush()
        return item.id


def row(database: Database, item_id: int) -> OutboxItem:
    with database.session() as session:
        return session.get(OutboxItem, item_id)


def stow_node(directory: Path, min_free_disk_mb: int = 0, extra_toml: str = "", port: int | None = None) -> NodeProcess:
    config = NodeConfig(directory=directory, roles=("dicomweb",), dicomweb_port=port or free_port(),
                        min_free_disk_mb=min_free_disk_mb, extra_toml=extra_toml,
                        peers=(Peer("ai-node", "MSKNODE", stow_token=TOKEN),))
    node = NodeProcess(config).start()
    wait_for_port("127.0.0.1", config.dicomweb_port, 30, node.process)
    return node


def make_sender(database: Database, spool: Spool, url: str, token_file: Path | None, tls: TlsSettings | None = None,
                timeout: float = 5.0, **peer: object) -> Sender:
    archive = PeerSettings(name="archive", ae_title="ARCHIVE", host="127.0.0.1", receives_results=True,
                           protocol="dicomweb", url=url, auth="bearer" if token_file else "none",
                           secret_file=token_file, **peer)
    settings = SenderSettings(backoff_seconds=[0.3, 0.6], timeout_seconds=timeout, tls=tls or TlsSettings())
    return Sender("MSKNODE", lambda: [archive], Outbox(database), spool, settings)


def token_file(directory: Path, token: str = TOKEN) -> Path:
    path = directory / f"token-{uuid.uuid4().hex[:6]}"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def test_a_peer_with_protocol_dicomweb_gets_the_dicomweb_destination() -> None:
    peer = PeerSettings(name="a", ae_title="A", host="127.0.0.1", protocol="dicomweb", url="http://127.0.0.1:1/x")
    assert protocol_of(peer) == "dicomweb"
    assert protocol_of(PeerSettings(name="b", ae_title="B", host="127.0.0.1")) == "dimse"


@pytest.mark.parametrize(("status", "body", "kind", "code"), [
    (200, None, "delivered", "200"),
    (202, {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2"]}}]}}, "delivered", "202"),
    (409, {"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2"]},
                                               "00081197": {"vr": "US", "Value": [0xC000]}}]}}, "permanent", "0xC000"),
    (202, {"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2"]},
                                               "00081197": {"vr": "US", "Value": [0xA700]}}]}}, "transient", "0xA700"),
    (400, None, "permanent", "400"), (401, None, "permanent", "401"), (409, None, "permanent", "409"),
    (413, None, "permanent", "413"), (429, None, "transient", "429"), (500, None, "transient", "500"),
    (503, None, "transient", "503"), (302, None, "permanent", "302"),
])
def test_stow_answers_as_outcomes(status: int, body: object, kind: str, code: str) -> None:
    outcome = classify_response(status, body, "1.2")
    assert (outcome.kind, outcome.status) == (kind, code)


def test_results_are_delivered_by_stow_exactly_once(env) -> None:
    database, spool, tmp = env
    archive = stow_node(tmp / "archive")
    try:
        study = generate_uid()
        datasets = [small_instance(study_uid=study, seed=i) for i in range(3)]
        ids = [queue_result(database, spool, ds) for ds in datasets]
        sender = make_sender(database, spool, f"http://127.0.0.1:{archive.config.dicomweb_port}/dicom-web/",
                             token_file(tmp))
        assert sender.run_once() == 3
        assert [(row(database, i).state, row(database, i).last_status) for i in ids] == [("delivered", "200")] * 3
        assert sender.run_once() == 0  # never sent twice
        assert sorted(r.sop_instance_uid for r in archive.instances()) == sorted(ds.SOPInstanceUID for ds in datasets)
        assert {r.calling_ae_title for r in archive.instances()} == {"MSKNODE"}
    finally:
        archive.stop()


def test_503_backs_off_and_is_delivered_once_the_destination_has_room(env) -> None:
    database, spool, tmp = env
    archive = stow_node(tmp / "archive", min_free_disk_mb=HUGE_MB)
    try:
        item = queue_result(database, spool, small_instance(seed=5))
        sender = make_sender(database, spool, f"http://127.0.0.1:{archive.config.dicomweb_port}/dicom-web",
                             token_file(tmp))
        assert sender.run_once() == 1
        state = row(database, item)
        assert (state.state, state.attempts, state.last_status) == ("pending", 1, "503")
        assert archive.instances() == []
        archive.stop()
        archive.config.min_free_disk_mb = 0  # space returns
        archive.start()
        wait_for_port("127.0.0.1", archive.config.dicomweb_port, 30, archive.process)
        time.sleep(0.4)  # the first back-off
        assert sender.run_once() == 1
        assert row(database, item).state == "delivered"
        assert len(archive.instances()) == 1
    finally:
        archive.stop()


def test_a_refused_instance_and_refused_credentials_are_dead_letters_at_once(env) -> None:
    database, spool, tmp = env
    archive = stow_node(tmp / "archive")
    try:
        url = f"http://127.0.0.1:{archive.config.dicomweb_port}/dicom-web"
        broken = small_instance(seed=6)
        del broken.PixelData  # the destination refuses it (0xC000): 409, that instance only
        good = small_instance(seed=7)
        broken_id, good_id = queue_result(database, spool, broken), queue_result(database, spool, good)
        assert make_sender(database, spool, url, token_file(tmp)).run_once() == 2
        assert (row(database, broken_id).state, row(database, broken_id).last_status) == ("dead", "0xC000")
        assert row(database, good_id).state == "delivered"

        other = queue_result(database, spool, small_instance(seed=8))
        assert make_sender(database, spool, url, token_file(tmp, "not-the-token")).run_once() == 1
        state = row(database, other)
        assert (state.state, state.last_status, state.attempts) == ("dead", "401", 1)
    finally:
        archive.stop()


def test_no_listener_a_silent_server_and_an_unreadable_secret_stay_queued(env) -> None:
    database, spool, tmp = env
    item = queue_result(database, spool, small_instance(seed=9))
    make_sender(database, spool, f"http://127.0.0.1:{free_port()}/dicom-web", token_file(tmp)).run_once()
    state = row(database, item)
    assert (state.state, state.last_status) == ("pending", "no-connection")

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    try:
        time.sleep(0.4)
        started = time.monotonic()
        make_sender(database, spool, f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web", token_file(tmp),
                    timeout=1.0).run_once()
        assert time.monotonic() - started < 10
        state = row(database, item)
        assert (state.state, state.last_status, state.attempts) == ("pending", "timeout", 2)
    finally:
        for connection in accepted:
            connection.close()
        silent.close()

    time.sleep(0.7)
    make_sender(database, spool, f"http://127.0.0.1:{free_port()}/dicom-web", tmp / "missing-token").run_once()
    state = row(database, item)
    assert (state.state, state.last_status) == ("pending", "auth-config")
    assert "missing-token" in state.last_error


@pytest.mark.slow
def test_https_with_a_ca_file_and_mutual_tls(env) -> None:
    database, spool, tmp = env
    pki = make_pki(tmp / "pki")
    tls = (f'[dicomweb.tls]\nenabled = true\ncertificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\n'
           f'ca_certificates = "{pki.ca}"\nrequire_client_certificate = true\n')
    archive = stow_node(tmp / "archive", extra_toml=tls)
    try:
        url = f"https://127.0.0.1:{archive.config.dicomweb_port}/dicom-web"
        client_tls = TlsSettings(certificate=pki.client_cert, private_key=pki.client_key)
        unverified = queue_result(database, spool, small_instance(seed=10))
        # The system CAs do not know the test CA: the server is not trusted, nothing is sent (retried later).
        make_sender(database, spool, url, token_file(tmp), tls=client_tls).run_once()
        assert (row(database, unverified).state, row(database, unverified).last_status) == ("pending", "no-connection")
        time.sleep(0.4)
        # Trusted, but without a client certificate: the server refuses the handshake.
        make_sender(database, spool, url, token_file(tmp), ca_file=pki.ca).run_once()
        assert (row(database, unverified).state, row(database, unverified).last_status) == ("pending", "no-connection")
        assert archive.instances() == []
        time.sleep(0.7)
        make_sender(database, spool, url, token_file(tmp), tls=client_tls, ca_file=pki.ca).run_once()
        assert row(database, unverified).state == "delivered"
        assert len(archive.instances()) == 1
    finally:
        archive.stop()
