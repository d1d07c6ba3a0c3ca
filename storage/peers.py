"""The peer overlay: peers added, edited or removed from the CLI or the web, kept in the database.

The configuration file's ``[[peers]]`` stay the base; a row here replaces the file's peer of the same
name (``settings`` is a full PeerSettings dump) or hides it (``removed``). Kept in the database rather than
by rewriting the file so that every role on every machine sees one list without a restart. Rows are handed
out as plain dicts: validating them is node/peers.py's job (storage must not import node/).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from storage.db import Database, utcnow
from storage.models import PeerOverride


def _as_dict(row: PeerOverride) -> dict[str, Any]:
    return {
        "name": row.name,
        "removed": bool(row.removed),
        "settings": dict(row.settings) if row.settings else None,
        "updated_at": row.updated_at,
        "updated_by": row.updated_by,
    }


class PeerOverrides:
    def __init__(self, database: Database) -> None:
        self.db = database

    def list(self) -> list[dict[str, Any]]:
        """Every override row, by name."""
        with self.db.session() as session:
            return [_as_dict(row) for row in session.scalars(select(PeerOverride).order_by(PeerOverride.name))]

    def get(self, name: str) -> dict[str, Any] | None:
        with self.db.session() as session:
            row = session.get(PeerOverride, name)
            return None if row is None else _as_dict(row)

    def upsert(self, name: str, settings: dict[str, Any], actor: str) -> None:
        """Add or replace the peer ``name`` (``settings`` is its full definition)."""
        self._write(name, False, settings, actor)

    def mark_removed(self, name: str, actor: str) -> None:
        """Hide the peer ``name``, whether it comes from the file or from an earlier upsert."""
        self._write(name, True, None, actor)

    def forget(self, name: str) -> bool:
        """Delete the override row, so the file's definition (if any) applies again."""
        with self.db.session() as session:
            row = session.get(PeerOverride, name)
            if row is None:
                return False
            session.delete(row)
            return True

    def _write(self, name: str, removed: bool, settings: dict[str, Any] | None, actor: str) -> None:
        with self.db.session() as session:
            row = session.get(PeerOverride, name)
            if row is None:
                row = PeerOverride(name=name)
                session.add(row)
            row.removed = removed
            row.settings = settings
            row.updated_at = utcnow()
            row.updated_by = actor[:64]
