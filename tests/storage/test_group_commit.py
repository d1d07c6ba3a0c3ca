"""storage.group_commit: concurrent submitters share batches, and each still gets its own result or error."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from storage.group_commit import GroupCommitter


def test_concurrent_items_are_written_together_and_each_submitter_gets_its_own_result() -> None:
    batches: list[list[int]] = []
    first_batch_started = threading.Event()
    release_first_batch = threading.Event()

    def write(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:  # hold the first transaction so the others queue behind it
            first_batch_started.set()
            release_first_batch.wait(10)
        return [item * 10 for item in items]

    committer: GroupCommitter[int, int] = GroupCommitter(write, name="test-writer")
    results: dict[int, int] = {}

    def submit(item: int) -> None:
        results[item] = committer.submit(item)

    first = threading.Thread(target=submit, args=(0,))
    first.start()
    assert first_batch_started.wait(10)
    others = [threading.Thread(target=submit, args=(item,)) for item in range(1, 9)]
    for thread in others:
        thread.start()
    while committer._queue.qsize() < 8:  # all eight queued while the first batch is being written
        threading.Event().wait(0.01)
    release_first_batch.set()
    for thread in [first, *others]:
        thread.join(10)
    assert not [thread for thread in [first, *others] if thread.is_alive()], "a submitter never returned"
    assert results == {item: item * 10 for item in range(9)}  # and none raised (each stored its result)
    assert batches[0] == [0]
    assert sorted(batches[1]) == list(range(1, 9))  # one transaction for the eight that waited
    assert len(batches) == 2


def test_an_item_error_reaches_only_its_submitter() -> None:
    def write(items: Sequence[str]) -> list[str | BaseException]:
        return [ValueError(f"bad {item}") if item.startswith("bad") else item.upper() for item in items]

    committer: GroupCommitter[str, str] = GroupCommitter(write, name="test-writer")
    assert committer.submit("good") == "GOOD"
    with pytest.raises(ValueError, match="bad one"):
        committer.submit("bad one")
    assert committer.submit("still good") == "STILL GOOD"


def test_the_writer_survives_a_failing_batch() -> None:
    calls = []

    def write(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("database went away")
        return list(items)

    committer: GroupCommitter[int, int] = GroupCommitter(write, name="test-writer")
    with pytest.raises(RuntimeError, match="database went away"):
        committer.submit(1)
    assert committer.submit(2) == 2


def test_a_short_result_list_is_an_error_for_every_item() -> None:
    committer: GroupCommitter[int, int] = GroupCommitter(lambda items: [], name="test-writer")
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        committer.submit(1)
