"""Per-process settings of the roles: the worker's CPU priority ([engine] idle_priority / nice), so inference
never takes CPU from the receiver, and the receiver's pydicom value checks."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

import pytest

from pydicom import config as pydicom_config
from pydicom.uid import UID

from node.runtime.service import _skip_pydicom_value_warnings, _yield_cpu_to_intake

linux_only = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux only")


def _in_new_thread(action: Callable[[], object]) -> dict[str, object]:
    """Run ``action`` in a fresh thread (Linux keeps policy and nice per thread), then start a child thread
    from there, as torch starts its pool after the worker has lowered its priority."""
    seen: dict[str, object] = {}

    def child() -> None:
        seen["child_policy"] = os.sched_getscheduler(0)
        seen["child_nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def body() -> None:
        seen["before_nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        action()
        seen["policy"] = os.sched_getscheduler(0)
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        pool = threading.Thread(target=child)
        pool.start()
        pool.join()

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return seen


@linux_only
def test_idle_priority_puts_the_worker_and_its_later_threads_under_sched_idle() -> None:
    seen = _in_new_thread(lambda: _yield_cpu_to_intake(True, 10))
    assert seen["policy"] == os.SCHED_IDLE
    assert seen["child_policy"] == os.SCHED_IDLE
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the calling (test) thread is untouched


@linux_only
def test_without_idle_priority_the_worker_is_reniced() -> None:
    seen = _in_new_thread(lambda: _yield_cpu_to_intake(False, 5))
    assert seen["policy"] == os.SCHED_OTHER
    assert seen["nice"] == min(19, int(seen["before_nice"]) + 5)  # type: ignore[call-overload]
    assert seen["child_nice"] == seen["nice"]


@linux_only
def test_nice_zero_leaves_the_worker_as_it_was() -> None:
    seen = _in_new_thread(lambda: _yield_cpu_to_intake(False, 0))
    assert seen["policy"] == os.SCHED_OTHER
    assert seen["nice"] == seen["before_nice"]


def test_the_receiver_skips_pydicom_value_warnings_but_keeps_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.WARN)  # pydicom's default
    with pytest.warns(UserWarning):
        UID("1.2.3.abc")
    _skip_pydicom_value_warnings()
    assert pydicom_config.settings.reading_validation_mode == pydicom_config.IGNORE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uid = UID("1.2.3.abc")  # built without the regular expression's check, value unchanged
    assert uid == "1.2.3.abc" and not uid.is_valid
