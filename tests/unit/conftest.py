"""Fixtures shared by the unit tests that need a real, migrated database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.db import Database
from storage.migrate import upgrade


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database: a SQLite file, and (where PostgreSQL is available) a throw-away PostgreSQL one."""
    url = f"sqlite:///{tmp_path}/unit.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade(url)
    database = Database(url)
    yield database
    database.dispose()
