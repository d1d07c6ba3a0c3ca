"""Health probes, load-balancer TCP checks and port scans never cost a sender its association.

Found (issue #14, item 8): 15 ``/healthz`` calls in a row (each a bare TCP connect to the SCP, closed at
once) and the next PACS association was rejected "Local Limit Exceeded" — for the whole ACSE timeout, with
nothing in the log or the audit. Each closed connection kept its pynetdicom thread waiting for an
A-ASSOCIATE-RQ until the ACSE timeout, and pynetdicom's own ``maximum_associations`` check counted them.
"""

from __future__ import annotations

import logging
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.helpers.dicomdata import small_instance
from tests.helpers.node import NODE_AE, NodeProcess, free_port, wait_for, wait_for_port
from tests.helpers.tools import require_tool, storescu

pytestmark = pytest.mark.dcmtk


def _bare_connects(port: int, count: int) -> None:
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass


def test_probe_bursts_never_lock_out_the_pacs(node_factory, tmp_path: Path) -> None:
    """100 bare TCP connects and 100 ``/healthz`` calls, then DCMTK storescu: accepted at once."""
    require_tool("storescu")
    # The node's defaults for the limit and the ACSE timeout (10 associations, 30 s): what a site runs.
    node: NodeProcess = node_factory(roles=("receiver", "web"), web_port=free_port(), acse_timeout_seconds=30)
    wait_for_port("127.0.0.1", node.config.web_port, 60, node.process)
    _bare_connects(node.port, 100)
    for _ in range(100):  # 503 here (no worker role): the SCP check still runs, which is what matters
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.config.web_port}/healthz", timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            assert b'"scp"' in exc.read()
    source = tmp_path / "in.dcm"
    image = small_instance(seed=3)
    image.save_as(source, enforce_file_format=True)
    started = time.monotonic()
    result = storescu(node.port, [source])
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 10
    assert image.SOPInstanceUID in {row.sop_instance_uid for row in node.instances()}
    # the audit row is finished just after storescu has its A-RELEASE-RP (and may have exited): wait for it
    rows = [(row.calling_ae_title, row.outcome, row.reject_reason) for row in node.wait_for_associations_closed()]
    assert rows == [("STORESCU", "released", None)], rows  # probes are no associations, and nothing was rejected


def test_open_idle_connections_do_not_take_association_slots(node_factory, tmp_path: Path) -> None:
    """20 connections held open (a scanner, a load balancer keeping its checks open) with max_associations = 10."""
    require_tool("storescu")
    node: NodeProcess = node_factory(acse_timeout_seconds=30)
    held = [socket.create_connection(("127.0.0.1", node.port), timeout=5) for _ in range(20)]
    try:
        time.sleep(0.5)
        source = tmp_path / "in.dcm"
        small_instance(seed=4).save_as(source, enforce_file_format=True)
        result = storescu(node.port, [source])
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        for sock in held:
            sock.close()
    rows = [(row.calling_ae_title, row.outcome) for row in node.wait_for_associations_closed()]
    assert rows == [("STORESCU", "released")], rows


def test_a_rejection_sent_after_the_policy_accepted_is_logged_and_audited(in_process_node, caplog) -> None:
    """Should pynetdicom still reject in negotiation after our policy accepted (here it is made to, by a
    calling-AE list set on the running receiver's AE), the rejection is logged and audited as ``rejected``
    with pynetdicom's result/source/reason, never recorded as an abort or left ``open``."""
    node = in_process_node()
    node.receiver.ae.require_calling_aet = ["SOMEONE"]
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    with caplog.at_level(logging.WARNING, logger="msknode.receiver"):
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert assoc.is_rejected
        wait_for(lambda: [row for row in node.associations() if row.outcome != "open"], 10, "the audit row", 0.1)
    rows = [(row.calling_ae_title, row.outcome, row.reject_reason) for row in node.associations()]
    assert rows == [("PYSCU", "rejected", "negotiation-rejected-1-1-3")], rows
    assert "rejected association" in caplog.text and "negotiation-rejected-1-1-3" in caplog.text
