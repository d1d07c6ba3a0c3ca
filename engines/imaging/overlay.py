"""Render an error map over its radiograph as an RGB image with a colour bar (PNG for people, SC for the PACS).

SKELEX displays the map with matplotlib's ``hot`` colormap at alpha 0.55 over the base image, auto-scaled,
with a colour bar "Error value". We reproduce that look without matplotlib: the ``hot`` ramp (black, red,
yellow, white: monotonic in lightness, so it reads in grey too), a constant alpha (0.5 by default), and a
vertical colour bar with its range written beside it. ``fade_low=True`` instead lets low errors show the
image through (alpha grows with the value), which reads better when the whole map is not of interest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# matplotlib's "hot" as piecewise-linear channels: red 0->1 over [0, 0.365], green over [0.365, 0.746], blue after.
_HOT_KNOTS = {
    "r": ([0.0, 0.365079, 1.0], [0.0416, 1.0, 1.0]),
    "g": ([0.0, 0.365079, 0.746032, 1.0], [0.0, 0.0, 1.0, 1.0]),
    "b": ([0.0, 0.746032, 1.0], [0.0, 0.0, 1.0]),
}


def hot_colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) -> RGB floats in [0, 1], shape (..., 3)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    return np.stack([np.interp(v, *_HOT_KNOTS[c]) for c in "rgb"], axis=-1)


def _resize_map(error_map: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Stretch the 224 x 224 map per axis to the image (bilinear, no crop), like ``resample_to_source``."""
    m = np.asarray(error_map, dtype=np.float32)
    if m.shape == (rows, columns):
        return m
    return np.asarray(Image.fromarray(m, mode="F").resize((columns, rows), resample=Image.Resampling.BILINEAR))


def render_overlay(
    image: np.ndarray,
    error_map: np.ndarray,
    *,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    fade_low: bool = False,
    label: str = "Error",
) -> np.ndarray:
    """Blend ``error_map`` (any size, stretched to the image) over a grey uint8 ``image``; RGB uint8 out.

    The range defaults to the map's own min..max (SKELEX's auto-scaling); pass ``vmin``/``vmax`` to compare
    images on one scale. With ``colorbar`` a bar of about 1/12 of the width (at least 48 px) is appended.
    """
    grey = np.asarray(image)
    if grey.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {grey.shape}")
    if grey.dtype != np.uint8:
        lo, hi = float(grey.min()), float(grey.max())
        grey = np.clip((grey - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
    rows, columns = grey.shape
    values = _resize_map(error_map, rows, columns)
    low = float(np.nanmin(values)) if vmin is None else float(vmin)
    high = float(np.nanmax(values)) if vmax is None else float(vmax)
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    scaled = np.clip(np.nan_to_num(scaled), 0.0, 1.0)
    colours = hot_colormap(scaled)
    weight = alpha * np.sqrt(scaled)[..., None] if fade_low else alpha
    base = np.repeat(grey[..., None].astype(np.float64) / 255.0, 3, axis=-1)
    blended = (1.0 - weight) * base + weight * colours
    rgb = np.clip(np.rint(blended * 255), 0, 255).astype(np.uint8)
    if colorbar:
        rgb = _append_colorbar(rgb, low, high, label)
    return rgb


def _append_colorbar(rgb: np.ndarray, low: float, high: float, label: str) -> np.ndarray:
    rows, columns, _ = rgb.shape
    width = max(80, columns // 10)  # room for labels such as "1.7e-05" in the default font
    panel = np.zeros((rows, width, 3), np.uint8)
    margin = max(8, rows // 20)
    bar_top, bar_bottom = margin, rows - margin
    bar_left, bar_right = 6, 6 + max(10, width // 6)
    ramp = np.linspace(1.0, 0.0, max(bar_bottom - bar_top, 1))
    panel[bar_top:bar_bottom, bar_left:bar_right] = (hot_colormap(ramp)[:, None, :] * 255).astype(np.uint8)
    image = Image.fromarray(panel)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    text_x = bar_right + 3
    draw.text((text_x, bar_top), _fmt(high), fill=(255, 255, 255), font=font)
    draw.text((text_x, bar_bottom - 10), _fmt(low), fill=(255, 255, 255), font=font)
    draw.text((bar_left, max(0, bar_top - 11)), label, fill=(255, 255, 255), font=font)
    return np.concatenate([rgb, np.asarray(image)], axis=1)


def _fmt(value: float) -> str:
    return f"{value:.2g}" if abs(value) < 0.01 or abs(value) >= 1000 else f"{value:.3f}"


def save_overlay_png(path: Path | str, image: np.ndarray, error_map: np.ndarray, **kwargs) -> Path:
    """Render (see :func:`render_overlay`) and write an RGB PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_overlay(image, error_map, **kwargs), mode="RGB").save(path, format="PNG")
    return path
