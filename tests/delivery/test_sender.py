"""Delivery to real peers: DCMTK storescp, and pynetdicom SCPs that answer what PACSs answer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from node.delivery.sender import Sender, backoff_delay, classify_status
from node.settings import PeerSettings, SenderSettings
from storage.db import Database
from storage.migrate import upgrade
from storage.models import Job, OutboxItem, Study
from storage.outbox import Outbox
from storage.spool import Spool
from tests.helpers.node import free_port
from tests.helpers.tools import require_tool, start_storescp

CT = get_testdata_file("CT_small.dcm")


@pytest.fixture()
def env(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/s.db"
    upgrade(url)
    database = Database(url)
    spool = Spool(tmp_path / "spool", fsync=False)
    yield database, spool, tmp_path
    database.dispose()


def queue_item(database: Database, spool: Spool, destination: str = "pacs") -> int:
    from datetime import datetime, timezone

    path = spool.write_result("1.2.3", "1.2.3.4", "1.2.3.4.5", Path(CT).read_bytes())
    now = datetime.now(timezone.utc)
    with database.session() as session:
        study = session.query(Study).filter_by(study_instance_uid="1.2.3").one_or_none()
        if study is None:
            study = Study(study_instance_uid="1.2.3", first_received_at=now, last_received_at=now, status="done")
            session.add(study)
            session.flush()
        job = Job(study_id=study.id, study_revision=1, state="done", priority=0, attempts=1, created_at=now)
        session.add(job)
        session.flush()
        item = OutboxItem(job_id=job.id, study_instance_uid="1.2.3", sop_instance_uid="1.2.3.4.5",
                          sop_class_uid=CTImageStorage, kind="SR", path=path, destination=destination,
                          state="pending", priority=0, attempts=0, next_attempt_at=now, created_at=now)
        session.add(item)
        session.flush()
        return item.id


def row(database: Database, item_id: int) -> OutboxItem:
    with database.session() as session:
        return session.get(OutboxItem, item_id)


def make_sender(database: Database, spool: Spool, port: int, ae_title: str = "STORESCP", **settings) -> Sender:
    peer = PeerSettings(name="pacs", ae_title=ae_title, host="127.0.0.1", port=port, receives_results=True)
    config = SenderSettings(backoff_seconds=[0.3, 0.6], timeout_seconds=5, **settings)
    return Sender("MSKNODE", lambda: [peer], Outbox(database), spool, config)


def test_backoff_escalates_and_holds() -> None:
    assert [backoff_delay([30, 120, 600], n) for n in (1, 2, 3, 4, 9)] == [30, 120, 600, 600, 600]


@pytest.mark.parametrize(("status", "kind"), [(0x0000, "delivered"), (0xB000, "delivered"), (0xA700, "transient"),
                                              (0xA900, "permanent"), (0xC000, "permanent")])
def test_status_classes(status: int, kind: str) -> None:
    assert classify_status(status).kind == kind


@pytest.mark.dcmtk
def test_destination_down_then_up_is_delivered_exactly_once(env) -> None:
    database, spool, tmp = env
    require_tool("storescp")
    port = free_port()
    item_id = queue_item(database, spool)
    sender = make_sender(database, spool, port)
    for attempt in (1, 2):  # nobody listening yet
        assert sender.run_once() == 1
        state = row(database, item_id)
        assert state.state == "pending" and state.attempts == attempt and state.last_error.startswith("could not associate")
        time.sleep(0.7)
    received = tmp / "received"
    process = start_storescp(received, port, ae_title="STORESCP")
    try:
        time.sleep(0.7)
        assert sender.run_once() == 1
        assert row(database, item_id).state == "delivered"
        assert sender.run_once() == 0  # nothing left: never sent twice
    finally:
        process.terminate()
        process.wait(10)
    assert len(list(received.iterdir())) == 1


def serve(handler_status: int | None = None, contexts=(CTImageStorage,), require_calling: list[str] | None = None):
    ae = AE(ae_title="PACS")
    for context in contexts:
        ae.add_supported_context(context)
    if require_calling:
        ae.require_calling_aet = require_calling
    handlers = []
    if handler_status is not None:
        handlers.append((evt.EVT_C_STORE, lambda event: handler_status))
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    return server, port


def test_association_rejected_for_our_ae_goes_to_dead_letter_without_retry(env) -> None:
    database, spool, _ = env
    server, port = serve(0x0000, require_calling=["SOMEONEELSE"])
    try:
        item_id = queue_item(database, spool)
        sender = make_sender(database, spool, port, ae_title="PACS")
        sender.run_once()
        state = row(database, item_id)
        assert state.state == "dead" and "rejected permanently" in state.last_error
        time.sleep(0.7)
        assert sender.run_once() == 0  # no loop
    finally:
        server.shutdown()


def test_sop_class_refused_goes_to_dead_letter(env) -> None:
    database, spool, _ = env
    server, port = serve(0x0000, contexts=(Verification,))
    try:
        item_id = queue_item(database, spool)
        make_sender(database, spool, port, ae_title="PACS").run_once()
        state = row(database, item_id)
        assert state.state == "dead" and "does not accept SOP class" in state.last_error
    finally:
        server.shutdown()


def test_warning_is_delivered_and_out_of_resources_is_retried(env) -> None:
    database, spool, _ = env
    server, port = serve(0xB000)
    try:
        item_id = queue_item(database, spool)
        make_sender(database, spool, port, ae_title="PACS").run_once()
        assert row(database, item_id).state == "delivered" and row(database, item_id).last_status == "0xB000"
    finally:
        server.shutdown()
    server, port = serve(0xA700)
    try:
        with database.session() as session:
            session.query(OutboxItem).delete()
        item_id = queue_item(database, spool)
        make_sender(database, spool, port, ae_title="PACS").run_once()
        state = row(database, item_id)
        assert state.state == "pending" and state.last_status == "0xA700"
    finally:
        server.shutdown()


def test_rows_older_than_the_maximum_age_are_given_up(env) -> None:
    database, spool, _ = env
    item_id = queue_item(database, spool)
    sender = make_sender(database, spool, free_port(), ae_title="PACS", max_age_hours=1e-9)
    sender.run_once()
    state = row(database, item_id)
    assert state.state == "dead" and "gave up" in state.last_error


def test_destination_removed_from_config_is_dead_lettered(env) -> None:
    database, spool, _ = env
    item_id = queue_item(database, spool, destination="gone")
    make_sender(database, spool, free_port()).run_once()
    assert row(database, item_id).state == "dead"


# -- destinations registry ---------------------------------------------------------------------------
def test_an_unknown_protocol_is_named_with_the_known_ones() -> None:
    from node.delivery.destinations import build

    with pytest.raises(ValueError, match=r"'stow'.*dimse"):
        build("stow", calling_ae_title="MSKNODE", settings=SenderSettings())


def test_the_sender_records_each_outcome_a_destination_yields(env, monkeypatch) -> None:
    """A destination only transfers; the sender turns its outcomes into outbox states, one row at a time."""
    from node.delivery import destinations
    from node.delivery.destinations import Outcome

    database, spool, _ = env
    delivered, later, refused = (queue_item(database, spool) for _ in range(3))
    seen: list[int] = []

    class Scripted:
        def __init__(self, **options) -> None:
            self.options = options

        def deliver(self, peer, items, read):
            script = {delivered: Outcome("delivered", "0x0000", "success"),
                      later: Outcome("transient", "0xA700", "out of resources"),
                      refused: Outcome("permanent", "0xC000", "refused")}
            for item in items:
                assert read(item).SOPInstanceUID  # the sender's reader opens the result from the spool
                seen.append(item.id)
                # the previous item's outcome is already recorded when the next transfer starts
                assert all(row(database, done).state != "sending" for done in seen[:-1])
                yield item, script[item.id]

    monkeypatch.setattr(destinations, "_REGISTRY", {"dimse": Scripted})
    sender = make_sender(database, spool, port=1)
    assert sender.run_once() == 3
    assert sorted(seen) == sorted([delivered, later, refused])
    assert row(database, delivered).state == "delivered"
    assert row(database, later).state == "pending" and row(database, later).attempts == 1
    assert row(database, refused).state == "dead" and "refused" in row(database, refused).last_error
