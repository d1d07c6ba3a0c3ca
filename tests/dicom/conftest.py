"""Fixtures for the intake tests: real ``msknode serve`` subprocesses, on SQLite or PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.node import NodeConfig, NodeProcess

NodeFactory = Callable[..., NodeProcess]


def _stop_all(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        if node.running():
            try:
                node.stop(timeout=20)
            except AssertionError:
                node.kill()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    """``node_factory(**NodeConfig fields, start=True)`` -> a node with its own directory; all stopped at the end."""
    nodes: list[NodeProcess] = []

    def make(start: bool = True, **config: object) -> NodeProcess:
        directory = tmp_path / f"node{len(nodes)}"
        node = NodeProcess(NodeConfig(directory=directory, **config))  # type: ignore[arg-type]
        nodes.append(node)
        return node.start() if start else node

    yield make
    _stop_all(nodes)


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The index database, once per backend: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def node(node_factory: NodeFactory) -> NodeProcess:
    """A running node on SQLite with the default peers (STORESCU, ECHOSCU, PYSCU on 127.0.0.1)."""
    return node_factory()


class InProcessNode:
    """The real Receiver in the test process, built with ``node.runtime.service``'s own helpers.

    Used where a test must change the running node's state between two protocol steps (the watermark
    between association and C-STORE, the database under a live receiver).
    """

    def __init__(self, directory: Path, database_url: str | None = None, min_free_disk_mb: int = 0,
                 spool_dir: Path | None = None, peers: list[dict] | None = None) -> None:
        from node.runtime.service import build_receiver, open_runtime
        from node.settings import parse_settings
        from tests.helpers.node import DEFAULT_PEERS, NODE_AE, free_port

        self.directory = directory
        self.port = free_port()
        self.database_url = database_url or f"sqlite:///{directory / 'index.db'}"
        data = {
            "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": self.port,
                     "acse_timeout_seconds": 10, "dimse_timeout_seconds": 30, "network_timeout_seconds": 30},
            "storage": {"database_url": self.database_url, "spool_dir": str(spool_dir or directory / "spool"),
                        "min_free_disk_mb": min_free_disk_mb},
            "peers": peers if peers is not None else [{"name": p.name, "ae_title": p.ae_title, "host": p.host}
                                                      for p in DEFAULT_PEERS],
        }
        self.settings = parse_settings(data, "<test>")
        self.runtime = open_runtime(self.settings)
        self.receiver = build_receiver(self.runtime)
        self.spool = self.runtime.spool.root
        self.incoming = self.runtime.spool.incoming

    def spool_files(self) -> list[Path]:
        return sorted(p for p in self.spool.rglob("*") if p.is_file() and ".incoming" not in p.parts)

    def incoming_files(self) -> list[Path]:
        return sorted(self.incoming.iterdir())

    def instances(self):  # type: ignore[no-untyped-def]
        from sqlalchemy import select

        from storage.models import Instance

        with self.runtime.database.session() as session:
            return list(session.scalars(select(Instance)))

    def associations(self):  # type: ignore[no-untyped-def]
        from sqlalchemy import select

        from storage.models import Association

        with self.runtime.database.session() as session:
            return list(session.scalars(select(Association).order_by(Association.started_at)))


@pytest.fixture
def in_process_node(tmp_path: Path) -> Iterator[Callable[..., InProcessNode]]:
    """``in_process_node(**kwargs)`` -> a started in-process receiver; pynetdicom's globals restored after."""
    from pynetdicom import _config, dimse_messages

    saved = (_config.STORE_RECV_CHUNKED_DATASET, _config.UNRESTRICTED_STORAGE_SERVICE,
             dimse_messages.NamedTemporaryFile, _config.LOG_HANDLER_LEVEL)
    nodes: list[InProcessNode] = []

    def make(**kwargs: object) -> InProcessNode:
        directory = tmp_path / f"inproc{len(nodes)}"
        directory.mkdir()
        node = InProcessNode(directory, **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        node.receiver.start()
        return node

    yield make
    for node in nodes:
        node.receiver.stop(grace_seconds=2)
        node.runtime.database.dispose()
    (_config.STORE_RECV_CHUNKED_DATASET, _config.UNRESTRICTED_STORAGE_SERVICE,
     dimse_messages.NamedTemporaryFile, _config.LOG_HANDLER_LEVEL) = saved
