"""Where results go: one :class:`Destination` per transfer protocol, chosen from a small registry.

The sender role (:mod:`node.delivery.sender`) owns the outbox bookkeeping — claiming rows, backing off,
dead-lettering — and asks a destination only to *transfer*: results in, one :class:`Outcome` per result out,
yielded as each one is known so that the sender records it before the next transfer starts. A destination
speaks its protocol and nothing else (no database, no spool paths): the sender hands it a function that
reads a result's dataset.

A peer's ``protocol`` names its destination: ``dimse`` (:mod:`node.delivery.dimse`, C-STORE) or ``dicomweb``
(:mod:`node.delivery.dicomweb`, STOW-RS). Another protocol joins by implementing :class:`Destination` and
calling :func:`register` for its name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from pydicom import Dataset

from node.settings import PeerSettings
from storage.outbox import Delivery

DELIVERED, TRANSIENT, PERMANENT = "delivered", "transient", "permanent"


@dataclass(frozen=True)
class Outcome:
    """What became of one result at one destination.

    ``kind``: ``delivered`` (done), ``transient`` (retry after the back-off, give up after
    ``sender.max_age_hours``) or ``permanent`` (dead letter now). ``status`` is the protocol's status (e.g.
    ``0x0000``, ``0xA700``) or a short word for what went wrong before one existed (``no-association``,
    ``rejected``, ``local``); ``detail`` is the reason shown to the admin.
    """

    kind: str
    status: str
    detail: str


ResultReader = Callable[[Delivery], Dataset]
"""Reads a result's dataset; raises ``OSError`` or ``pydicom.errors.InvalidDicomError`` if it cannot."""


class Destination(Protocol):
    """Transfers results to one peer over one protocol."""

    def deliver(self, peer: PeerSettings, items: Sequence[Delivery], read: ResultReader) -> Iterator[tuple[Delivery, Outcome]]:
        """Send ``items`` to ``peer``, yielding each item's outcome as soon as it is known (every item once)."""
        ...


DestinationFactory = Callable[..., Destination]
_REGISTRY: dict[str, DestinationFactory] = {}


def register(protocol: str, factory: DestinationFactory) -> None:
    """Make ``protocol`` deliverable; ``factory(calling_ae_title=..., settings=...)`` builds its destination."""
    _REGISTRY[protocol] = factory


def protocols() -> list[str]:
    return sorted(_REGISTRY)


def protocol_of(peer: PeerSettings) -> str:
    """The protocol a peer receives results over: its ``protocol`` field (``dimse``, ``dicomweb``)."""
    return peer.protocol


def build(protocol: str, **options: object) -> Destination:
    try:
        factory = _REGISTRY[protocol]
    except KeyError:
        raise ValueError(f"no destination for protocol {protocol!r}; known: {', '.join(protocols())}") from None
    return factory(**options)
