"""Apply Alembic migrations programmatically (at start and by ``msknode db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from storage.db import make_engine

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> str:
    """Upgrade the database to ``revision``; returns the revision now current."""
    config = alembic_config(database_url)
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
        return current_revision(database_url) or ""
    finally:
        engine.dispose()


def current_revision(database_url: str) -> str | None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head()
    assert head is not None
    return head


class DatabaseNotReady(Exception):
    """A database a read-only command cannot use as it is: missing, not msknode's, or at another revision."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing  # no database file at all


def describe(database_url: str) -> str:
    """The database as an admin names it: the SQLite file's path, or the URL without its password."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return str(Path(url.database or ":memory:").absolute()) if url.database not in (None, "", ":memory:") \
            else ":memory:"
    return url.render_as_string(hide_password=True)


def require_current(database_url: str) -> str:
    """Check, never create nor migrate, that the database exists at the newest revision; returns it.

    For read-only commands (``msknode status``, ``studies``, ``peers list`` ...): pointed at a wrong path they
    would otherwise create an empty database and report "nothing", and run against an older node's database
    they would migrate it under that node. Raises :class:`DatabaseNotReady` naming the database and what to
    do; a server that cannot be reached raises SQLAlchemy's error as before.
    """
    where = describe(database_url)
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and (url.database in (None, "", ":memory:")
                                               or not Path(url.database).is_file()):
        raise DatabaseNotReady(f"no database at {where}: check storage.database_url in the configuration; "
                               "to create one on purpose run `msknode db upgrade` (the node does at start)", missing=True)
    revision = current_revision(database_url)
    head = head_revision()
    if revision is None:
        raise DatabaseNotReady(f"{where} holds no msknode database (no schema revision); "
                               "to create one on purpose run `msknode db upgrade`")
    if revision != head:
        raise DatabaseNotReady(f"the database at {where} is at revision {revision}, this msknode reads {head}: "
                               "run `msknode db upgrade` (or start the node) first")
    return revision

