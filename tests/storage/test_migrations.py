"""Alembic migrations create exactly the schema the models describe, and are idempotent."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from storage.db import make_engine
from storage.migrate import current_revision, head_revision, upgrade
from storage.models import Base


def test_upgrade_creates_the_tables_and_matches_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    assert upgrade(url) == head_revision()
    assert upgrade(url) == head_revision()  # second run is a no-op
    engine = make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"studies", "series", "instances", "associations", "instance_replacements"} <= tables
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert diff == [], f"models and migrations differ: {diff}"
        with engine.connect() as connection:
            mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
        assert mode == "wal"
    finally:
        engine.dispose()
    assert current_revision(url) == head_revision()
