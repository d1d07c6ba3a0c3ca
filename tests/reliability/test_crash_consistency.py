"""Crash consistency, quick seeded run: SIGKILL each role at a busy moment while studies flow, restart it, and
check that nothing acknowledged is lost, each study's results reach the PACS once, and no work is left stuck.

``make stress`` runs the same harness with 50+ kills (benchmarks/stress.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.models import tiny_model
from tests.reliability.harness import CrashRun

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]


def test_one_kill_of_each_role_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    run = CrashRun(tmp_path, tiny_model(tmp_path / "tiny-model"), seed=4, studies=10, images=3, kills=5,
                   senders=2, sender_kills=1, study_gap_seconds=3.0,
                   # Each role once, the receiver while studies still flow, then the sender, whose killed
                   # deliveries wait out their lease (about a minute) while the rest of the run goes on.
                   first_kills=("receiver", "sender", "worker", "scheduler"),
                   # The tiny model finishes a batch in a blink: hold each batch and each send a moment so the
                   # killer reliably finds the worker mid-batch and the sender mid-send.
                   faults="worker.before_finish=sleep:1,sender.before_send=sleep:0.3")
    report = run.run(timeout=240, quiesce_timeout=150)
    print(report.table())
    assert report.violations == [], report.table()
    assert set(report.kills) == {"receiver", "scheduler", "worker", "sender"}, report.kill_moments
    # The kills hit the moments they were aimed at, not idle roles (else the run proves little).
    assert any(moment.startswith("receiver (mid-association)") for moment in report.kill_moments), report.kill_moments
    assert any(moment.startswith("worker (mid-batch)") for moment in report.kill_moments), report.kill_moments
    assert report.acknowledged == report.stored == report.instances_sent
    assert report.sc_at_pacs == report.expected_sc == report.instances_sent
    assert report.duplicates == 0 and report.stuck == 0
