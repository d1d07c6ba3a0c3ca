"""DICOM TLS end to end: DCMTK echoscu/storescu against our SCP, our SCU (sender, echo) against DCMTK storescp.

A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate are made in the test
with the openssl command line. Mutual TLS: a client without a certificate is refused; plain TCP to a TLS
port fails cleanly and leaves the node serving.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.dicom.scu import echo
from node.settings import PeerSettings, TlsSettings, parse_settings
from node.dicom.tls import TlsConfigError, client_tls_args, server_context
from tests.helpers.dicomdata import make_instances
from tests.helpers.node import NODE_AE, NodeConfig, NodeProcess, free_port
from tests.helpers.pki import Pki, make_pki
from tests.helpers.tools import require_tool

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require_tool("storescu")
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_node(directory: Path, pki: Pki, *, mutual: bool) -> NodeProcess:
    config = NodeConfig(directory=directory)
    config.write()
    tls = [
        "", "[node.tls]", "enabled = true", f'certificate = "{pki.server_cert}"', f'private_key = "{pki.server_key}"',
        f'ca_certificates = "{pki.ca}"', f"require_client_certificate = {'true' if mutual else 'false'}",
    ]
    original = config.write

    def write_with_tls() -> Path:  # NodeConfig has no TLS fields: append the section to what it writes
        path = original()
        text = path.read_text().replace("\n[storage]", "\n".join(tls) + "\n\n[storage]", 1)
        path.write_text(text)
        return path

    config.write = write_with_tls  # type: ignore[method-assign]
    return NodeProcess(config).start()


@pytest.fixture(scope="module")
def mutual_node(tmp_path_factory: pytest.TempPathFactory, pki: Pki):
    node = tls_node(tmp_path_factory.mktemp("tls-mutual"), pki, mutual=True)
    yield node
    node.stop()


def dcmtk_tls(tool: str, port: int, *, key: Path | None, cert: Path | None, ca: Path, calling: str,
              files: list[Path] = ()) -> subprocess.CompletedProcess[str]:  # type: ignore[assignment]
    require_tool(tool)
    identity = ["+tls", str(key), str(cert)] if key else ["+tla"]
    args = [tool, "-aet", calling, "-aec", NODE_AE, "-to", "10", "-ta", "10", "-td", "10", *identity,
            "+cf", str(ca), "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_dcmtk_echoscu_and_storescu_over_mutual_tls(mutual_node: NodeProcess, pki: Pki, tmp_path: Path) -> None:
    echoed = dcmtk_tls("echoscu", mutual_node.port, key=pki.client_key, cert=pki.client_cert, ca=pki.ca,
                       calling="ECHOSCU")
    assert echoed.returncode == 0, echoed.stdout + echoed.stderr

    files = make_instances(tmp_path / "in", 3)
    stored = dcmtk_tls("storescu", mutual_node.port, key=pki.client_key, cert=pki.client_cert, ca=pki.ca,
                       calling="STORESCU", files=files)
    assert stored.returncode == 0, stored.stdout + stored.stderr
    sent = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert sent <= {row.sop_instance_uid for row in mutual_node.instances()}


def test_client_without_certificate_is_refused_under_mutual_tls(mutual_node: NodeProcess, pki: Pki) -> None:
    anonymous = dcmtk_tls("echoscu", mutual_node.port, key=None, cert=None, ca=pki.ca, calling="ECHOSCU")
    assert anonymous.returncode != 0
    # A certificate from a CA the node does not trust is refused the same way.
    stranger = dcmtk_tls("echoscu", mutual_node.port, key=pki.stranger_key, cert=pki.stranger_cert, ca=pki.ca,
                         calling="ECHOSCU")
    assert stranger.returncode != 0
    # Our own SCU with the client certificate is accepted (and the node still serves after the refusals).
    settings = TlsSettings(enabled=True, certificate=pki.client_cert, private_key=pki.client_key,
                           ca_certificates=pki.ca)
    peer = PeerSettings(name="node", ae_title=NODE_AE, host="127.0.0.1", port=mutual_node.port)
    result = echo("PYSCU", peer, timeout=10, tls_args=client_tls_args(settings, "127.0.0.1"))
    assert result.ok, result.error


def test_plain_tcp_to_the_tls_port_fails_cleanly(mutual_node: NodeProcess, pki: Pki) -> None:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    assoc = ae.associate("127.0.0.1", mutual_node.port, ae_title=NODE_AE)
    assert not assoc.is_established
    # A TCP client that connects and says nothing does not stop others from shaking hands meanwhile.
    with socket.create_connection(("127.0.0.1", mutual_node.port)):
        echoed = dcmtk_tls("echoscu", mutual_node.port, key=pki.client_key, cert=pki.client_cert, ca=pki.ca,
                           calling="ECHOSCU")
    assert echoed.returncode == 0, echoed.stdout + echoed.stderr
    assert mutual_node.running()


def test_our_scu_refuses_a_server_it_cannot_verify(mutual_node: NodeProcess, pki: Pki) -> None:
    """verify_peer checks the destination's certificate against ca_certificates (and its host name)."""
    wrong_trust = TlsSettings(enabled=True, certificate=pki.client_cert, private_key=pki.client_key,
                              ca_certificates=pki.stranger_cert)
    peer = PeerSettings(name="node", ae_title=NODE_AE, host="127.0.0.1", port=mutual_node.port)
    result = echo("PYSCU", peer, timeout=10, tls_args=client_tls_args(wrong_trust, "127.0.0.1"))
    assert not result.ok


def test_sender_delivers_to_dcmtk_storescp_over_tls(pki: Pki, tmp_path: Path) -> None:
    from node.delivery.sender import Sender
    from storage.db import Database
    from storage.migrate import upgrade
    from storage.outbox import Outbox
    from storage.spool import Spool
    from tests.delivery.test_sender import queue_item, row

    require_tool("storescp")
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    storescp = subprocess.Popen(
        ["storescp", "-aet", "PACS", "+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca),
         "-od", str(received), str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"sqlite:///{tmp_path / 'sender.db'}"
    upgrade(url)
    database = Database(url)
    try:
        _wait_for_listener(port, storescp)
        spool = Spool(tmp_path / "spool", fsync=False)
        settings = parse_settings({
            "sender": {"tls": {"enabled": True, "certificate": str(pki.client_cert),
                               "private_key": str(pki.client_key), "ca_certificates": str(pki.ca)},
                       "timeout_seconds": 10},
            "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port,
                       "receives_results": True, "tls": True}],
        })
        item_id = queue_item(database, spool)
        sender = Sender("MSKNODE", lambda: settings.peers, Outbox(database), spool, settings.sender)
        assert sender.run_once() == 1
        assert row(database, item_id).state == "delivered", row(database, item_id).last_error
        assert len(list(received.iterdir())) == 1
    finally:
        database.dispose()
        storescp.terminate()
        storescp.wait(10)


def test_readable_private_key_is_refused_with_its_key_name(pki: Pki, tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(pki.server_key.read_bytes())
    os.chmod(loose, 0o644)
    settings = TlsSettings(enabled=True, certificate=pki.server_cert, private_key=loose)
    with pytest.raises(TlsConfigError, match=r"node\.tls\.private_key: .* mode 0644"):
        server_context(settings)
    os.chmod(loose, 0o600)
    context = server_context(settings)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_tls_settings_errors_name_the_key(pki: Pki) -> None:
    from node.settings import ConfigError

    with pytest.raises(ConfigError, match=r"node: .*tls\.certificate"):
        parse_settings({"node": {"tls": {"enabled": True}}})
    with pytest.raises(ConfigError, match=r"peers\[0\]\.tls"):
        parse_settings({"peers": [{"name": "p", "ae_title": "P", "host": "127.0.0.1", "tls": True}]})
    with pytest.raises(TlsConfigError, match=r"sender\.tls\.ca_certificates"):
        client_tls_args(TlsSettings(enabled=True), "127.0.0.1")


# -- helpers ---------------------------------------------------------------------------------------------
def _wait_for_listener(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, storescp_output(process)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("storescp did not listen")


def storescp_output(process: subprocess.Popen[bytes]) -> str:
    if process.poll() is None:
        process.terminate()
    out, _ = process.communicate(timeout=10)
    return out.decode(errors="replace")


def test_serve_refuses_to_start_with_a_readable_key(pki: Pki, tmp_path: Path) -> None:
    """The key check runs before any role starts: `msknode serve` exits 2 naming the key, nothing listens."""
    loose = tmp_path / "loose.key"
    loose.write_bytes(pki.server_key.read_bytes())
    os.chmod(loose, 0o640)
    config = tmp_path / "msknode.toml"
    config.write_text(
        f'[node]\nport = {free_port()}\nhost = "127.0.0.1"\n[node.tls]\nenabled = true\n'
        f'certificate = "{pki.server_cert}"\nprivate_key = "{loose}"\n'
        f'[storage]\ndatabase_url = "sqlite:///{tmp_path / "db.sqlite"}"\nspool_dir = "{tmp_path / "spool"}"\n'
    )
    from tests.helpers.node import MSKNODE, REPO_ROOT

    for command in (["serve", "-c", str(config)], ["config", "check", str(config)]):
        result = subprocess.run([*MSKNODE, *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert "node.tls.private_key" in result.stdout + result.stderr and "0640" in result.stdout + result.stderr
