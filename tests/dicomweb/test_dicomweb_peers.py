"""DICOMweb peers in the configuration, the CLI and the web: errors name the key; `msknode peers token` issues a
STOW-RS token a running node accepts at once (only its SHA-256 is stored)."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient
from requests.exceptions import HTTPError

from node.settings import ConfigError, parse_settings
from tests.cli.test_admin_commands import cli_in_process
from tests.helpers.dicomdata import small_instance
from tests.helpers.node import NodeConfig, NodeProcess, Peer, free_port, wait_for_port


def problems(**peer: object) -> list[str]:
    try:
        parse_settings({"peers": [{"name": "a", "ae_title": "A", "host": "127.0.0.1", **peer}]})
    except ConfigError as exc:
        return exc.problems
    return []


def test_dicomweb_peer_fields_are_validated_naming_the_key() -> None:
    assert problems(protocol="dicomweb") == [
        'peers[0].url: needed with protocol = "dicomweb" (e.g. "https://pacs.example.org/dicom-web")']
    assert problems(protocol="dicomweb", url="ftp://pacs/x")[0].startswith("peers[0].url: 'ftp://pacs/x'")
    assert problems(protocol="stow")[0].startswith("peers[0].protocol:")
    assert sorted(p.split(":")[0] for p in problems(auth="basic")) == ["peers[0].secret_file", "peers[0].username"]
    assert problems(auth="bearer")[0].startswith("peers[0].secret_file: needed")
    assert problems(stow_token_sha256="abc")[0].startswith("peers[0].stow_token_sha256:")
    assert problems(urll="http://x")[0].startswith("peers[0].urll: unknown key")
    assert problems(protocol="dicomweb", url="https://pacs.example.org/dicom-web/", auth="bearer",
                    secret_file="/etc/msknode/pacs-token") == []
    try:
        parse_settings({"dicomweb": {"tls": {"enabled": True}}})
    except ConfigError as exc:
        assert exc.problems[0].startswith("dicomweb: tls.certificate")


def test_cli_adds_edits_and_issues_a_token_that_a_running_node_accepts(tmp_path: Path) -> None:
    port = free_port()
    node = NodeProcess(NodeConfig(directory=tmp_path / "node", roles=("dicomweb",), dicomweb_port=port,
                                  peers=(Peer("pynetdicom", "PYSCU"),)))
    node.start()
    try:
        wait_for_port("127.0.0.1", port, 30, node.process)
        config = node.config.path
        result = cli_in_process("peers", "add", "vna", "--ae-title", "VNA", "--host", "127.0.0.1",
                                "--protocol", "dicomweb", "--receives-results", config=config)
        assert result.returncode != 0 and "url: needed" in result.stdout + result.stderr
        result = cli_in_process("peers", "add", "vna", "--ae-title", "VNA", "--host", "127.0.0.1", "--protocol",
                                "dicomweb", "--url", "https://vna.example.org/dicom-web", "--auth", "basic",
                                "--username", "msknode", "--secret-file", str(tmp_path / "pw"), "--receives-results",
                                config=config)
        assert result.returncode == 0, result.stdout + result.stderr
        result = cli_in_process("peers", "edit", "vna", "--auth", "bearer", "--no-verify-tls", config=config)
        assert result.returncode == 0, result.stdout + result.stderr

        client = lambda token: DICOMwebClient(f"http://127.0.0.1:{port}/dicom-web",  # noqa: E731
                                              headers={"Authorization": f"Bearer {token}"})
        with pytest.raises(HTTPError):
            client("anything").store_instances([small_instance(seed=1)])
        result = cli_in_process("peers", "token", "vna", config=config)
        assert result.returncode == 0, result.stdout + result.stderr
        token = result.stdout.splitlines()[1].strip()
        digest = re.search(r'stow_token_sha256 = "([0-9a-f]{64})"', result.stdout).group(1)
        assert hashlib.sha256(token.encode()).hexdigest() == digest
        listed = cli_in_process("peers", "list", "--json", config=config)
        (vna,) = [p for p in __import__("json").loads(listed.stdout) if p["name"] == "vna"]
        assert (vna["protocol"], vna["auth"], vna["verify_tls"], vna["stow_token_sha256"]) == (
            "dicomweb", "bearer", False, digest)
        assert token not in listed.stdout and token not in (tmp_path / "node" / "msknode.db").read_bytes().decode(
            "latin-1")

        deadline = time.monotonic() + 15  # the running node's peer snapshot refreshes every 2 s
        while True:
            try:
                response = client(token).store_instances([small_instance(seed=2)])
                break
            except HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert len(response.ReferencedSOPSequence) == 1
        assert [row.calling_ae_title for row in node.instances()] == ["VNA"]
    finally:
        node.stop()
