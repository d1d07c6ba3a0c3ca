"""The spool's durability protocol and its UID-keyed, content-addressed paths."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from storage import spool as spool_module
from storage.spool import HashingWriter, Spool, is_valid_uid

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


def hashing_writer(spool: Spool, name: str = "rx-hashed.dcm") -> HashingWriter:
    return HashingWriter(open(spool.incoming / name, "wb"))


@pytest.mark.parametrize("total", [0, 100, 5 * 1024 * 1024 + 17])  # nothing; under one batch; many batches
def test_hashing_writer_digest_is_the_written_files(tmp_path: Path, total: int) -> None:
    spool = Spool(tmp_path / "spool")
    content = os.urandom(total)
    with hashing_writer(spool) as writer:
        offset, sizes = 0, [1, 4096, 131060, 700_000, 3]
        while offset < total:  # uneven chunks, bytes and bytearray alike
            size = sizes[offset % len(sizes)]
            chunk = content[offset:offset + size]
            writer.write(chunk if offset % 2 else bytearray(chunk))
            offset += size
        digest = writer.content_digest()
        assert digest == (hashlib.sha256(content).hexdigest(), total)
        assert writer.content_digest() == digest  # asked again, nothing written since
        assert (spool.incoming / "rx-hashed.dcm").read_bytes() == content  # flushed before the digest is given


def test_commit_with_the_writers_digest_does_not_read_the_file_back(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    content = os.urandom(3 * 1024 * 1024)
    with hashing_writer(spool) as writer:
        writer.write(content)
        digest = writer.content_digest()
    monkeypatch.setattr(spool_module, "sha256_of", lambda path: pytest.fail("the file was read back to hash it"))
    stored = spool.commit_file(spool.incoming / "rx-hashed.dcm", STUDY, SERIES, SOP, digest)
    assert stored.sha256 == hashlib.sha256(content).hexdigest() and stored.size == len(content)
    assert spool.absolute(stored.relative_path).read_bytes() == content


def test_a_digest_that_does_not_fit_the_file_is_not_trusted(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = incoming_file(spool, b"the bytes on disk")
    stored = spool.commit_file(path, STUDY, SERIES, SOP, ("0" * 64, 3))  # another size: hashed afresh
    assert stored.sha256 == hashlib.sha256(b"the bytes on disk").hexdigest()


def test_no_digest_once_the_bytes_were_not_written_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with hashing_writer(spool) as writer:
        writer.write(b"abcdef")
        writer.seek(0)
        writer.write(b"X")
        assert writer.content_digest() is None
    with hashing_writer(spool, "rx-later.dcm") as writer:
        writer.write(b"abc")
        assert writer.content_digest() is not None
        writer.write(b"def")  # after the digest: the file no longer matches it
        assert writer.content_digest() is None
    writer = hashing_writer(spool, "rx-closed-first.dcm")
    writer.write(os.urandom(3 * 1024 * 1024))
    writer.close()  # closed (a transfer given up) before anyone asked: no digest half-computed
    assert writer.content_digest() is None


def wait_until_no_file_is_being_hashed() -> None:
    deadline = time.monotonic() + 10
    while spool_module._HASHING_THREADS.busy:
        assert time.monotonic() < deadline, "a hashing thread is still busy with a finished file"
        time.sleep(0.01)


def test_abandoned_writers_free_their_hashing_threads(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    wait_until_no_file_is_being_hashed()
    closed = hashing_writer(spool, "rx-closed.dcm")
    closed.write(os.urandom(3 * 1024 * 1024))
    closed.close()  # a transfer cut short: closed, never asked for its digest
    dropped = hashing_writer(spool, "rx-dropped.dcm")
    dropped.write(os.urandom(3 * 1024 * 1024))
    del dropped  # dropped without close
    wait_until_no_file_is_being_hashed()


def test_hashing_threads_are_reused_from_file_to_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    wait_until_no_file_is_being_hashed()
    before = {thread for thread in threading.enumerate() if thread.name == "msknode-hash"}
    for number in range(10):
        with hashing_writer(spool, f"rx-{number}.dcm") as writer:
            writer.write(os.urandom(2 * 1024 * 1024))
            assert writer.content_digest() is not None
    started = {thread for thread in threading.enumerate() if thread.name == "msknode-hash"} - before
    assert len(started) <= 1
