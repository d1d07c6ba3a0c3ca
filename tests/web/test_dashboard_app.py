"""The dashboard app in-process (Starlette TestClient): logins, sessions, CSRF, roles, no PHI in URLs,
dead-letter retry, thumbnails, and the ``msknode users`` commands."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from starlette.testclient import TestClient
from typer.testing import CliRunner

from node.settings import parse_settings
from node.web import create_app
from node.web.accounts import Accounts
from node.web.passwords import hash_password, verify_password
from storage.db import Database
from storage.migrate import upgrade
from storage.models import Job, Notification, OutboxItem, Series, Study
from storage.spool import Spool
from tests.helpers.node import free_port

PASSWORD = "correct horse battery"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1111111111111"
SECRET_ACCESSION = "ACC-SECRET-42"


@pytest.fixture()
def env(tmp_path: Path):
    settings = parse_settings(
        {
            "storage": {"database_url": f"sqlite:///{tmp_path / 'node.db'}", "spool_dir": str(tmp_path / "spool")},
            "web": {"secret_key_file": str(tmp_path / "web-secret")},
            "engine": {"model": str(tmp_path / "no-model")},
            "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112, "receives_results": True}],
        },
        resolve_hosts=False,
    )
    upgrade(settings.storage.database_url)
    database = Database(settings.storage.database_url)
    spool = Spool(settings.storage.spool_dir)
    accounts = Accounts(database)
    accounts.add_user("alice", PASSWORD, "admin")
    accounts.add_user("victor", PASSWORD, "viewer")
    app = create_app(settings, database, spool)
    yield settings, database, spool, app
    database.dispose()


def client(app) -> TestClient:  # type: ignore[no-untyped-def]
    return TestClient(app, base_url="http://127.0.0.1:8080", follow_redirects=False)


def login(app, username: str = "alice", password: str = PASSWORD) -> TestClient:  # type: ignore[no-untyped-def]
    browser = client(app)
    page = browser.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    response = browser.post("/login", data={"login_token": token, "username": username, "password": password})
    assert response.status_code == 303, response.text
    return browser


def csrf_of(browser: TestClient, path: str = "/") -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', browser.get(path).text).group(1)


def add_study(database: Database, priority: int, minutes_ago: int, uid: str, accession: str) -> int:
    when = datetime.now(timezone.utc) - timedelta(minutes=minutes_ago)
    with database.session() as session:
        study = Study(study_instance_uid=uid, accession_number=accession, study_date="20261120",
                      first_received_at=when, last_received_at=when, status="done", priority=priority,
                      priority_reason="rule fracture-likely" if priority else None)
        session.add(study)
        session.flush()
        session.add(Series(study_id=study.id, series_instance_uid=uid + ".1", modality="DX", body_part_examined="KNEE"))
        return study.id


def test_passwords_are_salted_scrypt_and_checked() -> None:
    first, second = hash_password(PASSWORD), hash_password(PASSWORD)
    assert first.startswith("scrypt$") and len(first.split("$")) == 6
    assert first != second  # a fresh salt each time
    assert verify_password(PASSWORD, first) and verify_password(PASSWORD, second)
    assert not verify_password("wrong password", first)
    assert not verify_password(PASSWORD, "garbage")
    with pytest.raises(ValueError, match="password"):
        hash_password("short")


def test_pages_need_a_login_and_a_wrong_password_gets_none(env) -> None:
    _, _, _, app = env
    anonymous = client(app)
    assert anonymous.get("/").headers["location"] == "/login"
    assert anonymous.get("/peers").headers["location"] == "/login"
    assert anonymous.post("/peers", data={"name": "x"}).status_code == 403
    page = anonymous.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    refused = anonymous.post("/login", data={"login_token": token, "username": "alice", "password": "not it at all"})
    assert refused.status_code == 401 and "Wrong user name or password" in refused.text
    assert "msknode_session" not in refused.cookies
    token = re.search(r'name="login_token" value="([^"]+)"', refused.text).group(1)  # each form has its own
    unknown = anonymous.post("/login", data={"login_token": token, "username": "mallory", "password": PASSWORD})
    assert unknown.status_code == 401



def try_login(browser: TestClient, username: str, password: str):  # type: ignore[no-untyped-def]
    page = browser.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    return browser.post("/login", data={"login_token": token, "username": username, "password": password})


def test_password_guessing_is_throttled_per_user_name(env) -> None:
    settings, _, _, app = env
    assert settings.web.login_max_failures == 5 and settings.web.login_window_minutes == 15  # the defaults
    guesser = client(app)
    for attempt in range(5):
        assert try_login(guesser, "alice", f"guess number {attempt}").status_code == 401
    # The sixth try is refused before the password is even checked, the right password included.
    locked = try_login(guesser, "alice", PASSWORD)
    assert locked.status_code == 429 and "Too many failed logins. Try again in 15 minutes." in locked.text
    assert 880 <= int(locked.headers["retry-after"]) <= 900
    assert "msknode_session" not in locked.cookies
    # Another user name is not locked by alice's failures (nor is an unknown name told apart: same counting).
    assert try_login(client(app), "victor", PASSWORD).status_code == 303
    for attempt in range(5):
        assert try_login(guesser, "nobody-here", f"guess {attempt}").status_code == 401
    assert try_login(guesser, "nobody-here", "guess 6").status_code == 429


def test_a_correct_login_clears_the_user_names_failures(env) -> None:
    _, _, _, app = env
    browser = client(app)
    for attempt in range(4):
        assert try_login(browser, "alice", f"typo {attempt}").status_code == 401
    assert try_login(browser, "alice", PASSWORD).status_code == 303
    for attempt in range(4):  # four more typos do not lock: the count started again
        assert try_login(browser, "alice", f"typo {attempt}").status_code == 401
    assert try_login(browser, "alice", PASSWORD).status_code == 303


def test_one_address_guessing_many_user_names_is_throttled(env) -> None:
    _, _, _, app = env
    guesser = client(app)  # every TestClient request comes from the same client address
    for attempt in range(20):  # 4 x 5 failures, spread over user names that each stay under 5
        assert try_login(guesser, f"name{attempt % 5}", f"guess {attempt}").status_code == 401
    assert try_login(guesser, "victor", PASSWORD).status_code == 429


def test_pages_may_not_be_framed_or_cached(env) -> None:
    _, _, _, app = env
    for response in (client(app).get("/login"), login(app).get("/")):
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["referrer-policy"] == "no-referrer"


def test_login_form_without_its_token_is_refused(env) -> None:
    _, _, _, app = env
    anonymous = client(app)
    anonymous.get("/login")
    response = anonymous.post("/login", data={"username": "alice", "password": PASSWORD})
    assert response.status_code == 403


def test_session_cookie_is_httponly_lax_and_only_its_hash_is_stored(env) -> None:
    _, database, _, app = env
    anonymous = client(app)
    page = anonymous.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    response = anonymous.post("/login", data={"login_token": token, "username": "alice", "password": PASSWORD})
    cookie = [v for k, v in response.headers.multi_items() if k == "set-cookie" and v.startswith("msknode_session=")][0]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    with database.session() as session:
        from storage.models import WebSession

        hashes = [row.token_hash for row in session.query(WebSession)]
    assert value not in hashes and len(hashes) == 1


def test_secure_cookie_when_configured(env, tmp_path: Path) -> None:
    settings, database, spool, _ = env
    settings.web.cookie_secure = True
    app = create_app(settings, database, spool)
    anonymous = TestClient(app, base_url="https://dashboard.example", follow_redirects=False)
    page = anonymous.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    response = anonymous.post("/login", data={"login_token": token, "username": "alice", "password": PASSWORD})
    cookie = [v for k, v in response.headers.multi_items() if k == "set-cookie" and v.startswith("msknode_session=")][0]
    assert "Secure" in cookie


def test_every_post_needs_the_sessions_csrf_token(env) -> None:
    _, _, _, app = env
    browser = login(app)
    fields = {"name": "modality1", "ae_title": "MOD1", "host": "127.0.0.1", "port": "104", "may_send": "on"}
    assert browser.post("/peers", data=fields).status_code == 403
    assert browser.post("/peers", data={**fields, "csrf_token": "forged"}).status_code == 403
    assert browser.post("/logout", data={}).status_code == 403
    assert "modality1" not in browser.get("/peers").text
    added = browser.post("/peers", data={**fields, "csrf_token": csrf_of(browser)})
    assert added.status_code == 303
    page = browser.get("/peers").text
    assert "modality1" in page and "Peer modality1 added." in page
    # every form on every page carries the token
    for path in ("/", "/peers", "/queue", "/associations", "/system"):
        html = browser.get(path).text
        assert html.count('method="post"') == html.count('name="csrf_token"'), path


def test_bad_peer_input_names_the_field(env) -> None:
    _, _, _, app = env
    browser = login(app)
    response = browser.post("/peers", data={"name": "bad", "ae_title": "X" * 17, "host": "127.0.0.1", "port": "104",
                                            "csrf_token": csrf_of(browser)})
    assert response.status_code == 400 and "ae_title" in response.text
    response = browser.post("/peers", data={"name": "bad", "ae_title": "BAD", "host": "127.0.0.1", "port": "0",
                                            "csrf_token": csrf_of(browser)})
    assert response.status_code == 400 and "port" in response.text


def test_viewer_sees_studies_but_no_it_pages(env) -> None:
    _, database, _, app = env
    study_id = add_study(database, 0, 5, STUDY_UID, SECRET_ACCESSION)
    viewer = login(app, "victor")
    assert viewer.get("/").status_code == 200
    assert viewer.get(f"/studies/{study_id}").status_code == 200
    assert 'href="/peers"' not in viewer.get("/").text
    for path in ("/peers", "/associations", "/queue", "/system", "/peers/pacs/edit"):
        assert viewer.get(path).status_code == 403, path
    token = csrf_of(viewer)
    assert viewer.post("/peers/pacs/remove", data={"csrf_token": token}).status_code == 403
    assert viewer.post("/queue/out/1/retry", data={"csrf_token": token}).status_code == 403


def test_studies_sorted_by_priority_then_time_and_no_phi_in_urls(env) -> None:
    _, database, _, app = env
    routine_new = add_study(database, 0, 1, STUDY_UID, SECRET_ACCESSION)
    urgent_old = add_study(database, 2, 300, STUDY_UID + ".2", "ACC-URGENT")
    routine_old = add_study(database, 0, 60, STUDY_UID + ".3", "ACC-OLD")
    high = add_study(database, 1, 120, STUDY_UID + ".4", "ACC-HIGH")
    browser = login(app)
    html = browser.get("/").text
    order = [int(i) for i in re.findall(r'data-study-id="(\d+)"', html)]
    assert order == [urgent_old, high, routine_new, routine_old]
    assert "URGENT" in html and "rule fracture-likely" in html
    pages = [html, browser.get(f"/studies/{routine_new}").text, browser.get("/queue").text]
    for page in pages:
        for url in re.findall(r'(?:href|src|action)="([^"]*)"', page):
            assert STUDY_UID not in url and SECRET_ACCESSION not in url and "ACC-" not in url, url
    assert SECRET_ACCESSION in pages[1]  # shown on the page to a logged-in user, just never in a URL
    assert browser.get("/studies/99999").status_code == 404


def test_dead_letter_retry_and_discard(env) -> None:
    _, database, _, app = env
    study_id = add_study(database, 0, 1, STUDY_UID, SECRET_ACCESSION)
    now = datetime.now(timezone.utc)
    with database.session() as session:
        job = Job(study_id=study_id, study_revision=1, state="done", created_at=now)
        session.add(job)
        session.flush()
        items = []
        for index in range(2):
            item = OutboxItem(job_id=job.id, study_instance_uid=STUDY_UID, sop_instance_uid=f"{STUDY_UID}.9.{index}",
                              sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", kind="SR", path="results/x.dcm",
                              destination="pacs", state="dead", attempts=5, next_attempt_at=now, created_at=now,
                              last_status="0xA700", last_error="refused by the PACS")
            session.add(item)
            items.append(item)
        note = Notification(study_id=study_id, study_instance_uid=STUDY_UID, job_id=job.id, channel="webhook",
                            target="https://hooks.example.org/secret-token", priority=2, payload={}, state="dead",
                            attempts=6, next_attempt_at=now, created_at=now, last_error="HTTP 503")
        session.add(note)
        session.flush()
        retry_id, discard_id, note_id = items[0].id, items[1].id, note.id
    browser = login(app)
    page = browser.get("/queue").text
    assert "refused by the PACS" in page and f"/queue/out/{retry_id}/retry" in page
    assert f"/queue/note/{note_id}/retry" in page and "secret-token" not in page
    token = csrf_of(browser, "/queue")
    assert browser.post(f"/queue/out/{retry_id}/retry", data={"csrf_token": token}).status_code == 303
    assert browser.post(f"/queue/out/{discard_id}/discard", data={"csrf_token": token}).status_code == 303
    assert browser.post(f"/queue/note/{note_id}/retry", data={"csrf_token": token}).status_code == 303
    with database.session() as session:
        assert session.get(OutboxItem, retry_id).state == "pending"
        assert session.get(OutboxItem, retry_id).attempts == 0
        assert session.get(OutboxItem, discard_id).state == "discarded"
        assert (session.get(Notification, note_id).state, session.get(Notification, note_id).attempts) == ("pending", 0)
    again = browser.post(f"/queue/out/{retry_id}/retry", data={"csrf_token": token}, follow_redirects=True)
    assert "no longer in a state" in again.text


def test_logout_ends_the_session(env) -> None:
    _, _, _, app = env
    browser = login(app)
    cookie = browser.cookies.get("msknode_session")
    assert browser.post("/logout", data={"csrf_token": csrf_of(browser)}).headers["location"] == "/login"
    replay = client(app)
    replay.cookies.set("msknode_session", cookie)
    assert replay.get("/").headers["location"] == "/login"


def test_password_change_ends_sessions_and_removed_user_is_out(env) -> None:
    _, database, _, app = env
    browser = login(app, "victor")
    Accounts(database).set_password("victor", "another password")
    assert browser.get("/").status_code == 303
    browser = login(app, "victor", "another password")
    Accounts(database).remove_user("victor")
    assert browser.get("/").status_code == 303


def _write_capture(path: Path, study_uid: str, source_uid: str) -> str:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study_uid, generate_uid(), 1
    ds.Modality = "OT"
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", source_uid
    ds.SourceImageSequence = [item]
    pixels = np.zeros((600, 500, 3), dtype=np.uint8)
    pixels[100:200, 100:300, 0] = 255
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 600, 500, 3, "RGB"
    ds.PlanarConfiguration, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 0, 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def test_thumbnail_of_the_error_map_is_rendered_cached_and_needs_a_login(env) -> None:
    _, database, spool, app = env
    study_id = add_study(database, 0, 1, STUDY_UID, SECRET_ACCESSION)
    sop = _write_capture(spool.root / "results" / STUDY_UID / "series" / "sc1.dcm", STUDY_UID, "1.2.3.4")
    assert client(app).get(f"/studies/{study_id}/images/0.png").status_code == 303
    viewer = login(app, "victor")
    response = viewer.get(f"/studies/{study_id}/images/0.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG")
    from PIL import Image
    import io

    image = Image.open(io.BytesIO(response.content))
    assert max(image.size) == 384 and image.getpixel((100, 100))[0] > 200  # the red block survives
    assert (spool.root / ".cache" / "thumbnails" / f"{sop}.png").exists()
    assert viewer.get(f"/studies/{study_id}/images/1.png").status_code == 404


def test_thumbnail_cache_forgets_old_renders(tmp_path: Path) -> None:
    import os

    from node.web.thumbnails import prune_cache

    old, fresh = tmp_path / "old.png", tmp_path / "fresh.png"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(old, (1_000_000, 1_000_000))
    assert prune_cache(tmp_path, 86400) == 1
    assert not old.exists() and fresh.exists()


def test_edit_remove_and_echo_a_peer(env) -> None:
    _, _, _, app = env
    browser = login(app)
    page = browser.get("/peers/pacs/edit").text
    assert 'value="PACS"' in page and "checked" in page  # receives_results
    token = csrf_of(browser, "/peers")
    saved = browser.post("/peers/pacs", data={"ae_title": "PACS2", "host": "127.0.0.1", "port": "11112",
                                              "priority": "high", "receives_results": "on", "csrf_token": token})
    assert saved.status_code == 303
    row = re.search(r'<tr data-peer="pacs">(.*?)</tr>', browser.get("/peers").text, re.S).group(1)
    assert "PACS2" in row and "high" in row and "database" in row
    refused_port = free_port()
    browser.post("/peers", data={"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": str(refused_port),
                                 "csrf_token": token})
    echoed = browser.post("/peers/down/echo", data={"csrf_token": token}, follow_redirects=True)
    assert "C-ECHO down" in echoed.text and "FAILED" in echoed.text and "Connection refused" in echoed.text
    assert browser.post("/peers/pacs/remove", data={"csrf_token": token}).status_code == 303
    assert 'data-peer="pacs"' not in browser.get("/peers").text
    assert browser.get("/peers/pacs/edit").status_code == 404


def test_healthz_and_metrics_need_no_login(env) -> None:
    _, _, _, app = env
    anonymous = client(app)
    health = anonymous.get("/healthz")
    assert health.status_code in (200, 503) and "ok" in health.json()
    metrics = anonymous.get("/metrics")
    assert metrics.status_code == 200 and "text/plain" in metrics.headers["content-type"]
    assert "msknode" in metrics.text


def test_users_cli(tmp_path: Path) -> None:
    from node.cli import app as cli

    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndatabase_url = "sqlite:///{tmp_path / "node.db"}"\nspool_dir = "{tmp_path / "spool"}"\n')
    runner = CliRunner()
    added = runner.invoke(cli, ["users", "add", "root", "--role", "admin", "--password-stdin", "-c", str(config)],
                          input=PASSWORD + "\n")
    assert added.exit_code == 0, added.output
    duplicate = runner.invoke(cli, ["users", "add", "root", "--password-stdin", "-c", str(config)], input=PASSWORD + "\n")
    assert duplicate.exit_code == 2 and "already exists" in duplicate.output
    bad_role = runner.invoke(cli, ["users", "add", "x", "--role", "god", "--password-stdin", "-c", str(config)],
                             input=PASSWORD + "\n")
    assert bad_role.exit_code == 2 and "role" in bad_role.output
    listed = runner.invoke(cli, ["users", "list", "-c", str(config)])
    assert "root" in listed.output and "admin" in listed.output and PASSWORD not in listed.output
    changed = runner.invoke(cli, ["users", "passwd", "root", "--password-stdin", "-c", str(config)], input="new password 1\n")
    assert changed.exit_code == 0
    database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        assert Accounts(database).authenticate("root", "new password 1") is not None
        assert Accounts(database).authenticate("root", PASSWORD) is None
    finally:
        database.dispose()
    assert runner.invoke(cli, ["users", "remove", "root", "-c", str(config)]).exit_code == 0
    assert runner.invoke(cli, ["users", "remove", "root", "-c", str(config)]).exit_code == 1


def test_first_start_tells_how_to_create_the_first_user(tmp_path: Path) -> None:
    from node.web.accounts import first_user_hint

    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    database = Database(url)
    try:
        hint = first_user_hint(database, tmp_path / "my node.toml")
        assert hint is not None
        assert f"msknode users add NAME --role admin --config '{tmp_path / 'my node.toml'}'" in hint
        Accounts(database).add_user("first", PASSWORD, "admin")
        assert first_user_hint(database, None) is None
    finally:
        database.dispose()


def _accounts_behave(database: Database) -> None:
    from sqlalchemy import update

    from storage.models import WebSession

    accounts = Accounts(database)
    user = accounts.add_user("carol", PASSWORD, "viewer")
    with pytest.raises(ValueError, match="username"):
        accounts.add_user("carol", PASSWORD, "viewer")
    with pytest.raises(ValueError, match="username"):
        accounts.add_user("bad name/", PASSWORD, "viewer")
    assert accounts.authenticate("carol", "wrong password") is None
    assert accounts.authenticate("carol", PASSWORD) == user
    token, csrf = accounts.start_session(user, hours=1)
    assert accounts.session_for(token).csrf_token == csrf
    assert accounts.session_for(token + "x") is None
    with database.session() as session:
        session.execute(update(WebSession).values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
    assert accounts.session_for(token) is None  # expired
    accounts.end_session(token)


def test_accounts_and_session_expiry_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    database = Database(url)
    try:
        _accounts_behave(database)
    finally:
        database.dispose()


def test_accounts_and_session_expiry_on_postgresql(postgres_url: str) -> None:
    upgrade(postgres_url)
    database = Database(postgres_url)
    try:
        _accounts_behave(database)
    finally:
        database.dispose()


def test_a_dicomweb_peer_is_added_and_edited_in_the_form(env) -> None:
    _, _, _, app = env
    browser = login(app)
    fields = {"name": "vna", "ae_title": "VNA", "host": "127.0.0.1", "port": "104", "may_send": "on",
              "receives_results": "on", "protocol": "dicomweb", "auth": "bearer", "verify_tls": "on",
              "secret_file": "/etc/msknode/vna-token", "stow_token_sha256": "ab" * 32}
    refused = browser.post("/peers", data={**fields, "csrf_token": csrf_of(browser)})  # no url
    assert refused.status_code == 400 and "url: needed" in refused.text
    added = browser.post("/peers", data={**fields, "url": "https://vna.example.org/dicom-web",
                                         "csrf_token": csrf_of(browser)})
    assert added.status_code == 303
    page = browser.get("/peers").text
    assert "STOW-RS https://vna.example.org/dicom-web (STOW-RS in)" in page
    edit = browser.get("/peers/vna/edit").text
    assert 'value="https://vna.example.org/dicom-web"' in edit and 'value="' + "ab" * 32 + '"' in edit
    changed = browser.post("/peers/vna", data={**fields, "url": "https://vna.example.org/dicom-web",
                                               "auth": "basic", "csrf_token": csrf_of(browser)})
    assert changed.status_code == 400 and "username: needed" in changed.text
