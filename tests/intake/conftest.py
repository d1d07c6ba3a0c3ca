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
