"""Access control at the DICOM port, fuzzed; and the node's files closed to other local users.

300 association requests that each get one thing wrong (an unknown calling AE title, a wrong called AE
title, or a known AE title from a source address it is not configured on; 127.0.0.x loopback aliases need no
set-up on Linux) must all be refused, with nothing stored; every configured peer, from its own address, is
accepted. Then the spool's directories and files and the SQLite database (with its WAL files) must not be
readable by group or others after a real store.
"""

from __future__ import annotations

import random
import socket
import stat
import string
from collections import Counter
from collections.abc import Iterator

import pytest
from pydicom.uid import ImplicitVRLittleEndian

from tests.helpers.dicomdata import small_instance
from tests.helpers.node import DEFAULT_PEERS, NODE_AE, NodeConfig, NodeProcess, Peer
from tests.dicom.test_association_policy import associate_rq

PEERS = [*DEFAULT_PEERS, Peer("ward", "WARDSCU", host="127.0.0.2")]
KNOWN_TITLES = {peer.ae_title for peer in PEERS}
CASES_PER_KIND = 100
SEED = 6


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = NodeProcess(NodeConfig(directory=tmp_path_factory.mktemp("access"), peers=PEERS)).start()
    yield node
    node.stop()


def random_title(rng: random.Random) -> str:
    """1-16 printable characters (no backslash), never a known title once padding is stripped."""
    alphabet = string.ascii_letters + string.digits + " -_.*?%$#@!&"
    while True:
        kind = rng.randrange(4)
        known = rng.choice(sorted(KNOWN_TITLES))
        if kind == 0:
            title = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))
        elif kind == 1:  # case changed: AE titles are case-sensitive
            title = known.lower() if rng.random() < 0.5 else known.capitalize()
        elif kind == 2:  # a known title with a character added, dropped or replaced
            position = rng.randrange(len(known))
            title = (known[:position] + rng.choice(alphabet) + known[position + rng.randrange(2):])[:16]
        else:  # wildcard-looking and empty-looking titles
            title = rng.choice(["*", "ANY-SCP", "%", " " * 15 + "A", "PYSCU*", "?YSCU", "STORESCU2"])
        if title.strip() and title.strip() not in KNOWN_TITLES:
            return title


def request(port: int, calling: str, called: str, source: str = "127.0.0.1") -> bytes:
    """Send an A-ASSOCIATE-RQ from ``source``; returns the first 10 bytes of the answer (b"" if closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(associate_rq(calling, called, small_instance().SOPClassUID, ImplicitVRLittleEndian))
        answer = b""
        try:
            while len(answer) < 10:
                chunk = sock.recv(10 - len(answer))
                if not chunk:
                    break
                answer += chunk
        except ConnectionResetError:
            pass
        if answer[:1] == b"\x02":  # accepted: release politely
            sock.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    return answer


def test_unknown_callers_are_all_rejected_and_known_peers_accepted(node: NodeProcess) -> None:
    rng = random.Random(SEED)
    attempts: list[tuple[str, str, str, str]] = []  # (kind, calling, called, source)
    for _ in range(CASES_PER_KIND):
        attempts.append(("calling", random_title(rng), NODE_AE, "127.0.0.1"))
    for _ in range(CASES_PER_KIND):
        called = random_title(rng)
        while called.strip() == NODE_AE:
            called = random_title(rng)
        attempts.append(("called", rng.choice(["PYSCU", "STORESCU", "ECHOSCU"]), called, "127.0.0.1"))
    for _ in range(CASES_PER_KIND):
        peer = rng.choice(PEERS)
        source = peer.host
        while source == peer.host:
            source = f"127.0.{rng.randrange(0, 3)}.{rng.randrange(1, 255)}"
        attempts.append(("host", peer.ae_title, NODE_AE, source))

    outcomes: Counter[str] = Counter()
    accepted = []
    for kind, calling, called, source in attempts:
        answer = request(node.port, calling, called, source)
        outcome = {b"\x02": "accepted", b"\x03": "rejected", b"\x07": "aborted"}.get(answer[:1], "closed")
        outcomes[f"{kind}:{outcome}"] += 1
        if outcome == "accepted":
            accepted.append((kind, calling, called, source))
        elif outcome == "rejected":
            assert answer[7] == 1, f"a {kind} mismatch must be rejected permanently: {(calling, called, source)}"
    print(f"\nAE/host fuzz: {len(attempts)} unknown requests -> {dict(sorted(outcomes.items()))}")
    assert accepted == [], f"{len(accepted)} of {len(attempts)} unknown callers were accepted: {accepted[:5]}"
    assert outcomes["calling:rejected"] + outcomes["called:rejected"] + outcomes["host:rejected"] == len(attempts)

    # Every rejection is audited as one, and nothing was stored.
    rows = node.wait_for_associations_closed()
    assert Counter(row.outcome for row in rows) == Counter({"rejected": len(attempts)})
    assert Counter(row.reject_reason for row in rows) == Counter({
        "calling-ae-not-recognised": CASES_PER_KIND,
        "called-ae-not-recognised": CASES_PER_KIND,
        "calling-host-not-recognised": CASES_PER_KIND,
    })
    assert node.instance_count() == 0 and node.incoming_files() == []

    # Control: each configured peer, from its own address, is accepted.
    for peer in PEERS:
        assert request(node.port, peer.ae_title, NODE_AE, peer.host)[:1] == b"\x02", peer


def _group_or_world_bits(path) -> int:  # type: ignore[no-untyped-def]
    return stat.S_IMODE(path.stat().st_mode) & (stat.S_IRWXG | stat.S_IRWXO)


def test_spool_and_database_are_not_readable_by_others(node: NodeProcess) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(small_instance().SOPClassUID, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    assert assoc.send_c_store(small_instance(seed=11)).Status == 0x0000
    assoc.release()
    assert node.spool_files(), "nothing stored to check"

    loose = [
        f"{path} {stat.S_IMODE(path.stat().st_mode):04o}"
        for path in [node.spool, *node.spool.rglob("*")]
        if _group_or_world_bits(path)
    ]
    database = node.config.directory / "msknode.db"
    for path in [database, database.with_name("msknode.db-wal"), database.with_name("msknode.db-shm")]:
        if path.exists() and _group_or_world_bits(path):
            loose.append(f"{path} {stat.S_IMODE(path.stat().st_mode):04o}")
    assert loose == [], "readable by group/others: " + ", ".join(loose)
