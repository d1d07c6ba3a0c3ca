"""Maps in model space back on the source image: resampling, and the highest-error region as an SR polygon.

Family-independent: any 2-D per-pixel map at the model's input size (MAE's error map today) with the frame's
:class:`~engines.imaging.geometry.SourceGeometry`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import ConvexHull
from torch import Tensor

from engines.imaging.geometry import SourceGeometry


def resample_to_source(error_map: np.ndarray | Tensor, geometry: SourceGeometry) -> np.ndarray:
    """Stretch a 224 x 224 map to the source's rows x columns (bilinear, per axis, no crop), float32."""
    m = torch.as_tensor(np.asarray(error_map, dtype=np.float32))[None, None]
    size = (geometry.rows, geometry.columns)
    out = torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


@dataclass
class Region:
    """The highest-error region: a closed polygon in source pixel coordinates (column, row) and its statistics."""

    polygon: np.ndarray  # [N, 2] (column, row) in source pixels, first point repeated at the end
    polygon_model: np.ndarray  # the same outline in 224-px model space
    area_fraction: float  # share of the image inside the component (model space)
    mean_error: float
    threshold: float
    centroid: np.ndarray  # (column, row) source pixels


def highest_error_region(
    error_map: np.ndarray | Tensor, geometry: SourceGeometry, percentile: float = 98.0
) -> Region | None:
    """Top-percentile pixels, their largest connected component (by summed error), its convex outline.

    The convex hull of the component's pixel corners is the "simplified outline": few vertices, always a valid
    simple polygon for an SR SCOORD POLYGON. Returns None for a flat (all-equal) map.
    """
    regions = high_error_regions(error_map, geometry, percentile, max_regions=1)
    return regions[0] if regions else None


def high_error_regions(
    error_map: np.ndarray | Tensor, geometry: SourceGeometry, percentile: float = 98.0, max_regions: int = 3
) -> list[Region]:
    """The ``max_regions`` connected components of the top-percentile pixels with the largest summed error, best
    first (ties keep label order), each as a convex outline; empty for a flat map. Region-guided classifiers
    crop around them."""
    m = np.asarray(error_map, dtype=np.float64)
    if m.shape != tuple(geometry.model_size):
        raise ValueError(f"expected a {geometry.model_size[0]} x {geometry.model_size[1]} map, got {m.shape}")
    if max_regions < 1:
        raise ValueError(f"max_regions must be >= 1, got {max_regions}")
    if not np.isfinite(m).all() or m.max() <= m.min():
        return []
    threshold = float(np.percentile(m, percentile))
    # A mostly-flat map puts the percentile on its floor: then take everything above the floor.
    selected = m > threshold if threshold <= m.min() else m >= threshold
    labels, count = ndimage.label(selected, structure=np.ones((3, 3)))
    sums = ndimage.sum(m, labels, index=np.arange(1, count + 1))
    order = np.argsort(-np.asarray(sums), kind="stable")[:max_regions]
    return [_component_region(m, labels, int(best) + 1, threshold, geometry) for best in order]


def _component_region(
    m: np.ndarray, labels: np.ndarray, label: int, threshold: float, geometry: SourceGeometry
) -> Region:
    rows, cols = np.nonzero(labels == label)
    corners = np.concatenate(
        [np.stack([cols + dc, rows + dr], axis=1) for dc in (0, 1) for dr in (0, 1)], axis=0
    ).astype(np.float64)
    hull = ConvexHull(corners)
    outline = corners[hull.vertices]  # counter-clockwise
    outline = np.concatenate([outline, outline[:1]], axis=0)
    centroid = np.array([cols.mean() + 0.5, rows.mean() + 0.5])
    return Region(
        polygon=geometry.model_to_source(outline),
        polygon_model=outline,
        area_fraction=float(rows.size) / m.size,
        mean_error=float(m[rows, cols].mean()),
        threshold=threshold,
        centroid=geometry.model_to_source(centroid[None])[0],
    )
