"""Fixtures for the viewer tests: Orthanc with DICOMweb, the pinned OHIF app behind one local origin, Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.components import component_missing
from tests.viewer.ohif import CHROMIUM, DicomWebOrthanc, ViewerServer, require_ohif


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomWebOrthanc]:
    server = DicomWebOrthanc(tmp_path_factory.mktemp("orthanc-dicomweb"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def viewer(orthanc: DicomWebOrthanc) -> Iterator[ViewerServer]:
    server = ViewerServer(require_ohif(), orthanc).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Debian Chromium driven by Playwright (no browser download)."""
    if not CHROMIUM.exists():
        component_missing("chromium not installed (Debian package chromium; `make test` installs it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        component_missing("playwright not installed (pip extra `test`)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-extensions", "--no-first-run"],
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def artefacts(tmp_path: Path) -> Path:
    """Where the screenshots go (pytest keeps the last runs' temporary directories); printed by the tests."""
    directory = tmp_path / "screenshots"
    directory.mkdir()
    return directory
