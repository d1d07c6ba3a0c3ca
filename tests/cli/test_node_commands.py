"""The admin's commands, run as the admin runs them: ``msknode config check``, ``echo``, ``studies``."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.dicomdata import make_instances
from tests.helpers.node import MSKNODE, REPO_ROOT, NodeConfig, NodeProcess, Peer, free_port
from tests.helpers.tools import start_storescp, storescu


def msknode(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "MSKNODE_CONFIG"}
    environment["COLUMNS"] = "250"  # rich wraps at 80 columns without a terminal
    environment.update(env or {})
    return subprocess.run([*MSKNODE, *args], capture_output=True, text=True, timeout=120, env=environment, cwd=cwd)


def test_config_check_accepts_a_good_file(tmp_path: Path) -> None:
    path = NodeConfig(directory=tmp_path).write()
    result = msknode("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "MSKNODE" in result.stdout


def test_config_check_names_the_key_path_of_every_problem(tmp_path: Path) -> None:
    config = NodeConfig(directory=tmp_path, peers=[Peer("a", "STORESCU"), Peer("b", "ECHOSCU")])
    text = config.write().read_text()
    # An unknown key inside the second peer, a misspelt key in [node], a value out of range.
    text = text.replace('name = "b"', 'name = "b"\nmay_sned = true')
    text = text.replace("[node]\n", "[node]\nmax_asociations = 4\n")
    text = text.replace(f"port = {config.port}", "port = 70000", 1)
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    result = msknode("config", "check", str(bad))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "peers[1].may_sned" in output and "unknown key" in output
    assert "node.max_asociations" in output
    assert "node.port" in output


def test_config_check_reports_a_file_that_is_not_toml(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("[node\nport = 1\n")
    result = msknode("config", "check", str(bad))
    assert result.returncode != 0
    assert "not valid TOML" in result.stdout + result.stderr


@pytest.mark.dcmtk
def test_studies_json_reads_the_database_named_by_msknode_config(node: NodeProcess, tmp_path: Path) -> None:
    files = make_instances(tmp_path / "in", 2)
    assert storescu(node.port, files).returncode == 0
    result = msknode("studies", "--json", env={"MSKNODE_CONFIG": str(node.config.path)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (study,) = json.loads(result.stdout)
    assert study["instances"] == 2
    assert study["status"] == "received"
    assert study["study_instance_uid"] == node.instances()[0].study_instance_uid
    assert study["last_received"] >= study["first_received"]
    # Without the variable (and run elsewhere) the embedded defaults apply: not this node's database, and a
    # read-only command neither creates one there nor pretends it is empty: it names the path it looked at.
    elsewhere = msknode("studies", "--json", cwd=tmp_path)
    assert elsewhere.returncode == 1 and elsewhere.stdout == ""
    assert "no database at" in elsewhere.stderr and str(tmp_path) in " ".join(elsewhere.stderr.split())
    assert not (tmp_path / "var").exists()


@pytest.mark.dcmtk
def test_echo_against_dcmtk_storescp_and_a_down_peer(tmp_path: Path) -> None:
    scp_port, down_port = free_port(), free_port()
    scp = start_storescp(tmp_path / "scp-out", scp_port, ae_title="STORESCP")
    try:
        config = NodeConfig(directory=tmp_path, peers=[
            Peer("pacs", "STORESCP", port=scp_port),
            Peer("down", "NOBODY", port=down_port),
        ])
        path = config.write()
        ok = msknode("echo", "pacs", "-c", str(path))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "success in" in ok.stdout and "ms" in ok.stdout and "STORESCP" in ok.stdout

        started = time.monotonic()
        down = msknode("echo", "down", "-c", str(path), "--timeout", "3")
        assert down.returncode == 1
        message = " ".join(down.stderr.split())
        assert "FAILED" in message and "peer down or unreachable: Connection refused" in message
        assert time.monotonic() - started < 60

        unknown = msknode("echo", "nosuchpeer", "-c", str(path))
        assert unknown.returncode != 0
        assert "no peer named 'nosuchpeer'" in unknown.stdout + unknown.stderr
    finally:
        scp.terminate()
        scp.wait(10)
