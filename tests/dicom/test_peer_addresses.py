"""Peers' host names: never looked up on the association-request path, and a changed address is picked up
without a restart (issue #14, item 7). A real in-process receiver, a pynetdicom SCU bound to 127.0.0.1 or
127.0.0.2, and a stand-in DNS (``socket.getaddrinfo`` for ``*.test`` names) that records which thread asks.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.peers import HostResolver, PeerDirectory
from node.settings import PeerSettings
from tests.helpers.node import NODE_AE, wait_for


class FakeDns:
    """``*.test`` names answer from ``records``; every look-up is logged with its thread's name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, records: dict[str, str]) -> None:
        self.records = dict(records)
        self.lookups: list[tuple[str, str]] = []
        self.down = False
        real = socket.getaddrinfo

        def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
            if not isinstance(host, str) or not host.endswith(".test"):
                return real(host, *args, **kwargs)
            self.lookups.append((threading.current_thread().name, host))
            if self.down or host not in self.records:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (self.records[host], 0))]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


class Outcome:
    def __init__(self, is_established: bool, is_rejected: bool) -> None:
        self.is_established, self.is_rejected = is_established, is_rejected


def associate(port: int, calling: str, source: str) -> Outcome:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, bind_address=(source, 0))
    outcome = Outcome(assoc.is_established, assoc.is_rejected)
    if assoc.is_established:
        assoc.release()
    return outcome


def reasons(node, calling: str) -> list[str | None]:  # type: ignore[no-untyped-def]
    return [row.reject_reason for row in node.associations() if row.calling_ae_title == calling]


def test_no_dns_on_the_request_path_and_a_moved_peer_is_followed(in_process_node, monkeypatch) -> None:
    dns = FakeDns(monkeypatch, {"pacs.example.test": "127.0.0.1", "ward.example.test": "127.0.0.1"})
    node = in_process_node(peers=[{"name": "pacs", "ae_title": "PACS", "host": "pacs.example.test"}])
    directory: PeerDirectory = node.runtime.peers
    # A peer added at run time (CLI / web): stored in the database overlay, by host name.
    directory.add(PeerSettings(name="ward", ae_title="WARD", host="ward.example.test"), actor="test")
    directory.cache_seconds, directory.dns_refresh_seconds = 0.1, 0.3
    directory.start()
    try:
        dns.lookups.clear()
        for _ in range(3):  # across several peer-cache refreshes
            assert associate(node.port, "PACS", "127.0.0.1").is_established
            assert associate(node.port, "WARD", "127.0.0.1").is_established
            time.sleep(0.3)
        asked_by = {thread for thread, _host in dns.lookups}
        assert asked_by <= {"msknode-peers"}, f"DNS asked on the request path by {asked_by}"

        # The PACS moves to 127.0.0.2 (its DNS entry changes): followed without a restart.
        dns.records["pacs.example.test"] = "127.0.0.2"
        wait_for(lambda: directory.by_ae_title("PACS").addresses == {"127.0.0.2"}, 5, "the new address", 0.1)
        assert associate(node.port, "PACS", "127.0.0.2").is_established
        assert associate(node.port, "PACS", "127.0.0.1").is_rejected
        assert reasons(node, "PACS")[-1] == "calling-host-not-recognised"

        # A DNS outage keeps the last known addresses: the PACS is not locked out.
        dns.down = True
        time.sleep(0.8)
        assert associate(node.port, "PACS", "127.0.0.2").is_established
        assert {thread for thread, _host in dns.lookups} <= {"msknode-peers"}
    finally:
        directory.stop()


def test_a_peer_changed_in_the_overlay_applies_at_once(in_process_node, monkeypatch) -> None:
    dns = FakeDns(monkeypatch, {"ct.example.test": "127.0.0.1", "ct2.example.test": "127.0.0.2"})
    node = in_process_node()
    directory: PeerDirectory = node.runtime.peers
    directory.cache_seconds = 0.1
    directory.start()
    try:
        directory.add(PeerSettings(name="ct", ae_title="CT1", host="ct.example.test"), actor="test")
        wait_for(lambda: directory.by_ae_title("CT1") is not None, 5, "the new peer", 0.1)
        assert associate(node.port, "CT1", "127.0.0.1").is_established
        directory.update("ct", PeerSettings(name="ct", ae_title="CT1", host="ct2.example.test"), actor="test")
        wait_for(lambda: directory.by_ae_title("CT1").host == "ct2.example.test", 5, "the changed peer", 0.1)
        assert associate(node.port, "CT1", "127.0.0.2").is_established
        assert associate(node.port, "CT1", "127.0.0.1").is_rejected
        assert {thread for thread, _host in dns.lookups} <= {"MainThread", "msknode-peers"}
    finally:
        directory.stop()


def test_host_resolver_keeps_the_last_known_addresses_through_an_outage(monkeypatch) -> None:
    dns = FakeDns(monkeypatch, {"pacs.example.test": "10.1.1.1"})
    resolver = HostResolver()
    assert resolver.resolve("pacs.example.test") == {"10.1.1.1"}
    dns.down = True
    assert resolver.resolve("pacs.example.test") == {"10.1.1.1"}
    with pytest.raises(ValueError, match="does not resolve"):
        resolver.resolve("other.example.test")
    assert resolver.resolve("192.0.2.7") == {"192.0.2.7"}  # an IP literal needs no DNS
    assert [host for _thread, host in dns.lookups] == ["pacs.example.test"] * 2 + ["other.example.test"]
