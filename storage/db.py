"""Database engine and sessions: SQLite in WAL mode by default, PostgreSQL through ``database_url``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def utcnow() -> datetime:
    """Timezone-aware now; every timestamp the node stores is UTC."""
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes for what was stored as UTC; make them aware again."""
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _configure_sqlite(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # WAL lets readers (CLI, web) work while the receiver writes; FULL sync makes a commit durable
    # before the receiver answers success; busy_timeout lets concurrent association threads queue.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _create_private(path: Path) -> None:
    """Create an absent SQLite file as 0600 before SQLite opens it.

    SQLite creates a new database with the umask's mode (usually 0644) and gives its -wal and -shm files the
    database file's mode, so creating it 0600 first keeps the index (accession numbers, UIDs) private.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def make_engine(database_url: str) -> Engine:
    """Create an engine; a SQLite file's directory is created (0700) if missing."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _create_private(Path(url.database))
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    if url.get_backend_name() == "postgresql" and url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Database:
    """An engine plus a session factory; one per process."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.engine = make_engine(database_url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def locked_session(self) -> Iterator[Session]:
        """A session for a check-then-write that must see the latest committed rows and hold them until commit.

        On SQLite it starts with ``BEGIN IMMEDIATE``: the database's write lock is taken before the first read, so
        no other process can commit between this transaction's checks and its writes (a deferred transaction
        would read an older snapshot first). On PostgreSQL it is an ordinary session: the caller locks the rows
        its decision rests on with ``SELECT ... FOR UPDATE``.
        """
        with self.session() as session:
            if self.engine.dialect.name == "sqlite":
                session.connection().exec_driver_sql("BEGIN IMMEDIATE")
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
