"""``/healthz`` checks, ``/metrics`` and ``msknode status`` against a real node and its database.

Metrics are parsed with prometheus-client's own parser and compared with what the node stored (the audit
table, the index) after real stores and rejections by DCMTK.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from node.runtime.health import check_health, scp_address
from node.runtime.metrics import render_metrics
from node.settings import Settings, load_settings
from node.runtime.status import collect_status
from storage.counters import Counters, increment
from storage.db import Database, utcnow
from storage.migrate import upgrade
from storage.models import Counter, Instance, Job, OutboxItem, Study
from storage.outbox import Outbox
from storage.status import Heartbeats
from tests.helpers.dicomdata import make_instances
from tests.helpers.models import tiny_model
from tests.helpers.node import NodeConfig, NodeProcess, free_port, wait_for
from tests.helpers.tools import echoscu, require_tool, storescu


@dataclass
class WorkerNodeConfig(NodeConfig):
    """Receiver and worker, with a tiny random model (nothing is sent to it here)."""

    model: Path | None = None

    def write(self) -> Path:
        path = super().write()
        if self.model is not None:
            path.write_text(path.read_text() + f'\n[engine]\nmodel = "{self.model}"\nbackend = "cpu"\n')
        return path


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from a Prometheus text exposition."""
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def offline_settings(tmp_path: Path, **storage: object) -> Settings:
    """Settings of a node that is not running (nothing listens on its port)."""
    (tmp_path / "spool").mkdir(exist_ok=True)
    return Settings(
        node={"host": "0.0.0.0", "port": free_port()},
        storage={"database_url": f"sqlite:///{tmp_path / 'node.db'}", "spool_dir": str(tmp_path / "spool"),
                 "min_free_disk_mb": 0, **storage},
    )


# -- metrics and status of a running node ---------------------------------------------------------------
@pytest.mark.dcmtk
def test_metrics_count_real_stores_and_rejections(tmp_path: Path) -> None:
    require_tool("storescu")
    node = NodeProcess(NodeConfig(directory=tmp_path / "node")).start()
    try:
        files = make_instances(tmp_path / "in", 3)
        assert storescu(node.port, files).returncode == 0
        assert storescu(node.port, files[:1]).returncode == 0  # the same bytes again: a duplicate
        rejected = echoscu(node.port, calling="STRANGER")
        assert rejected.returncode != 0
        rows = node.wait_for_associations_closed()
        settings = load_settings(node.config.path)
        with node.database() as database:
            body, content_type = render_metrics(settings, database)
            status = wait_for(lambda: (s := collect_status(settings, database))["roles_alive"] and s, 10,
                              "the receiver's heartbeat", interval=0.2)
            with database.session() as session:
                stored_bytes = session.scalar(select(func.sum(Instance.size_bytes)))
                resent_bytes = session.scalar(
                    select(Instance.size_bytes).order_by(Instance.instance_number).limit(1))
    finally:
        node.stop()

    assert content_type.startswith("text/plain")
    metrics = samples(body)
    assert metrics[("msknode_instances_received_total", (("outcome", "new"),))] == 3
    assert metrics[("msknode_instances_received_total", (("outcome", "duplicate"),))] == 1
    assert metrics[("msknode_received_bytes_total", ())] == stored_bytes + resent_bytes
    accepted = sum(1 for row in rows if row.outcome != "rejected")
    assert accepted == 2
    assert metrics[("msknode_associations_total", (("outcome", "accepted"), ("reason", "")))] == accepted
    assert metrics[("msknode_associations_total",
                    (("outcome", "rejected"), ("reason", "calling-ae-not-recognised")))] == 1
    assert metrics[("msknode_spool_free_bytes", ())] > 0
    assert status["roles_alive"] == {"receiver": 1}
    assert status["processes"][0]["owner"].startswith("receiver@")
    assert status["engine"] is None  # no worker role here


def _seed_deliveries(database: Database) -> list[int]:
    now = utcnow()
    with database.session() as session:
        study = Study(study_instance_uid="1.2.3", first_received_at=now, last_received_at=now, status="done")
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, study_revision=1, state="failed", created_at=now, finished_at=now,
                  last_error="decode failed")
        session.add(job)
        session.flush()
        items = [
            OutboxItem(job_id=job.id, study_instance_uid="1.2.3", sop_instance_uid=f"1.2.3.{i}",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", kind="SR", path="x.dcm",
                       destination="pacs", state="pending", next_attempt_at=now - timedelta(hours=2),
                       created_at=now - timedelta(hours=2))
            for i in range(4)
        ]
        session.add_all(items)
        session.flush()
        return [item.id for item in items]


def test_deliveries_queue_depths_and_oldest_pending(tmp_path: Path, database: Database) -> None:
    settings = offline_settings(tmp_path)
    _seed_deliveries(database)
    outbox = Outbox(database)
    claimed = outbox.claim("sender-test", 60, "pacs", 3)
    assert len(claimed) == 3
    outbox.delivered(claimed[0].id, "sender-test", "0x0000")
    outbox.retry_later(claimed[1].id, "sender-test", "no-association", "refused", 30)
    outbox.dead_letter(claimed[2].id, "sender-test", "0xC000", "refused")
    outbox.delivered(claimed[2].id, "someone-else", "0x0000")  # lost lease: not counted

    metrics = samples(render_metrics(settings, database)[0])
    for outcome in ("delivered", "retry", "dead"):
        assert metrics[("msknode_deliveries_total", (("destination", "pacs"), ("outcome", outcome)))] == 1
    assert metrics[("msknode_queue_depth", (("queue", "outbox"), ("state", "pending")))] == 2
    assert metrics[("msknode_queue_depth", (("queue", "outbox"), ("state", "dead")))] == 1
    assert metrics[("msknode_queue_depth", (("queue", "jobs"), ("state", "failed")))] == 1
    assert metrics[("msknode_oldest_pending_seconds", (("queue", "outbox"),))] >= 7200
    assert metrics[("msknode_oldest_pending_seconds", (("queue", "jobs"),))] == 0

    status = collect_status(settings, database)
    assert status["dead_letters"] == 1 and status["failed_jobs"] == 1
    assert status["queues"]["outbox"] == {"pending": 2, "delivered": 1, "dead": 1}


def test_inference_histogram_is_cumulative(tmp_path: Path, database: Database) -> None:
    counters = Counters(database)
    for seconds in (0.04, 0.3, 0.3, 7.0, 500.0):
        counters.observe("inference_seconds", seconds)
    metrics = samples(render_metrics(offline_settings(tmp_path), database)[0])

    def bucket(le: str) -> float:
        return metrics[("msknode_inference_seconds_bucket", (("le", le),))]

    assert bucket("0.05") == 1 and bucket("0.5") == 3 and bucket("10.0") == 4 and bucket("120.0") == 4
    assert bucket("+Inf") == 5
    assert metrics[("msknode_inference_seconds_count", ())] == 5
    assert metrics[("msknode_inference_seconds_sum", ())] == pytest.approx(507.64)


@pytest.mark.postgres
def test_counter_upsert_on_postgresql(postgres_url: str) -> None:
    upgrade(postgres_url)
    database = Database(postgres_url)
    try:
        for _ in range(3):
            with database.session() as session:
                increment(session, "associations", {"reason": "", "outcome": "accepted"})
        with database.session() as session:
            increment(session, "received_bytes", None, 1000)
            increment(session, "received_bytes", None, 24)
        with database.session() as session:
            rows = {(row.name, row.labels): row.value for row in session.scalars(select(Counter))}
    finally:
        database.dispose()
    assert rows == {("associations", "outcome=accepted,reason="): 3.0, ("received_bytes", ""): 1024.0}


def test_a_failed_transaction_counts_nothing(database: Database) -> None:
    with pytest.raises(RuntimeError):
        with database.session() as session:
            increment(session, "associations", {"outcome": "accepted", "reason": ""})
            raise RuntimeError("the event itself failed")
    assert Counters(database).all() == []


# -- /healthz -------------------------------------------------------------------------------------------
def _worker_heartbeat(database: Database, loaded: bool, seconds_ago: float = 0) -> None:
    heartbeats = Heartbeats(database)
    heartbeats.beat("worker@test:1", "worker", utcnow(), {"engine_loaded": loaded,
                                                         "engine": {"backend": "cpu", "model": "m"}})
    if seconds_ago:
        from storage.models import RoleHeartbeat

        with database.session() as session:
            session.get(RoleHeartbeat, "worker@test:1").seen_at = utcnow() - timedelta(seconds=seconds_ago)


@pytest.mark.slow
def test_health_of_a_node_with_a_real_worker(tmp_path: Path) -> None:
    """Unhealthy until the worker process reports its engine loaded; then 200 with the engine's detail."""
    model = tiny_model(tmp_path / "model", width=32, layers=1)
    node = NodeProcess(WorkerNodeConfig(directory=tmp_path / "node", roles=("receiver", "worker"), model=model))
    node.start()
    try:
        settings = load_settings(node.config.path)
        with node.database() as database:
            healthy, checks = wait_for(lambda: (r := check_health(settings, database))[0] and r, 90,
                                       f"a healthy node:\n{node.log()[-3000:]}", interval=0.2)
            metrics = samples(render_metrics(settings, database)[0])
            status = collect_status(settings, database)
    finally:
        node.stop()
    assert checks["database"]["ok"] and checks["spool"]["writable"] and checks["scp"]["ok"]
    assert checks["engine"]["backend"] == "cpu" and checks["engine"]["model"] == str(model)
    assert status["roles_alive"] == {"receiver": 1, "worker": 1}
    assert status["engine"]["device"] == "cpu"
    assert metrics[("msknode_engine_info", (("backend", "cpu"), ("device", "cpu"), ("model", str(model)),
                                            ("precision", "fp32")))] == 1
    assert metrics[("msknode_role_processes_alive", (("role", "worker"),))] == 1
    # A clean stop removes the rows: a stopped node shows no live roles (and is not healthy).
    with node.database() as database:
        assert Heartbeats(database).list() == []
        healthy, checks = check_health(settings, database)
    assert not healthy and not checks["scp"]["ok"] and not checks["engine"]["ok"]


@pytest.fixture(scope="module")
def listening_node(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One real receiver whose port the health cases probe (each case has its own database and spool)."""
    node = NodeProcess(NodeConfig(directory=tmp_path_factory.mktemp("listening"))).start()
    yield node
    node.stop()


@pytest.mark.parametrize("case", ["healthy", "engine-not-loaded", "worker-silent", "no-worker", "scp-down",
                                  "below-watermark", "spool-unwritable", "database-down"])
def test_health_checks(tmp_path: Path, case: str, listening_node: NodeProcess) -> None:
    storage: dict[str, object] = {}
    if case == "below-watermark":
        storage["min_free_disk_mb"] = 10**9
    settings = offline_settings(tmp_path, **storage)
    if case != "scp-down":
        settings.node.port = listening_node.port
    if case == "spool-unwritable":
        # Root may write anywhere chmod allows, so use a directory nobody can create files in.
        settings.storage.spool_dir = Path("/proc/self")
    if case == "database-down":
        settings.storage.database_url = f"postgresql://msknode@127.0.0.1:{free_port()}/none"
    upgrade(f"sqlite:///{tmp_path / 'node.db'}")
    writer = Database(f"sqlite:///{tmp_path / 'node.db'}")
    if case != "no-worker":
        _worker_heartbeat(writer, loaded=case != "engine-not-loaded", seconds_ago=600 if case == "worker-silent" else 0)
    database = Database(settings.storage.database_url)
    try:
        healthy, checks = check_health(settings, database)
    finally:
        database.dispose()
        writer.dispose()

    failing = {name for name, check in checks.items() if not check["ok"]}
    expected = {
        "healthy": set(),
        "engine-not-loaded": {"engine"},
        "worker-silent": {"engine"},
        "no-worker": {"engine"},
        "scp-down": {"scp"},
        "below-watermark": {"spool"},
        "spool-unwritable": {"spool"},
        "database-down": {"database", "engine"},
    }[case]
    assert failing == expected
    assert healthy is (not expected)
    for name in failing:
        assert checks[name]["error"]  # says why
    if case == "spool-unwritable":
        assert checks["spool"]["writable"] is False


def test_scp_probe_address_for_a_wildcard_listener() -> None:
    assert scp_address(Settings(node={"host": "0.0.0.0", "port": 1104})) == ("127.0.0.1", 1104)
    assert scp_address(Settings(node={"host": "10.1.2.3", "port": 104})) == ("10.1.2.3", 104)
