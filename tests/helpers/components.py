"""Required test components (DICOM tools, Orthanc, PostgreSQL, Chromium): skipped locally, failed under CI.

A test that needs a component the machine lacks skips with the reason (which Debian package provides it)
on a developer's machine; under CI (the ``CI`` environment variable set, as every CI service does) the same
absence is a failure, so a broken install can never turn into a green run of skipped tests.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """``CI`` is set to anything but an empty string, ``0`` or ``false``."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def component_missing(reason: str) -> NoReturn:
    """Skip the test naming ``reason``; under CI, fail it instead."""
    if in_ci():
        pytest.fail(f"{reason} — CI is set, so a missing component fails the run instead of skipping",
                    pytrace=False)
    pytest.skip(reason)


class ThreadFailures(AssertionError):
    """One or more test threads raised, or did not finish in time."""


def run_threads(targets: Iterable[Callable[[], object]], timeout: float = 120.0,
                name: str = "test-thread") -> list[object]:
    """Run each target in its own thread and wait for all; returns their results in order.

    A thread that raises, or is still running after ``timeout`` seconds (all threads together), fails the
    caller with every thread's exception (a bare ``Thread`` would print it and let the test pass).
    """
    targets = list(targets)
    results: list[object] = [None] * len(targets)
    errors: list[tuple[int, BaseException]] = []
    lock = threading.Lock()

    def runner(index: int, target: Callable[[], object]) -> None:
        try:
            results[index] = target()
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            with lock:
                errors.append((index, exc))

    threads = [threading.Thread(target=runner, args=(index, target), name=f"{name}-{index}", daemon=True)
               for index, target in enumerate(targets)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    unfinished = [thread.name for thread in threads if thread.is_alive()]
    if errors or unfinished:
        lines = [f"{threads[index].name}: {type(exc).__name__}: {exc}" for index, exc in sorted(errors, key=lambda e: e[0])]
        if unfinished:
            lines.append(f"still running after {timeout} s: {', '.join(unfinished)}")
        failure = ThreadFailures("\n".join(lines))
        if errors:
            raise failure from sorted(errors, key=lambda e: e[0])[0][1]
        raise failure
    return results
