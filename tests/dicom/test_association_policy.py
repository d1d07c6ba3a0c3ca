"""Who may open an association, seen from real peers: the A-ASSOCIATE-RJ each one gets, the audit row,
and proof that a rejected association really carries nothing into the spool."""

from __future__ import annotations

import socket
import struct
import time

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode

from tests.helpers.dicomdata import make_instances, small_instance
from tests.helpers.node import DEFAULT_PEERS, NODE_AE, NodeConfig, NodeProcess, Peer
from tests.helpers.tools import echoscu, storescu

# PS3.8 9.3.4
PERMANENT, TRANSIENT = 1, 2
SOURCE_USER, SOURCE_PROVIDER_PRESENTATION = 1, 3
CALLING_AE_NOT_RECOGNISED, CALLED_AE_NOT_RECOGNISED = 3, 7
LOCAL_LIMIT_EXCEEDED = 2


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    """One node for the policy checks (each test looks only at its own peer's rows and instances).

    Besides the default peers it knows WARDSCU, configured on the loopback alias 127.0.0.2.
    """
    peers = [*DEFAULT_PEERS, Peer("ward", "WARDSCU", host="127.0.0.2")]
    node = NodeProcess(NodeConfig(directory=tmp_path_factory.mktemp("policy-node"), peers=peers)).start()
    yield node
    node.stop()


def assert_not_stored(node: NodeProcess, sop_instance_uid: str) -> None:
    assert sop_instance_uid not in {row.sop_instance_uid for row in node.instances()}
    assert not [path for path in node.spool_files() if sop_instance_uid in path.name]
    assert node.incoming_files() == []


def rows_for(node: NodeProcess, calling: str) -> list[tuple[str, str | None]]:
    return [(row.outcome, row.reject_reason) for row in node.associations() if row.calling_ae_title == calling]


@pytest.mark.dcmtk
def test_echoscu_is_answered_and_audited(node: NodeProcess) -> None:
    result = echoscu(node.port)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [r for r in node.wait_for_associations_closed() if r.calling_ae_title == "ECHOSCU"]
    assert [(r.outcome, r.instance_count, r.peer_name) for r in rows] == [("released", 0, "dcmtk-echoscu")]

    refused = echoscu(node.port, calling="NOBODY")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr


@pytest.mark.dcmtk
def test_unknown_calling_ae_is_rejected_permanently(node: NodeProcess, tmp_path) -> None:
    files = make_instances(tmp_path / "in", 1)
    result = storescu(node.port, files, calling="STRANGER1")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Association Rejected" in output
    assert "Rejected Permanent" in output and "Service User" in output
    assert "Calling AE Title Not Recognized" in output
    assert_not_stored(node, pydicom.dcmread(files[0]).SOPInstanceUID)
    (row,) = [r for r in node.associations() if r.calling_ae_title == "STRANGER1"]
    assert (row.outcome, row.reject_reason, row.peer_name) == ("rejected", "calling-ae-not-recognised", None)
    assert row.ended_at is not None


@pytest.mark.dcmtk
def test_wrong_called_ae_is_rejected_permanently(node: NodeProcess, tmp_path) -> None:
    files = make_instances(tmp_path / "in", 1)
    result = storescu(node.port, files, called="NOT-THE-NODE")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    assert_not_stored(node, pydicom.dcmread(files[0]).SOPInstanceUID)
    (row,) = [r for r in node.associations() if r.called_ae_title == "NOT-THE-NODE"]
    assert (row.outcome, row.reject_reason, row.peer_name) == ("rejected", "called-ae-not-recognised", "dcmtk-storescu")
    assert row.called_ae_title == "NOT-THE-NODE"


def test_known_ae_from_the_wrong_host_is_rejected(node: NodeProcess) -> None:
    """The peer is configured on 127.0.0.2; the same AE title from 127.0.0.1 is someone else."""
    ds = small_instance()
    ae = AE(ae_title="WARDSCU")
    ae.add_requested_context(ds.SOPClassUID, ImplicitVRLittleEndian)

    wrong = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE, bind_address=("127.0.0.1", 0))
    assert wrong.is_rejected
    primitive = wrong.acceptor.primitive
    assert (primitive.result, primitive.result_source, primitive.diagnostic) == (
        PERMANENT, SOURCE_USER, CALLING_AE_NOT_RECOGNISED,
    )
    assert_not_stored(node, ds.SOPInstanceUID)
    assert rows_for(node, "WARDSCU") == [("rejected", "calling-host-not-recognised")]

    # The loopback alias the peer is configured with is accepted: the check is on the address, not the AE.
    right = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE, bind_address=("127.0.0.2", 0))
    assert right.is_established
    try:
        assert right.send_c_store(ds).Status == 0x0000
    finally:
        right.release()
    assert ds.SOPInstanceUID in {row.sop_instance_uid for row in node.instances()}
    accepted = [r for r in node.wait_for_associations_closed() if r.calling_ae_title == "WARDSCU"][1:]
    assert [(r.peer_address, r.outcome, r.instance_count) for r in accepted] == [("127.0.0.2", "released", 1)]


# -- a peer that ignores the reject -----------------------------------------------------------------
def _ae_field(title: str) -> bytes:
    return title.encode("ascii").ljust(16)


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(calling: str, called: str, abstract_syntax: str, transfer_syntax: str) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing one presentation context (ID 1)."""
    application_context = _item(0x10, b"1.2.840.10008.3.1.1.1")
    presentation_context = _item(
        0x20,
        bytes([1, 0, 0, 0]) + _item(0x30, abstract_syntax.encode()) + _item(0x40, transfer_syntax.encode()),
    )
    user_information = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.1"))
    body = (
        struct.pack(">HH", 1, 0) + _ae_field(called) + _ae_field(calling) + bytes(32)
        + application_context + presentation_context + user_information
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(context_id: int, is_command: bool, payload: bytes) -> bytes:
    """One P-DATA-TF PDU with a single, last PDV (PS3.8 9.3.5, E.2)."""
    header = (0x01 if is_command else 0x00) | 0x02
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, header) + payload
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def c_store_rq(sop_class: str, sop_instance: str) -> bytes:
    command = Dataset()
    command.AffectedSOPClassUID = sop_class
    command.CommandField = 0x0001
    command.MessageID = 1
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = sop_instance
    body = encode(command, True, True)
    command.CommandGroupLength = len(body)
    return encode(command, True, True)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the node sends until it closes the connection; (data, closed)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received, True
            received += chunk
    except ConnectionResetError:
        return received, True
    except socket.timeout:
        return received, False


def test_a_rejected_peer_cannot_store_anything_by_ignoring_the_reject(node: NodeProcess) -> None:
    """After the A-ASSOCIATE-RJ the peer sends a complete C-STORE anyway: the node must not take it."""
    ds = small_instance()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(associate_rq("STRANGER2", NODE_AE, ds.SOPClassUID, ImplicitVRLittleEndian))
        reject = sock.recv(10)
        assert reject[:1] == b"\x03", "expected an A-ASSOCIATE-RJ PDU"
        assert (reject[7], reject[8], reject[9]) == (PERMANENT, SOURCE_USER, CALLING_AE_NOT_RECOGNISED)
        try:
            sock.sendall(
                p_data(1, True, c_store_rq(ds.SOPClassUID, ds.SOPInstanceUID))
                + p_data(1, False, encode(ds, True, True))
            )
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node had already closed the connection: even better
        received, closed = read_until_closed(sock, timeout=10)
    assert closed, "the node kept the connection open after rejecting the association"
    assert b"\x04" not in received[:1], "the node answered the C-STORE after rejecting the association"
    time.sleep(0.5)  # give a (wrongly) running handler time to write, so the checks below could catch it
    assert_not_stored(node, ds.SOPInstanceUID)
    assert rows_for(node, "STRANGER2") == [("rejected", "calling-ae-not-recognised")]


def test_a_c_store_pipelined_behind_a_rejected_request_is_dropped(node: NodeProcess) -> None:
    """The request and a whole C-STORE in one write, before any answer: the node rejects or aborts,
    and in either case stores nothing."""
    ds = small_instance()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(
            associate_rq("STRANGER3", NODE_AE, ds.SOPClassUID, ImplicitVRLittleEndian)
            + p_data(1, True, c_store_rq(ds.SOPClassUID, ds.SOPInstanceUID))
            + p_data(1, False, encode(ds, True, True))
        )
        received, closed = read_until_closed(sock, timeout=10)
    assert closed
    assert received[:1] in (b"\x03", b"\x07"), "expected A-ASSOCIATE-RJ or A-ABORT"
    time.sleep(0.5)
    assert_not_stored(node, ds.SOPInstanceUID)


def test_the_raw_peer_is_accepted_when_known(node: NodeProcess) -> None:
    """Control for the test above: the same hand-made PDUs from a known AE do store the instance."""
    ds = small_instance()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(associate_rq("PYSCU", NODE_AE, ds.SOPClassUID, ImplicitVRLittleEndian))
        assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC
        sock.recv(65536)
        sock.sendall(
            p_data(1, True, c_store_rq(ds.SOPClassUID, ds.SOPInstanceUID)) + p_data(1, False, encode(ds, True, True))
        )
        response = sock.recv(65536)
        assert response[:1] == b"\x04"  # P-DATA-TF carrying the C-STORE-RSP
        sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))  # A-RELEASE-RQ
        sock.recv(65536)
    assert ds.SOPInstanceUID in {row.sop_instance_uid for row in node.instances()}


# -- association limit -------------------------------------------------------------------------------
def test_association_limit_rejects_transiently_and_recovers(node_factory) -> None:
    """max_associations = 2: a third is rejected (transient, local limit), and accepted after a release.

    An idle TCP connection (a load balancer's health check) is open throughout the first two requests:
    it must not count as an association.
    """
    # A short ACSE timeout: the idle connection's thread otherwise holds up the node's shutdown for 10 s.
    node = node_factory(max_associations=2, acse_timeout_seconds=2)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(small_instance().SOPClassUID, ImplicitVRLittleEndian)
    with socket.create_connection(("127.0.0.1", node.port), timeout=10):
        held = [ae.associate("127.0.0.1", node.port, ae_title=NODE_AE) for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        third = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert third.is_rejected
        primitive = third.acceptor.primitive
        assert (primitive.result, primitive.result_source, primitive.diagnostic) == (
            TRANSIENT, SOURCE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED,
        )
        assert [r for r in rows_for(node, "PYSCU") if r[0] == "rejected"] == [("rejected", "local-limit-exceeded")]
        # The held associations still work while the limit is reached.
        assert held[0].send_c_store(small_instance(seed=1)).Status == 0x0000
    finally:
        held[0].release()
    deadline = time.monotonic() + 10
    while True:  # the node notices the release asynchronously
        again = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        if again.is_established or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert again.is_established, "a slot freed by a release was not given to the next caller"
    assert again.send_c_store(small_instance(seed=2)).Status == 0x0000
    again.release()
    held[1].release()
    assert node.instance_count() == 2
