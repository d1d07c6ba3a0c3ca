"""Fixtures for the browser tests: headless Chromium (Debian package) driven by Playwright."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.components import component_missing

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


def chromium_executable() -> str:
    """Chromium's path; skips naming the Debian package when it is missing (a failure under CI)."""
    found = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    if found is None:
        component_missing("chromium not installed (Debian package chromium; `make test` installs it when run as root)")
    return found


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    """A headless Chromium; skips (naming what to install) when it or Playwright is missing; fails under CI."""
    executable = chromium_executable()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        component_missing("playwright not installed (pip extra `test`)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def screenshot_dir() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
