"""Region-guided classification as SKELEX's ``External_validation.py`` does it, with regions from an error map.

Their pipeline: a detector (an anatomical YOLO model whose weights are not published) finds bone regions; each
crop (the box exactly, resized to 224 x 224) and the whole image go through the classifier; per output, the
maximum over the crops is kept (crops labelled right / left / abnormal bone lesion are skipped), and for the
tumour rule the maximum of the per-crop *sum* p1 + p2 + p3. Tumour when that maximum > 0.5; malignant when,
in addition, the maximum p1 >= 0.5 (else benign).

Here the crops come from the zero-shot error map's highest-error regions (:func:`boxes_around_regions`, regions
from :func:`engines.imaging.regions.high_error_regions`) unless a :class:`RegionDetector` supplies boxes. Two
deliberate differences, both documented in docs/engine.md: the whole image is always classified (theirs gives
all-zero results when the detector finds nothing), and an error-map region is a lesion-sized blob, so its crop
is widened (``context``, ``min_fraction``) to show the bone around it, as their anatomical boxes do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from engines.imaging.geometry import SourceGeometry
from engines.imaging.regions import Region
from engines.vit_classifier.layout import HeadLayout

WHOLE_IMAGE = "whole image"
#: Detector labels External_validation.py leaves out of the maxima.
SKELEX_EXCLUDED_LABELS = frozenset({"right", "left", "abnormal bone lesion"})


@dataclass(frozen=True)
class CropBox:
    """A crop in pixel coordinates of the image it is cut from: columns ``left:right``, rows ``top:bottom``."""

    left: int
    top: int
    right: int
    bottom: int
    label: str

    def __post_init__(self) -> None:
        if self.right <= self.left or self.bottom <= self.top or self.left < 0 or self.top < 0:
            raise ValueError(f"empty or negative crop box {self}")

    def scaled(self, column_scale: float, row_scale: float) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in another pixel grid of the same image (e.g. the source's)."""
        return (self.left * column_scale, self.top * row_scale, self.right * column_scale, self.bottom * row_scale)


class RegionDetector(Protocol):
    """Anything that proposes crops for an 8-bit image (SKELEX used an anatomical YOLO detector)."""

    def detect(self, image8: np.ndarray) -> list[CropBox]: ...


def boxes_around_regions(
    regions: Sequence[Region], geometry: SourceGeometry, image_shape: tuple[int, int],
    context: float = 2.0, min_fraction: float = 0.25,
) -> list[CropBox]:
    """One crop per region, in the pixel grid of an image of ``image_shape`` (rows, columns) showing the source.

    The crop is centred on the region's bounding box, ``context`` times its size, at least ``min_fraction`` of
    the image's shorter side, and moved (not shrunk) to lie inside the image where it fits.
    """
    if context < 1.0 or not 0.0 < min_fraction <= 1.0:
        raise ValueError("context must be >= 1 and min_fraction in (0, 1]")
    rows, columns = image_shape
    scale = np.array([columns / geometry.columns, rows / geometry.rows])
    boxes = []
    for number, region in enumerate(regions, start=1):
        points = np.asarray(region.polygon, dtype=np.float64) * scale
        (left, top), (right, bottom) = points.min(axis=0), points.max(axis=0)
        centre = np.array([(left + right) / 2, (top + bottom) / 2])
        floor = min_fraction * min(rows, columns)
        size = np.array([max(context * (right - left), floor), max(context * (bottom - top), floor)])
        size = np.minimum(np.ceil(size), [columns, rows])
        start = np.clip(np.round(centre - size / 2), 0, [columns - size[0], rows - size[1]])
        x0, y0 = int(start[0]), int(start[1])
        boxes.append(CropBox(x0, y0, x0 + int(size[0]), y0 + int(size[1]), f"error region {number}"))
    return boxes


def activate(logits: Tensor, layout: HeadLayout) -> Tensor:
    """Per-group activation of [B, num_outputs] logits (``predict_classes_as_tensor`` in their code)."""
    if logits.shape[-1] != layout.num_outputs:
        raise ValueError(f"expected {layout.num_outputs} logits, got {logits.shape[-1]}")
    probabilities = torch.empty_like(logits, dtype=torch.float32)
    for group in layout.groups:
        index = torch.tensor(group.indices, device=logits.device)
        part = logits.float().index_select(-1, index)
        probabilities[..., index] = torch.sigmoid(part) if group.activation == "sigmoid" else torch.softmax(part, -1)
    return probabilities


@dataclass(frozen=True)
class FindingResult:
    """A finding's score (max over crops of its summed probabilities), the crop that gave it, and the decision:
    ``positive`` None when the finding it requires is negative (then it is not decided at all)."""

    name: str
    label: str
    score: float
    crop: int  # index into RegionGuidedResult.boxes
    positive: bool | None
    decision: str | None  # the layout's value for the outcome, None when not decided


@dataclass(frozen=True)
class RegionGuidedResult:
    """Per-crop probabilities, their maxima per output, and the findings; crop 0 is the whole image."""

    boxes: list[CropBox]
    probabilities: np.ndarray  # [crops, num_outputs]
    used: list[int]  # crops counted in the maxima (excluded detector labels left out)
    maxima: np.ndarray  # [num_outputs]
    argmax_crop: np.ndarray  # [num_outputs] the crop each maximum came from
    findings: list[FindingResult]

    def head_values(self, layout: HeadLayout) -> dict[str, list[float]]:
        """Findings' scores then every group's per-output maxima, by name (what the node reports)."""
        values: dict[str, list[float]] = {f.name: [f.score] for f in self.findings}
        for group in layout.groups:
            values[group.name] = [float(self.maxima[i]) for i in group.indices]
        return values


def aggregate(
    probabilities: np.ndarray | Tensor, boxes: Sequence[CropBox], layout: HeadLayout,
    excluded_labels: frozenset[str] = SKELEX_EXCLUDED_LABELS,
) -> RegionGuidedResult:
    """Max per output and per finding over the crops, then the findings' decisions (see the module docstring)."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(boxes), layout.num_outputs):
        raise ValueError(f"expected [{len(boxes)}, {layout.num_outputs}] probabilities, got {probs.shape}")
    used = [i for i, box in enumerate(boxes) if box.label.strip().lower() not in excluded_labels]
    if not used:
        raise ValueError("every crop is excluded: nothing to aggregate")
    kept = probs[used]
    argmax = np.asarray(used)[np.argmax(kept, axis=0)]  # first crop on ties, as their strict '>' keeps the first
    findings: list[FindingResult] = []
    decided: dict[str, bool | None] = {}
    for finding in layout.findings:
        sums = kept[:, list(finding.sum_of)].sum(axis=1)
        best = int(np.argmax(sums))
        score = float(min(1.0, max(0.0, sums[best])))  # a sum of softmax shares, clipped against rounding
        required = decided.get(finding.requires) if finding.requires else True
        positive = finding.positive(float(sums[best])) if required else None
        decided[finding.name] = positive
        decision = None if positive is None else finding.values[int(positive)]
        findings.append(FindingResult(finding.name, finding.label, score, used[best], positive, decision))
    return RegionGuidedResult(list(boxes), probs, used, kept.max(axis=0), argmax, findings)
