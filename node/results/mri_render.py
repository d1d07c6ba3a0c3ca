"""Rendering of the knee MRI overlay Secondary Captures: an MR slice with each structure outlined in its colour.

Layout (as the error-map SC, render.py): a black banner "AI-generated segmentation - not for primary
diagnosis" with the model, the slice (windowed to its 1st-99.5th percentile, enlarged to at least
``MIN_LONG_SIDE`` px so outlines and text stay readable) with one-pixel outlines, and a legend band naming
the structures outlined on that slice. Pure numpy + Pillow; no DICOM here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from node.results.knee_codes import Structure
from node.results.render import MAX_LONG_SIDE, plan_layout

BANNER_TEXT = "AI-generated segmentation - not for primary diagnosis"
MIN_LONG_SIDE = 512


def window(pixels: np.ndarray) -> np.ndarray:
    """uint8 grey of a slice: its 1st..99.5th percentile mapped to 0..255 (a flat slice becomes mid grey)."""
    values = np.nan_to_num(np.asarray(pixels, dtype=np.float64))
    low, high = np.percentile(values, [1.0, 99.5])
    if high <= low:
        return np.full(values.shape, 128, dtype=np.uint8)
    return np.round(np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with a 4-neighbour outside it (image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _scale(rows: int, columns: int) -> int:
    """Integer enlargement so the long side reaches MIN_LONG_SIDE without passing the 2048 px canvas limit."""
    long_side = max(rows, columns)
    factor = max(1, MIN_LONG_SIDE // long_side)
    while factor > 1 and long_side * factor > MAX_LONG_SIDE - 200:
        factor -= 1
    return factor


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, size))


def _fitting_font(draw: ImageDraw.ImageDraw, text: str, width: int, size: int) -> ImageFont.ImageFont:
    while size > 6 and draw.textlength(text, font=_font(size)) > width:
        size -= 1
    return _font(size)


def render_overlay(pixels: np.ndarray, labels: np.ndarray, structures: Sequence[Structure], model_name: str,
                   model_version: str) -> np.ndarray:
    """RGB uint8 canvas: banner, the outlined slice, the legend of the structures present on it."""
    if pixels.shape != labels.shape or pixels.ndim != 2:
        raise ValueError("pixels and labels must be 2-D arrays of one shape")
    factor = _scale(*pixels.shape)
    grey = np.kron(window(pixels), np.ones((factor, factor), dtype=np.uint8))
    big_labels = np.kron(labels, np.ones((factor, factor), dtype=labels.dtype))
    layout = plan_layout(*grey.shape)
    if (layout.width, layout.image_rows) != (grey.shape[1], grey.shape[0]):
        image = Image.fromarray(grey).resize((layout.width, layout.image_rows), Image.Resampling.BILINEAR)
        grey = np.asarray(image)
        big_labels = np.asarray(Image.fromarray(big_labels.astype(np.int32)).resize(
            (layout.width, layout.image_rows), Image.Resampling.NEAREST)).astype(labels.dtype)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    present = [s for s in structures if np.any(big_labels == s.label_value)]
    for structure in present:
        rgb[outline(big_labels == structure.label_value)] = structure.colour

    legend_rows = max(layout.bar_rows, 18) * (1 + (len(present) > 4))
    canvas = np.zeros((layout.banner_rows + layout.image_rows + legend_rows, layout.width, 3), dtype=np.uint8)
    canvas[layout.banner_rows: layout.banner_rows + layout.image_rows] = rgb
    image = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(image)
    margin = max(2, layout.banner_rows // 10)
    line = (layout.banner_rows - 2 * margin) // 2
    for number, text in enumerate((BANNER_TEXT, f"model {model_name} {model_version}")):
        font = _fitting_font(draw, text, layout.width - 2 * margin, int(line * 0.9))
        draw.text((margin, margin + number * line), text, fill=(255, 255, 255), font=font)
    _draw_legend(draw, present, layout.banner_rows + layout.image_rows, legend_rows, layout.width)
    return np.asarray(image, dtype=np.uint8).copy()


def _draw_legend(draw: ImageDraw.ImageDraw, present: Sequence[Structure], top: int, rows: int, width: int) -> None:
    if not present:
        font = _fitting_font(draw, "no structure on this slice", width - 4, rows // 2)
        draw.text((4, top + 2), "no structure on this slice", fill=(255, 255, 255), font=font)
        return
    lines = 1 + (len(present) > 4)
    per_line = -(-len(present) // lines)
    line_height = rows // lines
    cell = width // per_line
    for position, structure in enumerate(present):
        x = (position % per_line) * cell + 2
        y = top + (position // per_line) * line_height + 2
        box = max(4, line_height // 2)
        draw.rectangle([x, y, x + box, y + box], fill=structure.colour)
        font = _fitting_font(draw, structure.label, cell - box - 8, int(line_height * 0.6))
        draw.text((x + box + 3, y), structure.label, fill=(255, 255, 255), font=font)
