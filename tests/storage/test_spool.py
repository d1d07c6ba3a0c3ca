"""The spool's durability protocol and its UID-keyed, content-addressed paths."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from storage.spool import Spool, is_valid_uid

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def incoming_file(spool: Spool, content: bytes, name: str = "rx-1.dcm") -> Path:
    path = spool.incoming / name
    path.write_bytes(content)
    return path


def test_commit_moves_into_uid_keyed_path(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    stored = spool.commit_file(incoming_file(spool, b"abc"), STUDY, SERIES, SOP)
    target = spool.absolute(stored.relative_path)
    assert stored.relative_path.startswith(f"{STUDY}/{SERIES}/{SOP}.")
    assert target.read_bytes() == b"abc"
    assert stored.size == 3 and len(stored.sha256) == 64
    assert list(spool.incoming.iterdir()) == []
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool.root.stat().st_mode) == 0o700


def test_identical_resend_is_not_stored_twice(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first = spool.commit_file(incoming_file(spool, b"same"), STUDY, SERIES, SOP)
    second = spool.commit_file(incoming_file(spool, b"same", "rx-2.dcm"), STUDY, SERIES, SOP)
    assert second.already_present and second.relative_path == first.relative_path
    assert len(list((spool.root / STUDY / SERIES).iterdir())) == 1


def test_different_bytes_get_their_own_path(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    first = spool.commit_file(incoming_file(spool, b"old"), STUDY, SERIES, SOP)
    second = spool.commit_file(incoming_file(spool, b"new", "rx-2.dcm"), STUDY, SERIES, SOP)
    assert first.relative_path != second.relative_path
    assert spool.absolute(first.relative_path).exists()  # removed only once the index moved on


def test_file_outside_incoming_is_copied_not_lost(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    elsewhere = tmp_path / "elsewhere.dcm"
    elsewhere.write_bytes(b"xyz")
    stored = spool.commit_file(elsewhere, STUDY, SERIES, SOP)
    assert spool.absolute(stored.relative_path).read_bytes() == b"xyz"
    assert not elsewhere.exists()


@pytest.mark.parametrize("uid", ["../../etc", "1.2.3/4", "", "1.2.a", "1" * 65])
def test_uids_that_are_not_uids_never_become_paths(tmp_path: Path, uid: str) -> None:
    spool = Spool(tmp_path / "spool")
    assert not is_valid_uid(uid)
    with pytest.raises(ValueError):
        spool.commit_file(incoming_file(spool, b"x"), uid, SERIES, SOP)


def test_sweep_removes_unacknowledged_partials(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    incoming_file(spool, b"partial")
    old = incoming_file(spool, b"older", "rx-old.dcm")
    os.utime(old, (0, 0))
    assert spool.sweep_incoming(older_than_seconds=3600) == 1
    assert spool.sweep_incoming() == 1
    assert list(spool.incoming.iterdir()) == []


def test_watermark(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert spool.has_room(0)
    assert not spool.has_room(spool.free_bytes() // (1024 * 1024) + 10_000)
