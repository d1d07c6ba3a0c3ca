"""Read-only commands never create or migrate a database (issue #14, item 10).

An admin who points ``msknode status`` at the wrong config (a typo in the path, a new machine) must get a
clear error naming the database, not a fresh empty database that says "0 studies"; and a look at an older
node's database must not migrate it under the running node.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from storage.migrate import current_revision, head_revision, upgrade
from tests.cli.test_admin_commands import cli_in_process

READ_ONLY = [("status",), ("studies",), ("peers", "list"), ("queue", "list"), ("users", "list")]


def config_for(tmp_path: Path, database: Path) -> Path:
    config = tmp_path / "msknode.toml"
    config.write_text(f'[storage]\ndatabase_url = "sqlite:///{database}"\nspool_dir = "{tmp_path / "spool"}"\n')
    return config


@pytest.mark.parametrize("args", READ_ONLY, ids=" ".join)
def test_a_missing_database_is_a_clear_error_naming_the_path(tmp_path: Path, args: tuple[str, ...]) -> None:
    database = tmp_path / "typo" / "msknode.db"
    result = cli_in_process(*args, config=config_for(tmp_path, database))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no database" in result.stderr and str(database) in result.stderr.replace("\n", "")
    assert "msknode db upgrade" in result.stderr  # and how to create one on purpose
    assert not database.exists() and not database.parent.exists()


def test_echo_before_the_node_ever_started_uses_the_file_peers_and_creates_nothing(tmp_path: Path) -> None:
    database = tmp_path / "typo" / "msknode.db"
    result = cli_in_process("echo", "nobody", config=config_for(tmp_path, database))
    message = result.stderr.replace("\n", "")
    assert result.returncode == 2 and "no peer named 'nobody'" in message
    assert "no database" in message and str(database) in message and "configuration file's peers" in message
    assert not database.parent.exists()


@pytest.mark.parametrize("args", [*READ_ONLY, ("echo", "nobody")], ids=" ".join)
def test_an_older_database_is_not_migrated(tmp_path: Path, args: tuple[str, ...]) -> None:
    database = tmp_path / "msknode.db"
    url = f"sqlite:///{database}"
    upgrade(url, "0001")
    result = cli_in_process(*args, config=config_for(tmp_path, database))
    assert current_revision(url) == "0001"
    assert result.returncode == 1 and "msknode db upgrade" in result.stderr.replace("\n", " ")
    assert "0001" in result.stderr and head_revision() in result.stderr


def test_a_current_database_is_read(tmp_path: Path) -> None:
    database = tmp_path / "msknode.db"
    upgrade(f"sqlite:///{database}")
    tables = set(inspect(create_engine(f"sqlite:///{database}")).get_table_names())
    result = cli_in_process("studies", "--json", config=config_for(tmp_path, database))
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
    assert set(inspect(create_engine(f"sqlite:///{database}")).get_table_names()) == tables


def test_db_upgrade_still_creates_one_on_purpose(tmp_path: Path) -> None:
    database = tmp_path / "new" / "msknode.db"
    database.parent.mkdir()
    result = cli_in_process("db", "upgrade", config=config_for(tmp_path, database))
    assert result.returncode == 0 and database.exists()
