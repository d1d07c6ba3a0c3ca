"""Configuration: one TOML file, one typed object, every problem reported with its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.settings import ConfigError, load_settings, parse_settings

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "msknode.toml"
    path.write_text(text)
    return path


def test_defaults_are_safe() -> None:
    settings = parse_settings({})
    assert settings.node.accept_unknown_callers is False
    assert settings.node.require_called_ae_title is True
    assert settings.node.max_pdu_size == 0
    assert settings.storage.database_url.startswith("sqlite:///")
    assert settings.peers == []


def test_shipped_configs_validate() -> None:
    for name in ("msknode.toml", "msknode.example.toml"):
        settings = load_settings(REPO / "config" / name)
        assert settings.node.ae_title


def test_unknown_key_is_an_error_naming_its_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[node]
ae_title = "MSKNODE"
accept_unknown_caller = true   # typo: must not silently leave the whitelist on its default
""",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert any(p.startswith("node.accept_unknown_caller:") and "unknown key" in p for p in info.value.problems)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[node]
port = 0
ae_title = "THIS-TITLE-IS-FAR-TOO-LONG"

[storage]
database_url = "mysql://nope"

[[peers]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
colour = "blue"

[[peers]]
name = "modality"
host = "127.0.0.1"
""",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    keys = {problem.split(":", 1)[0] for problem in info.value.problems}
    assert {"node.port", "node.ae_title", "storage.database_url", "peers[0].colour", "peers[1].ae_title"} <= keys


def test_duplicate_peer_names_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(
            {"peers": [{"name": "a", "ae_title": "A", "host": "127.0.0.1"}, {"name": "a", "ae_title": "B", "host": "127.0.0.1"}]}
        )
    assert "duplicate peer name" in str(info.value)


def test_peer_host_resolved_at_load() -> None:
    settings = parse_settings({"peers": [{"name": "pacs", "ae_title": "PACS", "host": "localhost"}]})
    assert "127.0.0.1" in settings.peers[0].addresses or "::1" in settings.peers[0].addresses


def test_unresolvable_peer_host_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"peers": [{"name": "pacs", "ae_title": "PACS", "host": "no-such-host.invalid"}]})
    assert info.value.problems[0].startswith("peers[0].host:")


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "[node\nport = 1"))
    assert "not valid TOML" in info.value.problems[0]


def test_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[node]\nae_title = "FROMENV"\n')
    monkeypatch.setenv("MSKNODE_CONFIG", str(path))
    assert load_settings().node.ae_title == "FROMENV"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def test_config_check_cli_reports_key_paths_and_fails(tmp_path: Path) -> None:
    bad = write(tmp_path, '[node]\nae_titel = "X"\n[storage]\nmin_free_disk_mb = -5\n')
    result = run_cli("config", "check", str(bad))
    assert result.returncode != 0
    assert "node.ae_titel" in result.stderr
    assert "storage.min_free_disk_mb" in result.stderr


def test_config_check_cli_accepts_the_default_file() -> None:
    result = run_cli("config", "check", "config/msknode.toml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
