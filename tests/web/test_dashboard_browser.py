"""The dashboard in a real browser against a real node: headless Chromium logs in, adds a peer and C-ECHOes
it (a DCMTK storescp), sees the URGENT study (sent by an urgent peer with storescu) on top, retries a dead
letter (the PACS refused the results; once it accepts, the retry delivers), is refused a POST without the
CSRF token, logs out; a viewer cannot open the IT pages. Screenshots go to test-artifacts/screenshots/."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from node.web.accounts import Accounts
from storage.db import Database
from storage.models import OutboxItem, Study
from tests.helpers.models import tiny_model
from tests.helpers.node import MSKNODE, REPO_ROOT, NodeProcess, Peer, free_port, wait_for, wait_for_port
from tests.helpers.tools import echoscu, require_tool, storescu, start_storescp
from tests.pipeline.test_orthanc_end_to_end import DEMO_MODEL, PipelineConfig, phantom_study

pytestmark = [pytest.mark.slow]

ADMIN_PASSWORD = "admin password 1"
VIEWER_PASSWORD = "viewer password 1"


class DashboardNodeConfig(PipelineConfig):
    """The whole pipeline plus the web role; 2 error-map passes (the test looks at pages, not accuracy)."""

    def write(self) -> Path:
        path = super().write()
        path.write_text(path.read_text().replace("passes = 10", "passes = 2"))
        return path


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(10)


def add_user(config_path: Path, name: str, role: str, password: str) -> None:
    result = subprocess.run([*MSKNODE, "users", "add", name, "--role", role, "--password-stdin", "-c", str(config_path)],
                            input=password + "\n", capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture()
def node(tmp_path: Path):
    require_tool("storescu")
    pacs_port, archive_port = free_port(), free_port()
    refusing_pacs = start_storescp(tmp_path / "pacs-refusing", pacs_port, "--refuse")
    archive = start_storescp(tmp_path / "archive", archive_port, ae_title="ARCHIVE")
    config = DashboardNodeConfig(
        directory=tmp_path / "node",
        peers=(
            Peer("ward-dr", "WARDDR", priority="routine"),
            Peer("emergency-dr", "EMERGDR", priority="urgent"),
            Peer("pacs", "PACS", port=pacs_port, may_send=False, receives_results=True),
        ),
        roles=("receiver", "scheduler", "worker", "sender", "web"),
        web_port=free_port(),
    )
    if not (DEMO_MODEL / "config.json").exists():
        config.model = tiny_model(tmp_path / "tiny-model")
    config.write()
    add_user(config.path, "admin", "admin", ADMIN_PASSWORD)
    database = Database(config.url)
    try:  # the CLI itself is covered by test_dashboard_app.py; one subprocess less here
        Accounts(database).add_user("reader", VIEWER_PASSWORD, "viewer")
    finally:
        database.dispose()
    process = NodeProcess(config).start(timeout=120)
    wait_for_port("127.0.0.1", config.web_port, 60, process.process)
    state = {"refusing_pacs": refusing_pacs, "archive": archive, "pacs_port": pacs_port,
             "archive_port": archive_port, "tmp": tmp_path}
    yield process, state
    process.stop(timeout=60)
    for name in ("refusing_pacs", "archive", "good_pacs"):
        if name in state and state[name].poll() is None:
            stop(state[name])


def test_dashboard_in_a_browser(node, chromium, screenshot_dir: Path, tmp_path: Path) -> None:
    process, state = node
    base = f"http://127.0.0.1:{process.config.web_port}"

    # An urgent study first, then a routine one: newest-first alone would put the routine one on top.
    urgent = phantom_study(tmp_path / "urgent", 1, study_key="urgent")
    routine = phantom_study(tmp_path / "routine", 1, study_key="routine")
    assert storescu(process.port, urgent, calling="EMERGDR").returncode == 0
    assert storescu(process.port, routine, calling="WARDDR").returncode == 0
    assert echoscu(process.port, calling="STRANGER").returncode != 0  # a rejected association for the log

    def dead_letters() -> list[OutboxItem]:
        with process.database() as db, db.session() as session:
            return list(session.scalars(select(OutboxItem).where(OutboxItem.state == "dead")))

    wait_for(lambda: len(dead_letters()) >= 4, timeout=240, what="both studies' SR and SC refused by the PACS")
    with process.database() as db, db.session() as session:
        urgent_id = session.scalar(select(Study.id).where(Study.priority == 2))
    assert urgent_id is not None

    context = chromium.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(15000)
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{base}/")
    assert page.url.endswith("/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "wrong password!")
    page.click("button[type=submit]")
    assert "Wrong user name or password" in page.content()
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("table.studies")

    # The urgent study is on top, with its status and an error-map thumbnail.
    first = page.locator("tr.study-row").first
    assert first.get_attribute("data-study-id") == str(urgent_id)
    assert "URGENT" in first.inner_text()
    page.wait_for_function("() => [...document.querySelectorAll('img.thumb-small')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("img.thumb-small").count() == 2
    page.screenshot(path=str(screenshot_dir / "studies.png"))

    page.click(f"tr.study-row[data-study-id='{urgent_id}'] a")
    page.wait_for_selector("img.thumb")
    page.wait_for_function("() => [...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)")
    content = page.content()
    assert "Abnormality score" in content and "dead" in content
    page.screenshot(path=str(screenshot_dir / "study.png"), full_page=True)

    # Add a peer and C-ECHO it.
    page.click("nav >> text=Peers")
    page.fill("form.peer-form input[name=name]", "archive")
    page.fill("form.peer-form input[name=ae_title]", "ARCHIVE")
    page.fill("form.peer-form input[name=host]", "127.0.0.1")
    page.fill("form.peer-form input[name=port]", str(state["archive_port"]))
    page.uncheck("form.peer-form input[name=may_send]")
    page.click("form.peer-form button[type=submit]")
    assert "Peer archive added." in page.locator(".flash").inner_text()
    page.click("tr[data-peer=archive] button:has-text('C-ECHO')")
    flash = page.locator(".flash").inner_text()
    assert "C-ECHO archive" in flash and "success" in flash, flash
    page.screenshot(path=str(screenshot_dir / "peers.png"), full_page=True)

    # A POST without the CSRF token is refused, even with the session cookie.
    forged = page.request.post(f"{base}/peers/archive/remove", form={"name": "archive"})
    assert forged.status == 403
    assert page.goto(f"{base}/peers").ok and page.locator("tr[data-peer=archive]").count() == 1

    page.click("nav >> text=Associations")
    assert "STRANGER" in page.content() and "rejected" in page.content()
    page.screenshot(path=str(screenshot_dir / "associations.png"), full_page=True)

    # The PACS accepts again: a retried dead letter is delivered.
    stop(state["refusing_pacs"])
    state["good_pacs"] = start_storescp(state["tmp"] / "pacs", state["pacs_port"])
    page.click("nav >> text=Queue")
    row = page.locator("table.attention tr[data-item^='out:']").first
    item_id = int(row.get_attribute("data-item").split(":")[1])
    page.screenshot(path=str(screenshot_dir / "queue.png"), full_page=True)
    row.locator("button:has-text('Retry')").click()
    assert "queued again" in page.locator(".flash").inner_text()

    def delivered() -> bool:
        with process.database() as db, db.session() as session:
            return session.get(OutboxItem, item_id).state == "delivered"

    wait_for(delivered, timeout=60, what="the retried dead letter delivered")
    page.reload()
    assert page.locator(f"tr[data-item='out:{item_id}']").count() == 0

    page.click("nav >> text=System")
    assert "Role processes" in page.content()
    page.screenshot(path=str(screenshot_dir / "system.png"), full_page=True)

    page.click("text=Log out")
    assert page.url.endswith("/login")
    assert page.goto(f"{base}/queue").url.endswith("/login")

    # A viewer sees studies but not the IT pages.
    page.fill("input[name=username]", "reader")
    page.fill("input[name=password]", VIEWER_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("table.studies")
    assert page.locator("nav >> text=Peers").count() == 0
    assert page.goto(f"{base}/peers").status == 403
    assert page.goto(f"{base}/queue").status == 403
    context.close()

    # Nothing identifying ever travelled in a URL: no study UID, no accession number.
    with process.database() as db, db.session() as session:
        identifiers = [value for row in session.execute(select(Study.study_instance_uid, Study.accession_number))
                       for value in row if value]
    assert len(requested) > 20 and identifiers
    assert not [url for url in requested if any(value in url for value in identifiers)]
