"""Group commit: concurrent writers share one transaction, and so one fsync, without giving up durability.

Every association thread of the receiver must see its instance's index row committed before it answers
Success. Committed one by one, each row costs a synchronous commit (an fsync of SQLite's WAL, or of
PostgreSQL's) and, on SQLite, a turn on the single writer lock: with eight busy associations the commits
queue behind each other. Here one writer thread takes every record that was queued while the previous
transaction committed and writes them together; each submitter still waits until the transaction holding
its own record has committed (the technique PostgreSQL's own WAL writer uses, cf. ``commit_delay``).
There is no added delay: a record that arrives while the writer is idle is written at once, alone.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

WriteBatch = Callable[[Sequence[ItemT]], Sequence["ResultT | BaseException"]]


class GroupCommitter(Generic[ItemT, ResultT]):
    """Runs ``write_batch`` in one thread on batches of submitted items; ``submit`` blocks for its result.

    ``write_batch`` gets the items in submission order and returns, for each, its result or the exception
    that item's submitter should see (one bad item must not fail the others). At most ``max_batch`` items
    go into one call, so one transaction's latency stays bounded under any load.
    """

    def __init__(self, write_batch: WriteBatch[ItemT, ResultT], name: str, max_batch: int = 64) -> None:
        self._write_batch = write_batch
        self._name = name
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[ItemT, Future[ResultT]]] = queue.SimpleQueue()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._owner_pid = os.getpid()

    def submit(self, item: ItemT) -> ResultT:
        """Queue ``item`` and wait until the batch holding it is written; raise what ``write_batch`` gave it."""
        self._ensure_writer()
        future: Future[ResultT] = Future()
        self._queue.put((item, future))
        return future.result()

    def start(self) -> None:
        """Start the writer thread now rather than at the first submit (a server's idle thread count is then
        its working one)."""
        self._ensure_writer()

    def _ensure_writer(self) -> None:
        # Started on first use, and again in a process forked after that (threads do not survive a fork).
        if self._thread is not None and self._owner_pid == os.getpid() and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or self._owner_pid != os.getpid() or not self._thread.is_alive():
                if self._owner_pid != os.getpid():
                    self._queue = queue.SimpleQueue()
                    self._owner_pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [item for item, _ in batch]
            try:
                results: Sequence[ResultT | BaseException] = self._write_batch(items)
                if len(results) != len(items):
                    raise RuntimeError(f"write_batch returned {len(results)} results for {len(items)} items")
            except BaseException as exc:  # noqa: BLE001 - the writer thread must survive to serve the next batch
                log.exception("group commit %s failed for a batch of %d", self._name, len(items))
                results = [exc] * len(items)
            for (_, future), result in zip(batch, results):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
