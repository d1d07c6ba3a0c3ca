"""Overlay rendering: colormap, layout limits, refusal of mismatched inputs."""

from __future__ import annotations

import numpy as np
import pytest

from node.results.render import MAX_LONG_SIDE, hot, plan_layout, render_error_map


def test_hot_colormap_runs_from_black_to_white_with_rising_brightness():
    ramp = hot(np.linspace(0.0, 1.0, 256)).astype(int)
    assert ramp[0].tolist() == [11, 0, 0] and ramp[-1].tolist() == [255, 255, 255]
    assert np.all(np.diff(ramp.sum(axis=1)) >= 0)
    assert np.all(np.diff(ramp, axis=0) >= 0), "each channel only rises"


@pytest.mark.parametrize("rows, columns", [(2048, 1640), (1640, 2048), (2048, 2048), (12, 300), (300, 12), (1, 1)])
def test_layout_fits_the_long_side_and_keeps_the_aspect(rows, columns):
    layout = plan_layout(rows, columns)
    assert max(layout.height, layout.width) <= MAX_LONG_SIDE
    assert layout.banner_rows >= 22 and layout.bar_rows >= 18
    expected_rows = layout.width * rows / columns
    assert abs(layout.image_rows - expected_rows) <= 1 or layout.image_rows == 1


def test_render_returns_the_planned_canvas_and_refuses_mismatched_maps():
    display = np.full((300, 200), 100, dtype=np.uint8)
    canvas, layout = render_error_map(display, np.zeros((300, 200), np.float32), "m", "1")
    assert canvas.shape == (layout.height, layout.width, 3) and canvas.dtype == np.uint8
    # A flat zero map leaves the radiograph untouched.
    assert np.all(canvas[layout.image_top: layout.bar_top] == 100)
    with pytest.raises(ValueError):
        render_error_map(display, np.zeros((200, 300), np.float32), "m", "1")
