"""CI must not hide a missing component (issue #14): under ``CI`` a missing DICOM tool, Orthanc, PostgreSQL or
Chromium fails the test instead of skipping it, the installer exits non-zero when an install fails, and
thread-based tests see their threads' exceptions and hangs."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import components, postgres, tools
from tests.helpers.components import ThreadFailures, component_missing, run_threads
from tests.helpers.node import REPO_ROOT

INSTALLER = REPO_ROOT / "tests" / "setup" / "install_debian_tools.sh"


@pytest.mark.parametrize(("value", "ci"), [("", False), ("0", False), ("false", False), ("true", True), ("1", True)])
def test_ci_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, ci: bool) -> None:
    monkeypatch.setenv("CI", value)
    assert components.in_ci() is ci


def test_a_missing_component_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="the reason"):
        component_missing("the reason")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="the reason"):
        component_missing("the reason")


def test_require_tool_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-dicom-tool not installed"):
        tools.require_tool("no-such-dicom-tool")


def test_orthanc_missing_fails_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.helpers import orthanc

    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(orthanc, "orthanc_binary", lambda: None)
    with pytest.raises(pytest.fail.Exception, match="Orthanc not installed"):
        orthanc.Orthanc(tmp_path, {})


def test_postgres_that_cannot_start_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(postgres, "find_bin_dir", lambda: None)
    with pytest.raises(pytest.fail.Exception, match="initdb not installed"):
        postgres.start_or_give_up()


def test_chromium_missing_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.web import conftest as web

    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(web, "CHROMIUM", Path("/nonexistent/chromium"))
    monkeypatch.setattr(web.shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="chromium not installed"):
        web.chromium_executable()


def test_dciodvfy_is_required_where_emitted_objects_are_checked(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from tests.results import helpers

    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(helpers.shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="dciodvfy not installed"):
        helpers.dciodvfy_errors(tmp_path / "x.dcm")


def test_no_test_passes_silently_without_a_tool() -> None:
    """No ``if shutil.which(...)`` around a check, no ``skipif(shutil.which(...))``: tools go through
    ``require_tool`` / ``component_missing``, which fail under CI."""
    offenders = []
    for path in sorted((REPO_ROOT / "tests").rglob("*.py")):
        if path.parent.name == "helpers" or path.name == "test_ci_components.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if ("shutil.which(" in stripped and (stripped.startswith(("if ", "@pytest.mark.skipif"))
                                                 or "skip" in stripped)) or (
                    "pytest.skip(" in stripped and "not installed" in stripped):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {stripped}")
    assert offenders == []


def _fake_bin(tmp_path: Path) -> Path:
    """A PATH with bash and coreutils but no DICOM tools, ``id -u`` = 0 and an apt-get that fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "ls", "cat", "env", "dirname"):
        os.symlink(f"/usr/bin/{tool}" if Path(f"/usr/bin/{tool}").exists() else f"/bin/{tool}", bin_dir / tool)
    (bin_dir / "id").write_text("#!/usr/bin/bash\necho 0\n")
    (bin_dir / "apt-get").write_text("#!/usr/bin/bash\necho 'E: Unable to locate package' >&2\nexit 100\n")
    for script in ("id", "apt-get"):
        (bin_dir / script).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("ci", [False, True], ids=["local", "CI"])
def test_the_installer_fails_under_ci_when_an_install_fails(tmp_path: Path, ci: bool) -> None:
    """The real installer, copied beside stand-ins for the scripts it calls (they install nothing here)."""
    setup = tmp_path / "setup"
    setup.mkdir()
    installer = setup / INSTALLER.name
    installer.write_text(INSTALLER.read_text())
    for sibling in INSTALLER.parent.glob("install_*.sh"):
        if sibling != INSTALLER:
            (setup / sibling.name).write_text("#!/usr/bin/env bash\nexit 0\n")
    env = {"PATH": str(_fake_bin(tmp_path)), **({"CI": "true"} if ci else {})}
    result = subprocess.run(["/usr/bin/bash", str(installer)], env=env, capture_output=True, text=True, timeout=60)
    assert "dcmtk" in result.stdout + result.stderr
    assert result.returncode == (1 if ci else 0), result.stdout + result.stderr


def test_run_threads_reports_exceptions_and_hangs() -> None:
    def boom() -> None:
        raise ValueError("in a thread")

    assert run_threads([lambda: 1, lambda: 2]) == [1, 2]
    with pytest.raises(ThreadFailures, match="ValueError: in a thread"):
        run_threads([lambda: 1, boom])
    with pytest.raises(ThreadFailures, match="still running"):
        run_threads([lambda: time.sleep(5)], timeout=0.2)
