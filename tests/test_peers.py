"""The peer overlay: database rows over the config file's [[peers]], as every role sees them."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select, text

from node.peers import PeerDirectory, PeerError, peer_from_fields
from node.dicom.policy import decide
from node.settings import NodeSettings, PeerSettings, Settings
from storage.db import Database
from storage.migrate import upgrade
from storage.peers import PeerOverrides


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(
        storage={"database_url": f"sqlite:///{tmp_path / 'node.db'}", "spool_dir": str(tmp_path / "spool")},
        peers=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "receives_results": True},
               {"name": "ct", "ae_title": "CT1", "host": "127.0.0.1"}],
    )
    settings.resolve_peer_hosts()
    return settings


def names(directory: PeerDirectory) -> dict[str, str]:
    return {peer.name: peer.source for peer in directory.list()}


def test_file_peers_are_listed_with_their_source(settings: Settings, database: Database) -> None:
    directory = PeerDirectory(settings, database)
    assert names(directory) == {"pacs": "config", "ct": "config"}
    assert directory.get("pacs").receives_results is True  # type: ignore[union-attr]
    assert directory.get("nobody") is None


def test_add_edit_and_remove_are_kept_in_the_database(settings: Settings, database: Database) -> None:
    directory = PeerDirectory(settings, database)
    directory.add(PeerSettings(name="mri", ae_title="MRI1", host="localhost", port=4242), actor="cli:test")
    directory.update("pacs", PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", priority="urgent"),
                     actor="web:admin")
    directory.remove("ct", actor="cli:test")

    # A second directory (another role, another machine) sees the same peers.
    other = PeerDirectory(settings, database)
    assert names(other) == {"pacs": "database", "mri": "database"}
    pacs = other.get("pacs")
    assert pacs is not None and pacs.priority == "urgent" and pacs.receives_results is False
    mri = other.get("mri")
    assert mri is not None and mri.port == 4242 and mri.addresses  # host resolved for the policy
    rows = {row["name"]: row for row in PeerOverrides(database).list()}
    assert rows["ct"]["removed"] is True and rows["ct"]["settings"] is None
    assert rows["pacs"]["updated_by"] == "web:admin"

    # Forgetting the override brings the file's definition back.
    assert PeerOverrides(database).forget("ct")
    assert names(other)["ct"] == "config"


def test_a_removed_peer_can_be_added_again(settings: Settings, database: Database) -> None:
    directory = PeerDirectory(settings, database)
    directory.remove("ct", actor="t")
    directory.add(PeerSettings(name="ct", ae_title="CT2", host="127.0.0.1"), actor="t")
    assert directory.get("ct").ae_title == "CT2"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.add(PeerSettings(name="pacs", ae_title="OTHER", host="127.0.0.1"), "t"), "name"),
        (lambda d: d.add(PeerSettings(name="pacs2", ae_title="PACS", host="127.0.0.1"), "t"), "ae_title"),
        (lambda d: d.add(PeerSettings(name="far", ae_title="FAR", host="no-such-host.invalid"), "t"), "host"),
        (lambda d: d.update("ct", PeerSettings(name="ct", ae_title="PACS", host="127.0.0.1"), "t"), "ae_title"),
        (lambda d: d.update("ct", PeerSettings(name="ct9", ae_title="CT9", host="127.0.0.1"), "t"), "name"),
        (lambda d: d.update("nobody", PeerSettings(name="nobody", ae_title="N", host="127.0.0.1"), "t"), "name"),
        (lambda d: d.remove("nobody", "t"), "name"),
    ],
)
def test_refused_changes_name_the_field_and_change_nothing(settings: Settings, database: Database, change, field) -> None:  # type: ignore[no-untyped-def]
    directory = PeerDirectory(settings, database)
    before = [peer.model_dump() for peer in directory.list()]
    with pytest.raises(PeerError) as refused:
        change(directory)
    assert str(refused.value).startswith(f"{field}: ")
    assert [peer.model_dump() for peer in directory.list()] == before
    assert PeerOverrides(database).list() == []


def test_field_validation_names_every_bad_field() -> None:
    with pytest.raises(PeerError) as refused:
        peer_from_fields({"name": "bad name", "ae_title": "A" * 17, "host": "127.0.0.1", "port": 0})
    message = str(refused.value)
    for field in ("name:", "ae_title:", "port:"):
        assert field in message


def test_effective_peers_cache_and_database_outage(settings: Settings, database: Database) -> None:
    cached = PeerDirectory(settings, database, cache_seconds=3600)
    fresh = PeerDirectory(settings, database, cache_seconds=0)
    assert {p.name for p in cached.effective_peers()} == {"pacs", "ct"}
    PeerDirectory(settings, database).add(PeerSettings(name="mri", ae_title="MRI1", host="127.0.0.1"), "t")
    assert {p.name for p in cached.effective_peers()} == {"pacs", "ct"}  # still within its cache period
    assert {p.name for p in fresh.effective_peers()} == {"pacs", "ct", "mri"}
    # The overlay becomes unreadable: the last good list stays in force rather than locking everyone out.
    with database.engine.begin() as connection:
        connection.execute(text("DROP TABLE peer_overrides"))
    assert {p.name for p in fresh.effective_peers()} == {"pacs", "ct", "mri"}


def test_the_association_policy_follows_the_overlay(settings: Settings, database: Database) -> None:
    directory = PeerDirectory(settings, database, cache_seconds=0)
    node = NodeSettings(ae_title="MSKNODE")

    def request() -> str | None:
        return decide(node, directory.effective_peers(), "MRI1", "MSKNODE", "127.0.0.1", 0, lambda: True).reason

    assert request() == "calling-ae-not-recognised"
    directory.add(PeerSettings(name="mri", ae_title="MRI1", host="127.0.0.1"), "t")
    assert request() is None
    directory.update("mri", PeerSettings(name="mri", ae_title="MRI1", host="127.0.0.1", may_send=False), "t")
    assert request() == "calling-ae-may-not-send"
    directory.remove("mri", "t")
    assert request() == "calling-ae-not-recognised"


def test_worker_sends_results_to_the_effective_peers_and_times_inference(tmp_path: Path) -> None:
    """Destinations come from file + overlay at the time of the job; each engine pass lands in the histogram."""
    import engines
    from node.pipeline.worker import Worker
    from storage.counters import Counters
    from storage.intake import IntakeRepository
    from storage.models import OutboxItem
    from storage.queue import JobQueue
    from storage.spool import Spool
    from storage.job_inputs import JobInputs
    from tests.helpers.models import tiny_model
    from tests.pipeline.test_worker import complete_all, phantom_datasets, receive

    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(url)
    database = Database(url)
    spool = Spool(tmp_path / "spool", fsync=False)
    settings = Settings(
        peers=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "receives_results": True},
               {"name": "archive", "ae_title": "ARCH", "host": "127.0.0.1", "receives_results": True}],
        engine={"batch_size": 4, "passes": 2},
    )
    settings.resolve_peer_hosts()
    directory = PeerDirectory(settings, database, cache_seconds=0)
    directory.remove("archive", actor="t")
    directory.add(PeerSettings(name="viewer", ae_title="VIEWER", host="127.0.0.1", receives_results=True), "t")
    encoder = engines.load(tiny_model(tmp_path / "model", width=32, layers=1), backend="cpu")
    worker = Worker(settings, JobQueue(database), JobInputs(database), spool, encoder, owner="test-worker",
                    peers=directory.effective_peers, counters=Counters(database))
    try:
        association = IntakeRepository(database).association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
        for dataset in phantom_datasets("overlay", 2):
            receive(database, spool, dataset, tmp_path, association)
        complete_all(database)
        assert worker.run_once() == 1
        with database.session() as session:
            destinations = {item.destination for item in session.scalars(select(OutboxItem))}
        counters = {(name, labels.get("le")): value for name, labels, value in Counters(database).all()}
    finally:
        database.dispose()
    assert destinations == {"pacs", "viewer"}
    assert counters[("inference_seconds_count", None)] == 1  # 2 frames, batch_size 4: one engine pass
    assert counters[("inference_seconds_bucket", "+Inf")] == 1
    assert counters[("inference_seconds_sum", None)] > 0
