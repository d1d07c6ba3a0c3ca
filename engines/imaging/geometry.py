"""How a 224 x 224 model input maps back to the source image.

The model sees every image resized to 224 x 224 without crop (SKELEX's path), so results computed at
224 px (error maps, regions) must be stretched back per axis to the source's rows and columns before they
can be written as SCOORD pixel coordinates (PS3.3 C.18.6: column/row, origin at the top-left pixel's
top-left corner, so pixel centres sit at +0.5). A model whose ``preprocessor_config.json`` names another size
gets geometries with that ``model_size`` (rows, columns of the model input).
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
    model_size: tuple[int, int] = (MODEL_SIZE, MODEL_SIZE)  # (rows, columns) of the model input

    def model_to_source(self, points: np.ndarray) -> np.ndarray:
        """Map (column, row) points in model space (224 px by default) to source pixel coordinates (SCOORD)."""
        pts = np.asarray(points, dtype=np.float64)
        model_rows, model_columns = self.model_size
        scale = np.array([self.columns / model_columns, self.rows / model_rows])
        return pts * scale

    def source_to_model(self, points: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`model_to_source`."""
        pts = np.asarray(points, dtype=np.float64)
        model_rows, model_columns = self.model_size
        scale = np.array([model_columns / self.columns, model_rows / self.rows])
        return pts * scale
