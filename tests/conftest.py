"""Top-level fixtures shared by every test package.

Kept small on purpose: package-specific fixtures live in each package's own conftest.py. What is here is
what more than one package needs: the repository on ``sys.path`` (so ``tests.helpers`` imports the same
way under ``pytest`` and ``python -m pytest``) and a throwaway PostgreSQL cluster for the session.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[object]:
    """One PostgreSQL cluster for the whole session (started only if a test asks for it)."""
    from tests.helpers.postgres import PostgresCluster, PostgresUnavailable

    try:
        cluster = PostgresCluster.start()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster) -> str:
    """A fresh empty database in the session's cluster, as a ``postgresql+psycopg://`` URL."""
    return postgres_cluster.create_database()
