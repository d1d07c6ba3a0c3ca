"""The effective peer directory: the configuration file's ``[[peers]]`` with the database overlay on top.

Peers added, edited or removed from the CLI or the web are stored in ``peer_overrides`` (storage/peers.py),
not written back into the TOML file: every role on every machine reads the same database, so a change
applies to the next association everywhere without a restart, and the admin's file (and its comments) is
never rewritten. A removed row hides the file's peer of that name; any other row replaces it.

The receiver and the sender ask :meth:`PeerDirectory.effective_peers` for each new association; the answer
is cached for ``cache_seconds`` (2 s) so a busy receiver does not query the database per request.
Associations already open are never touched: their peer was checked when they were requested.

Host names are never looked up on the association-request path. The receiver runs the directory in the
background (:meth:`PeerDirectory.start`): a thread re-reads the overlay every ``cache_seconds``, resolves a
new or changed host as soon as it appears, and re-resolves every host name every ``[node]
dns_refresh_seconds`` (60 s), so a peer whose DNS entry moves is recognised at its new address without a
restart; ``effective_peers`` then only returns the last snapshot. A host that stops resolving keeps its last
known addresses (a DNS outage never locks out a PACS), with a warning.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
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


def lookup_host(host: str) -> frozenset[str]:
    """The addresses of ``host`` (an IP literal needs no DNS); ``ValueError`` when it does not resolve."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"host {host!r} does not resolve: {getattr(exc, 'strerror', None) or exc}") from exc
    return frozenset(str(info[4][0]) for info in infos)


class HostResolver:
    """Host name -> addresses, remembered; a failed refresh keeps the last known addresses."""

    def __init__(self, lookup: Callable[[str], frozenset[str]] = lookup_host) -> None:
        self._lookup = lookup
        self._known: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()

    def cached(self, host: str) -> frozenset[str] | None:
        with self._lock:
            return self._known.get(host)

    def remember(self, host: str, addresses: frozenset[str]) -> None:
        with self._lock:
            self._known.setdefault(host, addresses)

    def resolve(self, host: str) -> frozenset[str]:
        """Look ``host`` up now; on failure keep (and return) what was known, else raise ``ValueError``."""
        try:
            addresses = self._lookup(host)
        except ValueError:
            known = self.cached(host)
            if known:
                log.warning("host %s does not resolve now; keeping its last known addresses %s", host,
                            ", ".join(sorted(known)))
                return known
            raise
        with self._lock:
            previous = self._known.get(host)
            self._known[host] = addresses
        if previous is not None and previous != addresses:
            log.info("host %s now resolves to %s (was %s)", host, ", ".join(sorted(addresses)),
                     ", ".join(sorted(previous)))
        return addresses


class PeerDirectory:
    """Read and change the effective peers. Shared by the receiver, the sender, the worker, the CLI and the web."""

    def __init__(self, settings: Settings, database: Database, cache_seconds: float = 2.0,
                 dns_refresh_seconds: float | None = None, resolver: HostResolver | None = None) -> None:
        self.settings = settings
        self.overrides = PeerOverrides(database)
        self.cache_seconds = cache_seconds
        self.dns_refresh_seconds = (dns_refresh_seconds if dns_refresh_seconds is not None
                                    else getattr(settings.node, "dns_refresh_seconds", 60.0))
        self.resolver = resolver or HostResolver()
        self._lock = threading.Lock()
        self._cached: list[PeerView] | None = None
        self._cached_at = 0.0
        self._unresolved: set[tuple[str, str]] = set()
        self._background: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()

    # -- background refresh (the receiver) ---------------------------------------------------
    def start(self) -> PeerDirectory:
        """Resolve every peer now, then keep the snapshot fresh in a thread: ``effective_peers`` never blocks."""
        if self._background is not None:
            return self
        snapshot = self._load_snapshot()
        with self._lock:
            self._cached, self._cached_at = snapshot, time.monotonic()
        self._stop.clear()
        self._background = threading.Thread(target=self._refresh_loop, name="msknode-peers", daemon=True)
        self._background.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._background is not None:
            self._background.join(10)
            self._background = None

    def _refresh_loop(self) -> None:
        next_dns = time.monotonic() + self.dns_refresh_seconds
        while not self._stop.is_set():
            self._wake.wait(self.cache_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if time.monotonic() >= next_dns:
                    next_dns = time.monotonic() + self.dns_refresh_seconds
                    for host in {peer.host for peer in (self._cached or [])}:
                        try:
                            self.resolver.resolve(host)
                        except ValueError:
                            pass  # still unknown: _view warns once
                snapshot = self._load_snapshot()
            except Exception:  # noqa: BLE001 - the last snapshot stays; try again next round
                log.exception("refreshing the peer directory failed; using the last known peers")
                continue
            with self._lock:
                self._cached, self._cached_at = snapshot, time.monotonic()

    def _load_snapshot(self) -> list[PeerView]:
        try:
            return self.list()
        except SQLAlchemyError:
            log.warning("cannot read the peer overlay; using the last known peers")
            if self._cached is not None:
                return self._cached
            return [self._view(peer, "config") for peer in self.settings.peers]

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
        """:meth:`list`, cached for ``cache_seconds``; if the database is down, the last good list stays.

        Once :meth:`start` ran, the snapshot its thread keeps: no database query, no DNS look-up here."""
        if self._background is not None:
            with self._lock:
                if self._cached is not None:
                    return self._cached
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
        if self._background is not None:
            self._wake.set()  # the thread reloads now; the old snapshot serves until then
            return
        with self._lock:
            self._cached = None

    # -- helpers -----------------------------------------------------------------------------
    def _view(self, peer: PeerSettings, source: PeerSource) -> PeerView:
        view = PeerView(**peer.model_dump(exclude={"source"}), source=source)
        if peer.addresses:  # resolved when the file was loaded: a first answer, refreshed in the background
            self.resolver.remember(peer.host, peer.addresses)
        addresses = self.resolver.cached(peer.host)
        if addresses is None:  # a new host: looked up once here (the refresh thread, the CLI or the web)
            try:
                addresses = self.resolver.resolve(peer.host)
            except ValueError:
                addresses = frozenset()
                if (peer.name, peer.host) not in self._unresolved:  # once, not at every refresh
                    self._unresolved.add((peer.name, peer.host))
                    log.warning("peer %s: host %s does not resolve; its associations will be rejected",
                                peer.name, peer.host)
        view._addresses = addresses
        return view

    def _from_row(self, row: dict[str, object]) -> PeerView | None:
        try:
            peer = PeerSettings(**row["settings"])  # type: ignore[arg-type]
        except ValidationError as exc:
            log.error("peer override %s is invalid and ignored: %s", row["name"], exc.errors()[0]["msg"])
            return None
        return self._view(peer, "database")
