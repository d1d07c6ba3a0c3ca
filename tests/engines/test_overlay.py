"""Error-map overlay: hot colormap, blending, colour bar, PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engines.imaging.overlay import hot_colormap, render_overlay, save_overlay_png


def test_hot_colormap_runs_black_red_yellow_white_with_rising_lightness():
    ramp = hot_colormap(np.linspace(0, 1, 101))
    assert ramp[0] == pytest.approx([0.0416, 0, 0], abs=1e-3)
    assert ramp[-1] == pytest.approx([1, 1, 1])
    assert ramp[50, 0] == 1.0 and ramp[50, 2] == 0.0  # red saturated before green, blue last
    lightness = ramp @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(lightness) >= 0)
    assert hot_colormap(np.array([-1.0, 2.0])).tolist() == hot_colormap(np.array([0.0, 1.0])).tolist()


def _image() -> np.ndarray:
    return np.tile(np.linspace(0, 255, 300, dtype=np.float64), (200, 1)).astype(np.uint8)


def test_overlay_highlights_the_high_error_region():
    error = np.zeros((224, 224), np.float32)
    error[20:60, 150:200] = 1.0  # top right in model space
    rgb = render_overlay(_image(), error, colorbar=False)
    assert rgb.shape == (200, 300, 3) and rgb.dtype == np.uint8
    # The map is stretched to the image: (rows 20-60, cols 150-200 of 224) -> rows ~18-53, cols ~201-267.
    hot = rgb[25:45, 210:260].astype(int)
    cold = rgb[120:180, 210:260].astype(int)
    assert hot[..., 1].mean() > cold[..., 1].mean() + 60  # white-hot adds green and blue
    assert hot[..., 0].mean() > cold[..., 0].mean()


def test_alpha_zero_is_the_image_and_fade_low_keeps_cold_pixels():
    image = _image()
    error = np.random.default_rng(0).random((224, 224)).astype(np.float32)
    plain = render_overlay(image, error, alpha=0.0, colorbar=False)
    assert np.array_equal(plain[..., 0], image) and np.array_equal(plain[..., 2], image)
    flat = np.zeros((224, 224), np.float32)
    faded = render_overlay(image, flat, fade_low=True, colorbar=False)
    assert np.array_equal(faded[..., 1], image)  # zero error: untouched


def test_colour_bar_is_appended_and_png_is_written(tmp_path):
    error = np.linspace(0, 0.02, 224 * 224, dtype=np.float32).reshape(224, 224)
    rgb = render_overlay(_image(), error)
    assert rgb.shape[0] == 200 and rgb.shape[1] > 300
    bar = rgb[:, 300:]
    assert bar.max() == 255  # the white top of the hot ramp and the labels
    path = save_overlay_png(tmp_path / "o.png", _image(), error, vmin=0.0, vmax=0.05)
    with Image.open(path) as png:
        assert png.mode == "RGB" and png.size == (rgb.shape[1], 200)


def test_constant_map_and_wide_image_types():
    out = render_overlay(np.full((64, 48), 1000, np.uint16), np.full((224, 224), 0.3, np.float32))
    assert out.shape[0] == 64 and np.isfinite(out).all()
    with pytest.raises(ValueError):
        render_overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((224, 224)))
