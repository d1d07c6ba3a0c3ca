"""node.dicom.pynetdicom_patches, event-driven reactors: accepted associations wait for work instead of polling,
and behave as pynetdicom's own.

An in-process Storage SCP with the receiver's EVT_CONN_OPEN switch, driven by a pynetdicom SCU.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

import node.dicom.pynetdicom_patches
from node.dicom.pynetdicom_patches import BulkReadSocket, QuietAssociation, QuietDUL, make_quiet
from tests.helpers.components import run_threads


class Scp:
    def __init__(self, network_timeout: float = 30) -> None:
        self.stored: list[str] = []
        self.pixel_digests: list[str] = []
        self.events: list[str] = []
        self.associations: list[object] = []
        ae = AE(ae_title="QUIET")
        ae.network_timeout = network_timeout
        ae.maximum_pdu_size = 0  # as the receiver: the sender may put a whole instance in one PDU
        ae.add_supported_context(Verification)
        ae.add_supported_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_RELEASED, lambda event: self.events.append("released")),
            (evt.EVT_ABORTED, lambda event: self.events.append("aborted")),
        ]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _on_open(self, event: evt.Event) -> None:
        make_quiet(event.assoc)
        self.associations.append(event.assoc)

    def _on_store(self, event: evt.Event) -> int:
        dataset = event.dataset
        self.stored.append(dataset.SOPInstanceUID)
        if "PixelData" in dataset:
            self.pixel_digests.append(hashlib.sha256(dataset.PixelData).hexdigest())
        return 0x0000


@pytest.fixture
def scp() -> Iterator[Scp]:
    server = Scp()
    yield server
    server.server.shutdown()


def scu_association(port: int):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="QUIET")
    assert assoc.is_established
    return assoc


def instance() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.PatientName = "Quiet^Test"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def wait_until(condition, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_stores_echoes_and_release_as_pynetdicom(scp: Scp) -> None:
    assoc = scu_association(scp.port)
    assert isinstance(scp.associations[0], QuietAssociation)
    assert isinstance(scp.associations[0].dul, QuietDUL)  # type: ignore[attr-defined]
    datasets = [instance() for _ in range(20)]
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0x0000
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released
    wait_until(lambda: scp.events == ["released"])
    assert scp.stored == [ds.SOPInstanceUID for ds in datasets]
    wait_until(lambda: not scp.associations[0].is_alive())  # type: ignore[attr-defined]
    wait_until(lambda: not scp.associations[0].dul.is_alive())  # type: ignore[attr-defined]


def test_peer_abort_ends_the_association(scp: Scp) -> None:
    assoc = scu_association(scp.port)
    assert assoc.send_c_store(instance()).Status == 0x0000
    assoc.abort()
    wait_until(lambda: scp.events == ["aborted"])
    wait_until(lambda: not scp.associations[0].is_alive())  # type: ignore[attr-defined]


def test_an_idle_association_does_not_poll(scp: Scp, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's reactors go round every millisecond: ~1000 rounds a second per thread when idle."""
    rounds = {"dul": 0, "association": 0}
    dul_wait, assoc_check = QuietDUL._wait_for_work, QuietAssociation._finished_by_peer_or_timer

    def counted_wait(self: QuietDUL) -> None:
        rounds["dul"] += 1
        dul_wait(self)

    def counted_check(self: QuietAssociation) -> bool:
        rounds["association"] += 1
        return assoc_check(self)

    monkeypatch.setattr(QuietDUL, "_wait_for_work", counted_wait)
    monkeypatch.setattr(QuietAssociation, "_finished_by_peer_or_timer", counted_check)
    assoc = scu_association(scp.port)
    assert assoc.send_c_store(instance()).Status == 0x0000
    before = dict(rounds)
    time.sleep(1.0)
    idle = {name: rounds[name] - before[name] for name in rounds}
    assoc.release()
    # At most one round per IDLE_WAIT_SECONDS (0.05 s) plus a few wake-ups: ~20, never hundreds.
    assert idle["dul"] <= 60, idle
    assert idle["association"] <= 60, idle


def test_network_timeout_still_ends_a_silent_association() -> None:
    server = Scp(network_timeout=0.5)
    try:
        assoc = scu_association(server.port)
        wait_until(lambda: server.events == ["aborted"] and not assoc.is_established, timeout=15)
    finally:
        server.server.shutdown()


def test_make_quiet_refuses_a_running_association(scp: Scp) -> None:
    assoc = scu_association(scp.port)
    with pytest.raises(RuntimeError, match="before the association's threads start"):
        make_quiet(scp.associations[0])  # type: ignore[arg-type]
    assoc.release()


def test_many_concurrent_associations(scp: Scp) -> None:
    def send() -> None:
        assoc = scu_association(scp.port)
        for _ in range(10):
            assert assoc.send_c_store(instance()).Status == 0x0000
        assoc.release()

    run_threads([send] * 8, timeout=60)  # every thread finished, none raised
    assert len(scp.stored) == 80
    wait_until(lambda: scp.events.count("released") == 8)


def test_large_pdus_are_read_whole_and_intact(scp: Scp, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks, so one instance's PDU takes many reads and several buffer growths.
    monkeypatch.setattr(node.dicom.pynetdicom_patches, "READ_CHUNK_BYTES", 64 * 1024)
    assoc = scu_association(scp.port)
    assert isinstance(scp.associations[0].dul.socket, BulkReadSocket)  # type: ignore[attr-defined]
    sent = []
    for size in (3 * 1024 * 1024 + 6, 2, 200_000):  # even: OB values are padded to even length
        ds = instance()
        ds.PixelData = bytes((i * 7919) % 251 for i in range(size))
        ds["PixelData"].VR = "OB"
        sent.append(hashlib.sha256(ds.PixelData).hexdigest())
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert scp.pixel_digests == sent


def test_bulk_read_returns_what_arrived_when_the_peer_closes() -> None:
    ours, peer = socket.socketpair()
    reader = BulkReadSocket.__new__(BulkReadSocket)  # just the recv half, on a plain socket
    reader.socket = ours
    try:
        peer.sendall(b"0123456789")
        peer.close()
        # A PDU header may declare 4 GB; only what arrives is held (no up-front 4 GB buffer).
        assert reader.recv(0xFFFFFFFF) == bytearray(b"0123456789")
        assert reader.recv(6) == bytearray()
    finally:
        ours.close()


@pytest.mark.parametrize("what", ["close", "garbage"])
def test_a_connection_closed_before_any_request_ends_its_threads_at_once(scp: Scp, what: str) -> None:
    """A health probe's bare connect, or a port scanner's garbage then close: pynetdicom's association thread
    waited the whole ACSE timeout (30 s) for an A-ASSOCIATE-RQ that could no longer come, and held its slot
    in ``active_associations`` meanwhile. With the quiet reactors it ends as soon as the DUL sees the close."""
    scp.server.ae.acse_timeout = 30
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as sock:
            if what == "garbage":
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
    wait_until(lambda: len(scp.associations) == 20, timeout=5)
    wait_until(lambda: not scp.server.active_associations, timeout=3)
    assert not any(assoc.is_alive() or assoc.dul.is_alive() for assoc in scp.associations)  # type: ignore[attr-defined]
    assoc = scu_association(scp.port)  # and the SCP still serves
    assoc.release()
