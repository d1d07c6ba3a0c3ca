"""Fixtures shared by the operate tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.db import Database
from storage.migrate import upgrade


@pytest.fixture
def database(tmp_path: Path):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    db = Database(url)
    yield db
    db.dispose()
