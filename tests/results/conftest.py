"""Fixtures for the result-builder tests: strict pydicom writing and the DICOM validators."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom import config


@pytest.fixture(autouse=True)
def strict_writing() -> Iterator[None]:
    """Every dataset written in these tests must pass pydicom's VR checks (RAISE), as the brief asks."""
    before = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.RAISE
    try:
        yield
    finally:
        config.settings.writing_validation_mode = before
