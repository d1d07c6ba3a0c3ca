"""How a 224 x 224 model input maps back to the source image.

The model sees every image resized to 224 x 224 without crop (SKELEX's path), so results computed at
224 px (error maps, regions) must be stretched back per axis to the source's rows and columns before they
can be written as SCOORD pixel coordinates (PS3.3 C.18.6: column/row, origin at the top-left pixel's
top-left corner, so pixel centres sit at +0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODEL_SIZE = 224


@dataclass(frozen=True)
class SourceGeometry:
    """The source image's geometry, as far as results need it."""

    rows: int
    columns: int
    frame_count: int = 1
    pixel_spacing: tuple[float, float] | None = None  # (row spacing, column spacing) in mm, when present
    decoded_rows: int | None = None  # size actually decoded (reduced-resolution JPEG 2000 decode)
    decoded_columns: int | None = None

    def model_to_source(self, points: np.ndarray) -> np.ndarray:
        """Map (column, row) points in 224-px model space to source pixel coordinates (SCOORD)."""
        pts = np.asarray(points, dtype=np.float64)
        scale = np.array([self.columns / MODEL_SIZE, self.rows / MODEL_SIZE])
        return pts * scale

    def source_to_model(self, points: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`model_to_source`."""
        pts = np.asarray(points, dtype=np.float64)
        scale = np.array([MODEL_SIZE / self.columns, MODEL_SIZE / self.rows])
        return pts * scale
