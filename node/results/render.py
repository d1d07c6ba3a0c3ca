"""Rendering of the error-map Secondary Capture: heat map over the radiograph, banner and colour bar.

Layout (top to bottom, all the same width)::

    +------------------------------------------------+
    | banner: "AI-generated error map - not for ..."  |  black band, white text
    +------------------------------------------------+
    | radiograph (source aspect ratio) with the      |
    | "hot" error map blended on top                  |
    +------------------------------------------------+
    | colour bar: low .......................... high |  with the error values at both ends
    +------------------------------------------------+

The bands sit outside the image so no anatomy is covered; the whole canvas keeps its long side <= 2048 px
(the radiograph is shrunk a little when the bands would push it over). Text uses Pillow's built-in font
(``ImageFont.load_default(size=...)``), which has no em dash glyph, hence the ASCII hyphen in the banner.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_LONG_SIDE = 2048
BANNER_TEXT = "AI-generated error map - not for primary diagnosis"
ALPHA = 0.5
# Errors below this fraction of the map's range fade in linearly, so normal bone stays plain grey.
ALPHA_RAMP = 0.25
# The top of "hot" is white, invisible over bright bone: the scale stops at bright yellow.
COLOUR_TOP = 0.85


@dataclass(frozen=True)
class Layout:
    """Pixel rows of each band in the rendered canvas (for callers and tests)."""

    width: int
    banner_rows: int
    image_rows: int
    bar_rows: int

    @property
    def height(self) -> int:
        return self.banner_rows + self.image_rows + self.bar_rows

    @property
    def image_top(self) -> int:
        return self.banner_rows

    @property
    def bar_top(self) -> int:
        return self.banner_rows + self.image_rows


def hot(values: np.ndarray) -> np.ndarray:
    """The "hot" colormap (black - red - yellow - white, as matplotlib's) for values in [0, 1] -> uint8 RGB."""
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    red = np.clip(0.0416 + x * (1.0 - 0.0416) / 0.365079, 0.0, 1.0)
    green = np.clip((x - 0.365079) / (0.746032 - 0.365079), 0.0, 1.0)
    blue = np.clip((x - 0.746032) / (1.0 - 0.746032), 0.0, 1.0)
    return np.round(np.stack([red, green, blue], axis=-1) * 255.0).astype(np.uint8)


def error_range(error_map: np.ndarray) -> tuple[float, float]:
    """Display range of the map: 0 (or its minimum if negative) to its 99.5th percentile (one hot pixel does
    not wash the rest out). Starting at 0 keeps colours proportional to the squared error itself."""
    finite = error_map[np.isfinite(error_map)]
    if finite.size == 0:
        return 0.0, 1.0
    low = min(0.0, float(finite.min()))
    high = float(np.percentile(finite, 99.5))
    if high <= low:
        high = low + 1e-12
    return low, high


def _band_rows(width: int) -> tuple[int, int]:
    banner = int(np.clip(round(width * 0.06), 22, 96))
    bar = int(np.clip(round(width * 0.05), 18, 80))
    return banner, bar


def plan_layout(rows: int, columns: int) -> Layout:
    """Size of each band for a display image of ``rows`` x ``columns`` (source aspect kept)."""
    scale = 1.0
    for _ in range(4):  # band heights depend on the width; converge in a couple of steps
        width = max(1, int(round(columns * scale)))
        banner, bar = _band_rows(width)
        scale = min(1.0, MAX_LONG_SIDE / columns, (MAX_LONG_SIDE - banner - bar) / rows)
    width = max(1, int(round(columns * scale)))
    image_rows = max(1, int(round(rows * scale)))
    banner, bar = _band_rows(width)
    return Layout(width=width, banner_rows=banner, image_rows=image_rows, bar_rows=bar)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, size))


def _fit_text(draw: ImageDraw.ImageDraw, text: str, max_width: int, max_size: int) -> ImageFont.ImageFont:
    """The largest default-font size (<= max_size) at which ``text`` fits in ``max_width`` pixels."""
    size = max_size
    while size > 6 and draw.textlength(text, font=_font(size)) > max_width:
        size -= 1
    return _font(size)


def render_error_map(
    display: np.ndarray,
    error_map: np.ndarray,
    model_name: str,
    model_version: str,
    alpha: float = ALPHA,
) -> tuple[np.ndarray, Layout]:
    """RGB uint8 canvas (banner + blended image + colour bar) and its layout."""
    if display.shape != error_map.shape:
        raise ValueError("display and error map must have the same shape")
    layout = plan_layout(*display.shape)
    size = (layout.width, layout.image_rows)

    grey = np.asarray(Image.fromarray(display).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    error = np.nan_to_num(np.asarray(error_map, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    error = np.asarray(Image.fromarray(error, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    low, high = error_range(error_map)
    normalised = np.clip((error - low) / (high - low), 0.0, 1.0)
    weight = (alpha * np.clip(normalised / ALPHA_RAMP, 0.0, 1.0))[..., None]
    blended = (1.0 - weight) * grey[..., None] + weight * hot(normalised * COLOUR_TOP).astype(np.float32)

    canvas = np.zeros((layout.height, layout.width, 3), dtype=np.uint8)
    canvas[layout.image_top: layout.bar_top] = np.round(blended).astype(np.uint8)
    image = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(image)
    _draw_banner(draw, layout, model_name, model_version)
    _draw_colour_bar(image, draw, layout, low, high)
    return np.asarray(image, dtype=np.uint8).copy(), layout


def _draw_banner(draw: ImageDraw.ImageDraw, layout: Layout, model_name: str, model_version: str) -> None:
    margin = max(2, layout.banner_rows // 10)
    lines = [BANNER_TEXT, f"model {model_name} {model_version}"]
    line_height = (layout.banner_rows - 2 * margin) // 2
    for number, text in enumerate(lines):
        font = _fit_text(draw, text, layout.width - 2 * margin, int(line_height * 0.9))
        draw.text((margin, margin + number * line_height), text, fill=(255, 255, 255), font=font)


def _draw_colour_bar(image: Image.Image, draw: ImageDraw.ImageDraw, layout: Layout, low: float, high: float) -> None:
    low_text, high_text = f"{low:.3g}", f"{high:.3g}"
    font = _font(int(layout.bar_rows * 0.6))
    pad = max(2, layout.bar_rows // 8)
    left = int(draw.textlength(low_text, font=font)) + 2 * pad
    right = int(draw.textlength(high_text, font=font)) + 2 * pad
    bar_width = layout.width - left - right
    if bar_width >= 8:
        ramp = hot(np.linspace(0.0, COLOUR_TOP, bar_width, dtype=np.float32))
        strip = np.repeat(ramp[None], layout.bar_rows - 2 * pad, axis=0)
        image.paste(Image.fromarray(strip, mode="RGB"), (left, layout.bar_top + pad))
        draw.text((pad, layout.bar_top + pad), low_text, fill=(255, 255, 255), font=font)
        draw.text((layout.width - right + pad, layout.bar_top + pad), high_text, fill=(255, 255, 255), font=font)
    else:  # too narrow for labels: the gradient alone
        ramp = hot(np.linspace(0.0, COLOUR_TOP, layout.width, dtype=np.float32))
        image.paste(Image.fromarray(np.repeat(ramp[None], layout.bar_rows, axis=0), mode="RGB"), (0, layout.bar_top))
