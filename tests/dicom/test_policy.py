"""Association policy: the accept/reject decision, before anything is transferred."""

from __future__ import annotations

import pytest

from node.dicom.policy import decide
from node.settings import parse_settings


def settings(**node: object):
    return parse_settings(
        {
            "node": {"ae_title": "MSKNODE", "max_associations": 2, **node},
            "peers": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1"},
                {"name": "readonly", "ae_title": "VIEWER", "host": "127.0.0.1", "may_send": False},
            ],
        }
    )


def call(cfg, calling="PACS", called="MSKNODE", address="127.0.0.1", active=0, room=True):
    return decide(cfg.node, cfg.peers, calling, called, address, active, lambda: room)


def test_known_peer_from_its_host_is_accepted() -> None:
    decision = call(settings())
    assert decision.accepted and decision.peer_name == "pacs"


def test_ipv4_mapped_ipv6_address_matches() -> None:
    assert call(settings(), address="::ffff:127.0.0.1").accepted


@pytest.mark.parametrize(
    ("kwargs", "reason", "rsd"),
    [
        ({"calling": "STRANGER"}, "calling-ae-not-recognised", (1, 1, 3)),
        ({"calling": "VIEWER"}, "calling-ae-may-not-send", (1, 1, 3)),
        ({"address": "10.1.2.3"}, "calling-host-not-recognised", (1, 1, 3)),
        ({"called": "SOMEONE"}, "called-ae-not-recognised", (1, 1, 7)),
        ({"active": 2}, "local-limit-exceeded", (2, 3, 2)),
        ({"room": False}, "disk-below-watermark", (2, 3, 1)),
    ],
)
def test_rejections_carry_the_proper_reason(kwargs, reason, rsd) -> None:
    decision = call(settings(), **kwargs)
    assert not decision.accepted
    assert decision.reason == reason
    assert (decision.result, decision.source, decision.diagnostic) == rsd


def test_accept_unknown_callers_skips_the_whitelist_only() -> None:
    cfg = settings(accept_unknown_callers=True)
    assert call(cfg, calling="STRANGER", address="10.9.9.9").accepted
    assert call(cfg, calling="STRANGER", called="OTHER").reason == "called-ae-not-recognised"


def test_called_ae_check_can_be_disabled() -> None:
    assert call(settings(require_called_ae_title=False), called="ANYTHING").accepted


def test_calling_ae_title_padding_is_not_significant() -> None:
    assert call(settings(), calling="PACS  ").accepted


@pytest.mark.parametrize(
    ("calling", "address", "reason"),
    [("VIEWER", "127.0.0.1", "calling-ae-may-not-send"), ("PACS", "10.9.9.9", "calling-host-not-recognised")],
)
def test_accept_unknown_callers_keeps_the_rules_of_known_peers(calling: str, address: str, reason: str) -> None:
    """Letting strangers in must not let a known peer's AE title in from any host, nor a may_send = false peer."""
    decision = call(settings(accept_unknown_callers=True), calling=calling, address=address)
    assert not decision.accepted and decision.reason == reason
    assert (decision.result, decision.source, decision.diagnostic) == (1, 1, 3)
