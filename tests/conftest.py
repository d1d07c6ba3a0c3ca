"""Top-level fixtures shared by every test package.

Kept small on purpose: package-specific fixtures live in each package's own conftest.py. What is here is
what more than one package needs: the repository on ``sys.path`` (so ``tests.helpers`` imports the same
way under ``pytest`` and ``python -m pytest``), a throwaway PostgreSQL cluster for the session, and migrated
databases (``database``: SQLite; ``db``: SQLite and, where available, PostgreSQL).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.db import Database
from storage.migrate import upgrade

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[object]:
    """One PostgreSQL cluster for the whole session (started only if a test asks for it)."""
    from tests.helpers.postgres import start_or_give_up

    cluster = start_or_give_up()  # skips with the reason locally, fails under CI
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster) -> str:
    """A fresh empty database in the session's cluster, as a ``postgresql+psycopg://`` URL."""
    return postgres_cluster.create_database()


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite database in the test's directory."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    migrated = Database(url)
    yield migrated
    migrated.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database: a SQLite file, and (where PostgreSQL is available) a throw-away PostgreSQL one."""
    url = f"sqlite:///{tmp_path}/unit.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade(url)
    migrated = Database(url)
    yield migrated
    migrated.dispose()
