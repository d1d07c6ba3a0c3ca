"""The effective peer directory: the configuration file's ``[[peers]]`` with the database overlay on top.

Peers added, edited or removed from the CLI or the web are stored in ``peer_overrides`` (storage/peers.py),
not written back into the TOML file: every role on every machine reads the same database, so a change
applies to the next association everywhere without a restart, and the admin's file (and its comments) is
never rewritten. A removed row hides the file's peer of that name; any other row replaces it.

The receiver and the sender ask :meth:`PeerDirectory.effective_peers` for each new association; the answer
is cached for ``cache_seconds`` (2 s) so a busy receiver does not query the database per request.
Associations already open are never touched: their peer was checked when they were requested.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Literal

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from node.settings import PeerSettings, Settings
from storage.db import Database
from storage.peers import PeerOverrides

log = logging.getLogger("msknode.peers")

PeerSource = Literal["config", "database"]


class PeerError(ValueError):
    """A peer change that cannot be made; the message names the field (``ae_title: …``)."""


class PeerView(PeerSettings):
    """A peer as the directory sees it, with where its current definition comes from."""

    source: PeerSource = "config"


def peer_from_fields(fields: dict[str, object]) -> PeerSettings:
    """Validate raw fields (from the CLI or a web form) into a PeerSettings; errors name the field."""
    try:
        return PeerSettings(**fields)
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            where = ".".join(str(part) for part in item["loc"]) or "peer"
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = "unknown field"
            problems.append(f"{where}: {message}")
        raise PeerError("; ".join(problems)) from None


class PeerDirectory:
    """Read and change the effective peers. Shared by the receiver, the sender, the worker, the CLI and the web."""

    def __init__(self, settings: Settings, database: Database, cache_seconds: float = 2.0) -> None:
        self.settings = settings
        self.overrides = PeerOverrides(database)
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: list[PeerView] | None = None
        self._cached_at = 0.0
        self._unresolved: set[tuple[str, str]] = set()

    # -- reading -----------------------------------------------------------------------------
    def list(self) -> list[PeerView]:
        """The effective peers, straight from the database (no cache), file order then added ones by name."""
        rows = {row["name"]: row for row in self.overrides.list()}
        views: list[PeerView] = []
        for peer in self.settings.peers:
            row = rows.pop(peer.name, None)
            if row is None:
                views.append(self._view(peer, "config"))
            elif not row["removed"] and row["settings"]:
                view = self._from_row(row)
                if view is not None:
                    views.append(view)
        for row in rows.values():
            if not row["removed"] and row["settings"]:
                view = self._from_row(row)
                if view is not None:
                    views.append(view)
        return views

    def effective_peers(self) -> list[PeerView]:
        """:meth:`list`, cached for ``cache_seconds``; if the database is down, the last good list stays."""
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached_at < self.cache_seconds:
                return self._cached
            try:
                self._cached = self.list()
            except SQLAlchemyError:
                log.warning("cannot read the peer overlay; using the last known peers")
                if self._cached is None:
                    self._cached = [self._view(peer, "config") for peer in self.settings.peers]
            self._cached_at = time.monotonic()
            return self._cached

    def get(self, name: str) -> PeerSettings | None:
        for peer in self.list():
            if peer.name == name:
                return peer
        return None

    def by_ae_title(self, ae_title: str | None) -> PeerSettings | None:
        if ae_title is None:
            return None
        for peer in self.effective_peers():
            if peer.ae_title == ae_title.strip():
                return peer
        return None

    # -- changing ----------------------------------------------------------------------------
    def add(self, peer: PeerSettings, actor: str) -> PeerView:
        """Add a new peer; refused if the name or AE title is taken or the host does not resolve."""
        if self.get(peer.name) is not None:
            raise PeerError(f"name: a peer named {peer.name!r} already exists")
        return self._save(peer, actor)

    def update(self, name: str, peer: PeerSettings, actor: str) -> PeerView:
        """Replace the definition of peer ``name`` (the new definition must keep the name)."""
        if self.get(name) is None:
            raise PeerError(f"name: no peer named {name!r}")
        if peer.name != name:
            raise PeerError(f"name: cannot rename {name!r} to {peer.name!r}; remove it and add a new peer")
        return self._save(peer, actor)

    def remove(self, name: str, actor: str) -> None:
        if self.get(name) is None:
            raise PeerError(f"name: no peer named {name!r}")
        self.overrides.mark_removed(name, actor)
        self._invalidate()
        log.info("peer %s removed by %s", name, actor)

    def _save(self, peer: PeerSettings, actor: str) -> PeerView:
        peer = peer_from_fields(peer.model_dump(exclude={"source"}))  # a copy, validated again
        for other in self.list():
            if other.name != peer.name and other.ae_title == peer.ae_title:
                raise PeerError(f"ae_title: {peer.ae_title!r} is already used by peer {other.name!r}")
        try:
            peer.resolve()
        except ValueError as exc:
            raise PeerError(f"host: {exc}") from None
        self.overrides.upsert(peer.name, peer.model_dump(mode="json"), actor)
        self._invalidate()
        log.info("peer %s (%s@%s:%d) saved by %s", peer.name, peer.ae_title, peer.host, peer.port, actor)
        return self._view(peer, "database")

    def _invalidate(self) -> None:
        with self._lock:
            self._cached = None

    # -- helpers -----------------------------------------------------------------------------
    def _view(self, peer: PeerSettings, source: PeerSource) -> PeerView:
        view = PeerView(**peer.model_dump(exclude={"source"}), source=source)
        if peer.addresses:
            view._addresses = peer.addresses
        else:
            try:
                view.resolve()
            except ValueError:
                if (peer.name, peer.host) not in self._unresolved:  # once, not at every refresh
                    self._unresolved.add((peer.name, peer.host))
                    log.warning("peer %s: host %s does not resolve; its associations will be rejected",
                                peer.name, peer.host)
        return view

    def _from_row(self, row: dict[str, object]) -> PeerView | None:
        try:
            peer = PeerSettings(**row["settings"])  # type: ignore[arg-type]
        except ValidationError as exc:
            log.error("peer override %s is invalid and ignored: %s", row["name"], exc.errors()[0]["msg"])
            return None
        return self._view(peer, "database")
