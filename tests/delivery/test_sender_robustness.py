"""The sender against peers and results that misbehave (issue #14, item 5).

- Any exception while delivering one item ends that item's attempt (counted, backed off, aged out after
  ``sender.max_age_hours``); no row is left ``sending`` after a round.
- A batch's lease is renewed while it sends: a slow peer's batch is never re-claimed by another sender.
- ``sender.max_concurrent_per_destination`` bounds the associations to one destination across sender
  processes (DCMTK storescp in ``--fork`` mode behind a connection-counting TCP proxy, 2 sender processes).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from node.delivery.sender import Sender
from node.settings import PeerSettings, SenderSettings
from storage.db import Database
from storage.migrate import upgrade
from storage.models import Job, OutboxItem, Study
from storage.outbox import Outbox
from storage.spool import Spool
from tests.helpers.node import free_port
from tests.helpers.tools import require_tool, start_storescp

CT = get_testdata_file("CT_small.dcm")
STUDY = "1.2.826.0.1.3680043.10.1.77"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def env(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/s.db"
    upgrade(url)
    database = Database(url)
    spool = Spool(tmp_path / "spool", fsync=False)
    yield database, spool, tmp_path
    database.dispose()


def queue_results(database: Database, spool: Spool, count: int, destination: str = "pacs") -> list[int]:
    """``count`` CT results, each with its own SOP Instance UID, pending for ``destination``."""
    now = datetime.now(timezone.utc)
    ids = []
    with database.session() as session:
        study = session.query(Study).filter_by(study_instance_uid=STUDY).one_or_none()
        if study is None:
            study = Study(study_instance_uid=STUDY, first_received_at=now, last_received_at=now, status="done")
            session.add(study)
            session.flush()
        job = Job(study_id=study.id, study_revision=1, state="done", priority=0, attempts=1, created_at=now)
        session.add(job)
        session.flush()
        for _ in range(count):
            dataset = pydicom.dcmread(CT)
            dataset.SOPInstanceUID = generate_uid()
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            buffer = __import__("io").BytesIO()
            dataset.save_as(buffer)
            path = spool.write_result(STUDY, dataset.SeriesInstanceUID, dataset.SOPInstanceUID, buffer.getvalue())
            item = OutboxItem(job_id=job.id, study_instance_uid=STUDY, sop_instance_uid=dataset.SOPInstanceUID,
                              sop_class_uid=CTImageStorage, kind="SC", path=path, destination=destination,
                              state="pending", priority=0, attempts=0, next_attempt_at=now, created_at=now)
            session.add(item)
            session.flush()
            ids.append(item.id)
    return ids


def rows(database: Database) -> dict[int, OutboxItem]:
    with database.session() as session:
        return {item.id: item for item in session.query(OutboxItem)}


def make_sender(database: Database, spool: Spool, port: int, ae_title: str = "PACS", owner: str | None = None,
                lease_seconds: float | None = None, **settings) -> Sender:
    peer = PeerSettings(name="pacs", ae_title=ae_title, host="127.0.0.1", port=port, receives_results=True)
    config = SenderSettings(**{"backoff_seconds": [0.3, 0.6], "timeout_seconds": 5, **settings})
    extra = {"lease_seconds": lease_seconds} if lease_seconds else {}
    return Sender("MSKNODE", lambda: [peer], Outbox(database), spool, config, owner=owner, **extra)


class Scp:
    """A pynetdicom Storage SCP; ``on_store`` decides each response, ``received`` lists the SOP UIDs stored."""

    def __init__(self, on_store=None, handlers=()) -> None:  # type: ignore[no-untyped-def]
        self.received: list[str] = []
        self.on_store = on_store or (lambda event: 0x0000)

        def store(event: evt.Event):  # type: ignore[no-untyped-def]
            self.received.append(event.request.AffectedSOPInstanceUID)
            return self.on_store(event)

        ae = AE(ae_title="PACS")
        ae.add_supported_context(CTImageStorage)
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, store), *handlers])

    def close(self) -> None:
        self.server.shutdown()


def assert_nothing_left_sending(database: Database) -> None:
    assert not [row.id for row in rows(database).values() if row.state == "sending"], "rows left in 'sending'"


# -- any exception ends that item's attempt ----------------------------------------------------------------
def test_an_exception_reading_one_result_ends_that_items_attempt_and_the_rest_is_delivered(env) -> None:
    database, spool, _ = env
    scp = Scp()
    try:
        first, broken, last = queue_results(database, spool, 3)
        sender = make_sender(database, spool, scp.port)
        real_read = sender._read_result

        def read(item):  # type: ignore[no-untyped-def]
            if item.id == broken:
                raise RuntimeError("injected: the result store hiccuped")
            return real_read(item)

        sender._read_result = read  # type: ignore[method-assign]
        assert sender.run_once() == 3
        state = rows(database)
        assert state[first].state == "delivered" and state[last].state == "delivered"
        assert (state[broken].state, state[broken].attempts) == ("pending", 1)
        assert "injected" in state[broken].last_error
        assert_nothing_left_sending(database)
        assert sender.run_once() == 0, "retried before its back-off"
        time.sleep(0.4)
        sender._read_result = real_read  # type: ignore[method-assign]
        assert sender.run_once() == 1
        assert rows(database)[broken].state == "delivered"
        assert sorted(scp.received) == sorted({row.sop_instance_uid for row in rows(database).values()})
    finally:
        scp.close()


def test_a_failing_result_is_given_up_after_the_maximum_age(env) -> None:
    database, spool, _ = env
    scp = Scp()
    try:
        [broken] = queue_results(database, spool, 1)
        sender = make_sender(database, spool, scp.port, max_age_hours=1e-9)

        def read(item):  # type: ignore[no-untyped-def]
            raise MemoryError("injected")

        sender._read_result = read  # type: ignore[method-assign]
        sender.run_once()
        state = rows(database)[broken]
        assert state.state == "dead" and "gave up" in state.last_error and "injected" in state.last_error
    finally:
        scp.close()


def test_a_result_the_scu_cannot_encode_ends_its_attempt_and_the_association_goes_on(env) -> None:
    database, spool, _ = env
    scp = Scp()
    try:
        good, bad, after = queue_results(database, spool, 3)
        sender = make_sender(database, spool, scp.port)
        real_read = sender._read_result

        def read(item):  # type: ignore[no-untyped-def]
            dataset = real_read(item)
            if item.id == bad:  # pynetdicom raises while encoding the dataset for C-STORE
                dataset.add(DataElement(0x00091001, "US", "not a number"))
            return dataset

        sender._read_result = read  # type: ignore[method-assign]
        assert sender.run_once() == 3
        state = rows(database)
        assert state[good].state == "delivered" and state[after].state == "delivered"
        assert (state[bad].state, state[bad].attempts) == ("pending", 1)
        assert_nothing_left_sending(database)
    finally:
        scp.close()


def test_an_exception_escaping_a_destination_mid_batch_ends_every_remaining_items_attempt(env, monkeypatch) -> None:
    from node.delivery import destinations
    from node.delivery.destinations import Outcome

    database, spool, _ = env
    ids = queue_results(database, spool, 4)

    class Breaks:
        def __init__(self, **options) -> None:
            pass

        def deliver(self, peer, items, read):  # type: ignore[no-untyped-def]
            yield items[0], Outcome("delivered", "0x0000", "success")
            raise ConnectionResetError("injected: the transport broke")

    monkeypatch.setattr(destinations, "_REGISTRY", {"dimse": Breaks})
    sender = make_sender(database, spool, port=1)
    assert sender.run_once() == 4
    state = rows(database)
    assert state[ids[0]].state == "delivered"
    for item_id in ids[1:]:
        assert (state[item_id].state, state[item_id].attempts) == ("pending", 1)
        assert "ConnectionResetError" in state[item_id].last_error
    assert_nothing_left_sending(database)


def test_a_peer_whose_handler_raises_refuses_that_item_only(env) -> None:
    database, spool, _ = env
    calls = []

    def on_store(event):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the PACS's storage plug-in crashed")
        return 0x0000

    scp = Scp(on_store)
    try:
        ids = queue_results(database, spool, 3)
        make_sender(database, spool, scp.port).run_once()
        state = rows(database)
        assert [state[i].state for i in ids] == ["delivered", "dead", "delivered"]  # 0xC211: refused
        assert_nothing_left_sending(database)
    finally:
        scp.close()


def test_a_peer_sending_a_malformed_response_ends_the_attempt_of_every_item_of_the_batch(env) -> None:
    """The first C-STORE-RSP carries an empty Status: pynetdicom aborts the association on it, so that item and
    the rest of the batch end their attempt (back to pending, counted) and all are delivered at the next try."""
    database, spool, _ = env
    answered = []

    def malformed(event):  # type: ignore[no-untyped-def]
        if type(event.message).__name__ == "C_STORE_RSP":
            answered.append(1)
            if len(answered) == 1:
                event.message.command_set[0x00000900] = DataElement(0x00000900, "US", None)

    scp = Scp(handlers=[(evt.EVT_DIMSE_SENT, malformed)])
    try:
        ids = queue_results(database, spool, 3)
        sender = make_sender(database, spool, scp.port)
        assert sender.run_once() == 3
        state = rows(database)
        assert [(state[i].state, state[i].attempts) for i in ids] == [("pending", 1)] * 3
        assert state[ids[0]].last_status == "no-response"
        assert_nothing_left_sending(database)
        time.sleep(0.4)
        assert sender.run_once() == 3
        assert [rows(database)[i].state for i in ids] == ["delivered"] * 3
    finally:
        scp.close()


# -- the lease is renewed while a batch sends ---------------------------------------------------------------
def test_a_slow_peers_batch_keeps_its_lease_and_is_never_claimed_twice(env) -> None:
    """5 results to a peer that takes 0.8 s per C-STORE (4 s in all) under a 1.5 s lease, while a second
    sender polls for due rows every 0.1 s: it never gets one, and every result is stored once."""
    database, spool, _ = env

    def slow(event):  # type: ignore[no-untyped-def]
        time.sleep(0.8)
        return 0x0000

    scp = Scp(slow)
    try:
        ids = queue_results(database, spool, 5)
        first = make_sender(database, spool, scp.port, owner="sender-a", lease_seconds=1.5)
        second = make_sender(database, spool, scp.port, owner="sender-b", lease_seconds=1.5)
        stolen: list[int] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set() and not any(row.state == "sending" for row in rows(database).values()):
                time.sleep(0.02)  # from the moment the first sender holds the batch
            while not done.is_set():
                stolen.extend(item.id for item in second.outbox.claim("sender-b", 60, "pacs", 10))
                time.sleep(0.1)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            assert first.run_once() == 5
        finally:
            done.set()
            poller.join(10)
        assert stolen == [], f"rows re-claimed mid-send: {stolen}"
        assert [rows(database)[i].state for i in ids] == ["delivered"] * 5
        assert len(scp.received) == 5 == len(set(scp.received))
    finally:
        scp.close()


# -- sender.max_concurrent_per_destination across sender processes ---------------------------------------
class CountingProxy:
    """Forwards TCP connections to ``target_port``, counting the connections open at once (``peak``)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.open = self.peak = self.total = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                continue
            with self._lock:
                self.open += 1
                self.total += 1
                self.peak = max(self.peak, self.open)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except OSError:
            client.close()
            with self._lock:
                self.open -= 1
            return
        closed = threading.Event()

        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                closed.set()

        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)
        closed.wait(10)
        for sock in (client, upstream):
            try:
                sock.close()
            except OSError:
                pass
        with self._lock:
            self.open -= 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()


SENDER_PROCESS = """
import sys, time
sys.path.insert(0, {repo!r})
from node.delivery.sender import Sender
from node.settings import PeerSettings, SenderSettings
from storage.db import Database
from storage.outbox import Outbox
from storage.spool import Spool

database = Database({url!r})
peer = PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port={port}, receives_results=True)
settings = SenderSettings(backoff_seconds=[0.2], timeout_seconds=10, max_concurrent_per_destination={limit})
sender = Sender("MSKNODE", lambda: [peer], Outbox(database), Spool({spool!r}, fsync=False), settings,
                owner={owner!r}, batch_size=2)
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    counts = sender.outbox.counts()
    if not counts.get("pending") and not counts.get("sending"):
        break
    if not sender.run_once():
        time.sleep(0.05)
database.dispose()
"""


def run_two_sender_processes(database_url: str, spool: Spool, port: int, limit: int) -> None:
    processes = [
        subprocess.Popen([sys.executable, "-c", SENDER_PROCESS.format(
            repo=str(REPO), url=database_url, port=port, limit=limit, spool=str(spool.root), owner=f"sender-{n}")])
        for n in range(2)
    ]
    for process in processes:
        assert process.wait(120) == 0


@pytest.mark.dcmtk
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("limit", [1, 2])
def test_max_concurrent_per_destination_holds_across_two_sender_processes(tmp_path: Path, request, backend: str,
                                                                           limit: int) -> None:
    require_tool("storescp")
    url = f"sqlite:///{tmp_path}/s.db" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade(url)
    database = Database(url)
    spool = Spool(tmp_path / "spool", fsync=False)
    received = tmp_path / "received"
    storescp_port = free_port()
    storescp = start_storescp(received, storescp_port, "--fork", "--sleep-during", "1", ae_title="PACS")
    proxy = CountingProxy(storescp_port)
    try:
        ids = queue_results(database, spool, 8)
        run_two_sender_processes(url, spool, proxy.port, limit)
        state = rows(database)
        assert [state[i].state for i in ids] == ["delivered"] * 8
        assert len(list(received.iterdir())) == 8
        assert proxy.peak == limit, f"peak associations {proxy.peak}, limit {limit} (total {proxy.total})"
        print(json.dumps({"backend": backend, "limit": limit, "peak": proxy.peak, "associations": proxy.total}))
    finally:
        proxy.close()
        storescp.terminate()
        storescp.wait(10)
        database.dispose()
