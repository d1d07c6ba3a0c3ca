"""Senders that misbehave on the wire, from raw sockets: the node frees what they held and keeps serving.

Each case ends with the same checks: no partial file in ``spool/.incoming``, nothing indexed for the broken
transfer, the association's audit row closed, the node's thread count back to where it started, and a
well-behaved peer still served. The node runs with a 2 s network timeout so a stalled peer is dropped quickly.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode

from tests.helpers.dicomdata import small_instance
from tests.helpers.node import NODE_AE, NodeConfig, NodeProcess
from tests.dicom.test_association_policy import associate_rq, c_store_rq, p_data, read_until_closed

NETWORK_TIMEOUT = 2.0
A_ABORT = struct.pack(">BBI", 0x07, 0, 4) + bytes(4)
IDLE_THREADS: dict[int, int] = {}  # node pid -> thread count when idle


class ShortTimeoutConfig(NodeConfig):
    """The node's config with short DIMSE/network timeouts (NodeConfig fixes them at 30 s)."""

    def write(self) -> Path:
        path = super().write()
        text = path.read_text()
        text = text.replace("dimse_timeout_seconds = 30", f"dimse_timeout_seconds = {NETWORK_TIMEOUT}")
        text = text.replace("network_timeout_seconds = 30", f"network_timeout_seconds = {NETWORK_TIMEOUT}")
        path.write_text(text)
        return path


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    config = ShortTimeoutConfig(directory=tmp_path_factory.mktemp("misbehaving"), acse_timeout_seconds=NETWORK_TIMEOUT)
    node = NodeProcess(config).start()
    store_ok(node, seed=0)  # warm up: pynetdicom's lazily started threads count in the baseline
    node.wait_for_associations_closed()
    time.sleep(1.0)  # let the warm-up association's threads end before counting
    IDLE_THREADS[node.pid] = thread_count(node)
    yield node
    node.stop()


def thread_count(node: NodeProcess) -> int:
    return len(list(Path(f"/proc/{node.pid}/task").iterdir()))


def wait_until(condition, timeout: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``condition`` until it holds or ``timeout`` passes; returns its last value (no timing asserted)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return bool(result)


def store_ok(node: NodeProcess, seed: int) -> str:
    """A well-behaved peer stores one instance; returns its SOP Instance UID."""
    ds = small_instance(seed=seed)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(ds.SOPClassUID, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    return str(ds.SOPInstanceUID)


def open_raw_association(node: NodeProcess, sop_class: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    sock.sendall(associate_rq("PYSCU", NODE_AE, sop_class, ImplicitVRLittleEndian))
    header = sock.recv(6)
    assert header[:1] == b"\x02", "expected an A-ASSOCIATE-AC"
    (length,) = struct.unpack(">I", header[2:6])
    while length:
        length -= len(sock.recv(length))
    return sock


def partial_dataset_pdu(payload: bytes) -> bytes:
    """A P-DATA-TF whose single data PDV is *not* the last fragment (more of the dataset would follow)."""
    pdv = struct.pack(">IBB", len(payload) + 2, 1, 0x00) + payload
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


@pytest.fixture
def baseline(node: NodeProcess) -> Iterator[int]:
    """The idle node's thread count; after the test, threads, files and audit rows must be back to idle."""
    before = IDLE_THREADS[node.pid]
    yield before
    assert wait_until(lambda: thread_count(node) <= before), f"threads: {thread_count(node)} > {before}"
    assert node.incoming_files() == [], "a partial file was left in spool/.incoming"
    assert wait_until(lambda: all(row.outcome != "open" for row in node.associations())), "an audit row stayed open"


def test_abort_in_the_middle_of_a_dataset_leaves_nothing(node: NodeProcess, baseline: int) -> None:
    ds = small_instance(seed=1, rows=256, columns=256)
    body = encode(ds, True, True)
    with open_raw_association(node, ds.SOPClassUID) as sock:
        sock.sendall(p_data(1, True, c_store_rq(ds.SOPClassUID, ds.SOPInstanceUID)))
        sock.sendall(partial_dataset_pdu(body[: len(body) // 2]))
        sock.sendall(A_ABORT)
    assert wait_until(lambda: [r.outcome for r in node.associations()][-1] == "aborted")
    assert ds.SOPInstanceUID not in {row.sop_instance_uid for row in node.instances()}
    assert node.incoming_files() == []
    store_ok(node, seed=2)


def test_a_peer_stalled_mid_pdu_is_dropped_and_others_are_served(node: NodeProcess, baseline: int) -> None:
    ds = small_instance(seed=3, rows=256, columns=256)
    body = encode(ds, True, True)
    with open_raw_association(node, ds.SOPClassUID) as sock:
        sock.sendall(p_data(1, True, c_store_rq(ds.SOPClassUID, ds.SOPInstanceUID)))
        pdv = struct.pack(">IBB", len(body) + 2, 1, 0x02)
        whole = struct.pack(">BBI", 0x04, 0, len(pdv) + len(body)) + pdv + body
        sock.sendall(whole[: len(whole) // 3])  # ... and then nothing more
        other = store_ok(node, seed=4)  # another peer is served while this one stalls
        assert other in {row.sop_instance_uid for row in node.instances()}
        _, closed = read_until_closed(sock, timeout=NETWORK_TIMEOUT * 10)
    assert closed, "the node kept a stalled peer's connection open past its network timeout"
    assert ds.SOPInstanceUID not in {row.sop_instance_uid for row in node.instances()}


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\nHost: msknode\r\n\r\n", bytes(range(256)) * 4, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
    ids=["http", "binary", "tls-client-hello"],
)
def test_garbage_instead_of_a_pdu_is_closed(node: NodeProcess, baseline: int, garbage: bytes) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        try:
            sock.sendall(garbage)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received, closed = read_until_closed(sock, timeout=NETWORK_TIMEOUT * 10)
    assert closed
    assert received[:1] in (b"", b"\x07"), "only an A-ABORT (or a plain close) answers garbage"
    store_ok(node, seed=5)


def test_garbage_after_the_association_is_accepted(node: NodeProcess, baseline: int) -> None:
    ds = small_instance(seed=6)
    with open_raw_association(node, ds.SOPClassUID) as sock:
        try:
            sock.sendall(b"\xff\x00\x00\x00\x00\x10" + bytes(16))  # unknown PDU type
        except (BrokenPipeError, ConnectionResetError):
            pass
        received, closed = read_until_closed(sock, timeout=NETWORK_TIMEOUT * 10)
    assert closed
    assert received[:1] in (b"", b"\x07")
    assert wait_until(lambda: [r.outcome for r in node.associations()][-1] == "aborted")


def test_huge_declared_pdu_length_then_close(node: NodeProcess, baseline: int) -> None:
    ds = small_instance(seed=7)
    with open_raw_association(node, ds.SOPClassUID) as sock:
        sock.sendall(p_data(1, True, c_store_rq(ds.SOPClassUID, ds.SOPInstanceUID)))
        sock.sendall(struct.pack(">BBI", 0x04, 0, 0xFFFFFFF0) + struct.pack(">IBB", 0xFFFFFFEC, 1, 0x02) + bytes(64))
    assert wait_until(lambda: [r.outcome for r in node.associations()][-1] == "aborted")
    assert ds.SOPInstanceUID not in {row.sop_instance_uid for row in node.instances()}
    store_ok(node, seed=8)


# -- destinations that misbehave: slow or silent, several at once ---------------------------------------------
class CountingListener:
    """A destination that accepts TCP connections and never answers (a hung PACS), counting connections.

    ``peak`` is the most connections open at once: the sender's bound on associations per destination.
    """

    def __init__(self) -> None:
        import threading

        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.total = 0
        self.open = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        import threading

        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:
                continue
            with self._lock:
                self.total += 1
                self.open += 1
                self.peak = max(self.peak, self.open)
            threading.Thread(target=self._drain, args=(connection,), daemon=True).start()

    def _drain(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(30)
            try:
                while connection.recv(65536):
                    pass  # read the request, answer nothing
            except OSError:
                pass
        with self._lock:
            self.open -= 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()


def test_silent_destinations_get_one_association_each_and_back_off(tmp_path: Path) -> None:
    """3 hung destinations x 12 results: one association per destination per round (never one per item),
    every item back to pending with its attempt counted, and an immediate second round opens nothing."""
    from datetime import datetime, timezone

    from node.delivery.sender import Sender
    from node.settings import PeerSettings, SenderSettings
    from storage.db import Database
    from storage.migrate import upgrade
    from storage.models import Job, OutboxItem, Study
    from storage.outbox import Outbox
    from storage.spool import Spool

    url = f"sqlite:///{tmp_path / 'sender.db'}"
    upgrade(url)
    database = Database(url)
    spool = Spool(tmp_path / "spool", fsync=False)
    listeners = [CountingListener() for _ in range(3)]
    try:
        peers = [PeerSettings(name=f"pacs{i}", ae_title=f"PACS{i}", host="127.0.0.1", port=listener.port,
                              receives_results=True) for i, listener in enumerate(listeners)]
        now = datetime.now(timezone.utc)
        with database.session() as session:
            study = Study(study_instance_uid="1.2.3", first_received_at=now, last_received_at=now, status="done")
            session.add(study)
            session.flush()
            job = Job(study_id=study.id, study_revision=1, state="done", priority=0, attempts=1, created_at=now)
            session.add(job)
            session.flush()
            for n in range(12):
                ds = small_instance(study_uid="1.2.3", seed=n)
                path = spool.write_result("1.2.3", ds.SeriesInstanceUID, ds.SOPInstanceUID, b"not sent")
                for peer in peers:
                    session.add(OutboxItem(job_id=job.id, study_instance_uid="1.2.3", sop_instance_uid=ds.SOPInstanceUID,
                                           sop_class_uid=ds.SOPClassUID, kind="SC", path=path, destination=peer.name,
                                           state="pending", priority=0, attempts=0, next_attempt_at=now, created_at=now))
        settings = SenderSettings(backoff_seconds=[600.0], timeout_seconds=1)
        sender = Sender("MSKNODE", lambda: peers, Outbox(database), spool, settings, batch_size=50)

        assert sender.run_once() == 36
        assert [listener.total for listener in listeners] == [1, 1, 1]
        assert [listener.peak for listener in listeners] == [1, 1, 1]
        with database.session() as session:
            rows = list(session.query(OutboxItem))
        assert {(row.state, row.attempts, row.last_status) for row in rows} == {("pending", 1, "no-association")}
        assert sender.run_once() == 0, "items were retried before their backoff delay"
        assert [listener.total for listener in listeners] == [1, 1, 1]
    finally:
        for listener in listeners:
            listener.close()
        database.dispose()


def test_destination_slower_than_the_timeout_is_retried_later(tmp_path: Path) -> None:
    """A PACS that takes longer than ``sender.timeout_seconds`` to answer a C-STORE: the item goes back to
    pending (transient, no response) instead of hanging the sender, and is delivered once the PACS is fast."""
    import threading

    from pynetdicom import evt
    from pynetdicom.sop_class import CTImageStorage

    from storage.db import Database
    from storage.migrate import upgrade
    from storage.spool import Spool
    from tests.helpers.node import free_port
    from node.settings import SenderSettings
    from tests.delivery.test_sender import make_sender, queue_item, row

    url = f"sqlite:///{tmp_path / 's.db'}"
    upgrade(url)
    database = Database(url)
    spool = Spool(tmp_path / "spool", fsync=False)
    slow = threading.Event()
    slow.set()

    def on_store(event: evt.Event) -> int:
        if slow.is_set():
            time.sleep(3)
        return 0x0000

    ae = AE(ae_title="STORESCP")
    ae.add_supported_context(CTImageStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        item_id = queue_item(database, spool)
        sender = make_sender(database, spool, port)
        sender.settings = SenderSettings(backoff_seconds=[0.3], timeout_seconds=1)
        sender.run_once()
        first = row(database, item_id)
        assert (first.state, first.last_status) == ("pending", "no-response")
        slow.clear()
        time.sleep(0.7)  # the backoff in make_sender is 0.3 s
        sender.run_once()
        assert row(database, item_id).state == "delivered"
    finally:
        server.shutdown()
        database.dispose()
