"""Load, quick version: concurrent senders while the worker runs inference; every acknowledged instance is
stored exactly once (index and spool). Response times are measured by benchmarks/load.py, not asserted here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.models import tiny_model
from tests.reliability.harness import run_load

pytestmark = [pytest.mark.slow]


def test_concurrent_senders_during_inference_store_everything_exactly_once(tmp_path: Path) -> None:
    report = run_load(tmp_path, tiny_model(tmp_path / "tiny-model"), senders=4, per_sender=25, per_study=10,
                      size=128, warm_studies=2)
    print(report.table())
    assert report.failures == 0, report.table()
    assert report.acknowledged == report.indexed == report.spool_files == 4 * 25, report.table()
    assert report.missing == 0 and report.duplicate_sops == 0, report.table()
