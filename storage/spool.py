"""The spool: a plain directory tree of received instances keyed by UIDs.

Durability protocol for every instance (so that a success status is never sent for a file that a crash
or power cut could lose):

1. the bytes are written under a temporary name inside ``<spool>/.incoming`` (same filesystem);
2. the file is fsynced;
3. it is renamed atomically to ``<spool>/<study>/<series>/<sop>.<sha256[:16]>.dcm``;
4. the destination directory is fsynced, so that the rename itself is durable.

The content hash in the name means an identical re-send maps to the same path (no second copy), and a
replacement with different bytes gets its own path, so the old copy stays valid until the index points
at the new one.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

INCOMING_DIR = ".incoming"
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_HASH_CHUNK = 1 << 20
# HashingWriter hands the bytes written to its hashing thread in batches of about this size, and holds at most
# _HASH_QUEUE_BATCHES of them before a write waits for the thread (bounded memory whatever the sender's pace).
_HASH_BATCH_BYTES = 1 << 20
_HASH_QUEUE_BATCHES = 8


class SpoolError(Exception):
    """The spool cannot take the instance (not a problem with the instance itself)."""


def is_valid_uid(uid: str) -> bool:
    """PS3.5 9.1: digits and dots, at most 64 characters. Anything else must not become a path."""
    return 0 < len(uid) <= 64 and bool(_UID_RE.match(uid))


def sha256_of(path: Path) -> tuple[str, int]:
    """Hash a file in chunks (never holding it in memory); returns (hex digest, size)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(_HASH_CHUNK)
        view = memoryview(buffer)
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
            size += count
    return digest.hexdigest(), size


ContentDigest = tuple[str, int]  # (SHA-256 hex digest, size in bytes) of a file's whole content


def _hash_batches(batches: "queue.Queue[list[bytes] | None]", digest: "hashlib._Hash") -> None:
    """Hash each batch in order until the end marker (``None``)."""
    while (batch := batches.get()) is not None:
        for chunk in batch:
            digest.update(chunk)  # releases the GIL for all but tiny chunks


class _HashingThreads:
    """Daemon threads that hash files as they are written, one file at a time each, kept for the next file.

    A thread per file cost ~2 ms of the sender's wait under load (``Thread.start`` waits until the new thread has
    run). Daemon threads: one waiting for an abandoned file's next batch never holds up the process's exit.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[queue.Queue[list[bytes] | None], hashlib._Hash, threading.Event]] = (
            queue.SimpleQueue())
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def hash(self, batches: "queue.Queue[list[bytes] | None]", digest: "hashlib._Hash", done: threading.Event) -> None:
        """Hash ``batches`` into ``digest`` in a thread of the pool; ``done`` is set after the end marker."""
        with self._lock:
            start = self._idle == 0
            if start:
                self._threads += 1
            else:
                self._idle -= 1
        self._jobs.put((batches, digest, done))
        if start:  # every thread is busy with a file: one more (there are never more threads than files at once)
            threading.Thread(target=self._work, name="msknode-hash", daemon=True).start()

    @property
    def busy(self) -> int:
        """Threads hashing a file now."""
        with self._lock:
            return self._threads - self._idle

    def _work(self) -> None:
        while True:
            batches, digest, done = self._jobs.get()
            try:
                _hash_batches(batches, digest)
            finally:
                with self._lock:
                    self._idle += 1
                done.set()


_HASHING_THREADS = _HashingThreads()


class HashingWriter:
    """A binary file being written, SHA-256-hashed as it is written by a thread of a pool.

    Hashing a received file after it was written meant reading every byte back and hashing it while the sender
    waited for its answer (about 7 ms per 10 MB here). Here each written chunk is also handed, in batches of
    ``_HASH_BATCH_BYTES``, to a pool thread that hashes it while the writer's thread receives the next one
    (hashlib releases the GIL), so at the end only the last batch is left to hash. :meth:`content_digest` gives the digest of everything written, and only when
    every byte went through :meth:`write` in order (``None`` after a seek or truncate: the caller then hashes
    the file itself). The chunks written must not change afterwards (``bytes``; anything else is copied).
    """

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.name: str = handle.name  # type: ignore[assignment]
        self._size = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._in_order = True
        self._result: ContentDigest | None = None
        self._digest = hashlib.sha256()
        self._batches: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=_HASH_QUEUE_BATCHES)
        self._hashed = threading.Event()
        self._hashing = False
        # A writer dropped without close() (its transfer abandoned) still frees its hashing thread.
        self._finalizer = weakref.finalize(self, _end_hashing, self._batches)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        chunk = data if isinstance(data, bytes) else bytes(data)
        written = self._handle.write(chunk)
        if self._in_order and self._result is None and written == len(chunk):
            self._size += len(chunk)
            self._pending.append(chunk)
            self._pending_bytes += len(chunk)
            if self._pending_bytes >= _HASH_BATCH_BYTES:
                self._hand_over()
        else:
            self._in_order = False
        return written

    def _hand_over(self) -> None:
        if not self._hashing:
            self._hashing = True
            _HASHING_THREADS.hash(self._batches, self._digest, self._hashed)
        self._batches.put(self._pending)
        self._pending, self._pending_bytes = [], 0

    def seek(self, *args: int) -> int:
        self._in_order = False
        return self._handle.seek(*args)

    def truncate(self, size: int | None = None) -> int:
        self._in_order = False
        return self._handle.truncate(size)

    def tell(self) -> int:
        return self._handle.tell()

    def fileno(self) -> int:
        return self._handle.fileno()

    def flush(self) -> None:
        self._handle.flush()

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def content_digest(self) -> ContentDigest | None:
        """(SHA-256, size) of everything written so far, after flushing it to the file; ends the hashing.

        ``None`` when the bytes did not all go through :meth:`write` in order. A write after this call makes
        the file differ from the digest, so later calls give ``None``.
        """
        if not self._in_order:
            return None
        if self._result is not None:
            return self._result
        if not self._handle.closed:
            self._handle.flush()
        if not self._hashing:  # under one batch in all: hash it here
            for chunk in self._pending:
                self._digest.update(chunk)
        else:
            if self._pending:
                self._batches.put(self._pending)
            self._batches.put(None)
            self._hashed.wait()
        self._pending, self._pending_bytes = [], 0
        self._result = (self._digest.hexdigest(), self._size)
        return self._result

    def close(self) -> None:
        """Close the file; the digest is no longer computed (unless :meth:`content_digest` was called before)."""
        if self._result is None:
            self._in_order = False
        self._finalizer()  # the hashing thread is freed (its queue gets the end marker)
        self._handle.close()

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _end_hashing(batches: "queue.Queue[list[bytes] | None]") -> None:
    try:
        batches.put_nowait(None)
    except queue.Full:  # the thread is still busy: make room, it only needs to see the end marker
        try:
            while True:
                batches.get_nowait()
        except queue.Empty:
            pass
        batches.put_nowait(None)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dirs(directory: Path) -> None:
    """``mkdir -p`` with every created level 0700 (``Path.mkdir(parents=True)`` leaves parents at the umask).

    Spooled instances carry patient data: no directory of the spool may be listable by other local users.
    """
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # another receiver thread made it first
            continue
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask; 0700 must hold regardless


@dataclass(frozen=True)
class StoredFile:
    relative_path: str
    sha256: str
    size: int
    already_present: bool  # identical bytes were already at that path


class Spool:
    """A spool directory. Thread-safe: every operation works on distinct paths or is atomic."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = Path(root).resolve()
        self.fsync = fsync
        self.incoming = self.root / INCOMING_DIR
        make_private_dirs(self.incoming)
        os.chmod(self.root, 0o700)

    # -- space -------------------------------------------------------------------------------
    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_room(self, min_free_mb: int) -> bool:
        return self.free_bytes() >= min_free_mb * 1024 * 1024

    # -- paths -------------------------------------------------------------------------------
    def relative_path_for(self, study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> str:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise ValueError(f"not a valid UID for a spool path: {uid!r}")
        return f"{study_uid}/{series_uid}/{sop_uid}.{sha256[:16]}.dcm"

    def absolute(self, relative_path: str) -> Path:
        return self.root / relative_path

    # -- writing -----------------------------------------------------------------------------
    def commit_file(self, temp_path: Path, study_uid: str, series_uid: str, sop_uid: str,
                    content_digest: ContentDigest | None = None) -> StoredFile:
        """Make ``temp_path`` durable under its UID-keyed name; ``temp_path`` is consumed.

        ``temp_path`` should live in :attr:`incoming` (same filesystem) so the move is a rename; any
        other location is copied first. ``content_digest``: the file's (SHA-256, size) when its writer hashed it
        already (:class:`HashingWriter`); it is used only if the file's size on disk matches, else the file is
        hashed here.
        """
        if content_digest is not None and os.stat(temp_path).st_size == content_digest[1]:
            sha256, size = content_digest
        else:
            sha256, size = sha256_of(temp_path)
        relative = self.relative_path_for(study_uid, series_uid, sop_uid, sha256)
        destination = self.root / relative
        if destination.exists():
            # Identical bytes (same content hash) already stored: nothing to write.
            temp_path.unlink(missing_ok=True)
            return StoredFile(relative, sha256, size, already_present=True)
        directory = destination.parent
        created_directories = not directory.exists()
        make_private_dirs(directory)
        if temp_path.parent != self.incoming:
            staged = self.incoming / f"{sop_uid}.{os.getpid()}.{time.monotonic_ns()}.part"
            shutil.copyfile(temp_path, staged)
            temp_path.unlink(missing_ok=True)
            temp_path = staged
        os.chmod(temp_path, 0o600)
        if self.fsync:
            fsync_file(temp_path)
        try:
            os.replace(temp_path, destination)
        except OSError as exc:
            if exc.errno != getattr(os, "EXDEV", 18):
                raise
            shutil.copyfile(temp_path, destination)
            temp_path.unlink(missing_ok=True)
            if self.fsync:
                fsync_file(destination)
        if self.fsync:
            fsync_dir(directory)
            if created_directories:  # the new directory entries must be durable too
                fsync_dir(directory.parent)
                fsync_dir(self.root)
        return StoredFile(relative, sha256, size, already_present=False)

    def write_result(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> str:
        """Durably write an object the node built; a retry with identical bytes rewrites the same path."""
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise ValueError(f"not a valid UID for a spool path: {uid!r}")
        relative = f"results/{study_uid}/{series_uid}/{sop_uid}.dcm"
        destination = self.root / relative
        directory = destination.parent
        make_private_dirs(directory)
        staged = self.incoming / f"out-{sop_uid}.{os.getpid()}.{time.monotonic_ns()}.part"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(staged, destination)
        if self.fsync:
            fsync_dir(directory)
        return relative

    def remove(self, relative_path: str) -> None:
        """Delete a stored file (used when the index refused it, so nothing is left orphaned)."""
        path = self.root / relative_path
        path.unlink(missing_ok=True)
        if self.fsync and path.parent.exists():
            fsync_dir(path.parent)

    def sweep_incoming(self, older_than_seconds: float = 0.0, only_prefix: str | None = None,
                       skip_prefix: str | None = None) -> int:
        """Remove temporary files left by interrupted transfers (never acknowledged, so never lost).

        ``only_prefix`` / ``skip_prefix``: each intake role sweeps its own partial files only (the dicomweb role
        names its ``stow-…``; the receiver leaves those to it), so a role restarting never pulls a file from
        under a transfer another role is writing.
        """
        removed = 0
        cutoff = time.time() - older_than_seconds
        for entry in self.incoming.iterdir():
            if (only_prefix is not None and not entry.name.startswith(only_prefix)) or (
                    skip_prefix is not None and entry.name.startswith(skip_prefix)):
                continue
            try:
                if entry.is_file() and entry.stat().st_mtime <= cutoff:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
