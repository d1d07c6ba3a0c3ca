"""Does an error map point at the lesion? Pointing game, pixel AUROC, and head metrics on phantoms.

Definitions (also in docs/demo-model.md):

- **Pointing game**: a hit when the argmax of the 224 x 224 error map lies inside the lesion mask, the mask
  first resized to 224 px (area average >= 0.25) and then dilated by ``dilation`` pixels (default 8 = half a
  16-px patch; the map is computed per masked patch, so its peak can sit in the patch that holds the lesion's
  edge). Reported also at 0 and 16 px.
- **Pixel AUROC**: per image, AUROC of map values for lesion pixels (undilated 224-px mask) against all other
  pixels; averaged over images.
- **Score AUROC**: the image score (mean of the map) of lesion images against their normal twins (same seed,
  same anatomy and noise, no lesion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import Tensor

from engines.imaging.geometry import MODEL_SIZE
from engines.training.phantoms import KINDS, Phantom, generate
from engines.training.inputs import normalise_uint8, to_uint8_224
from engines.training.metrics import auroc, macro_auroc



def mask_to_model(mask: np.ndarray, size: int = MODEL_SIZE) -> np.ndarray:
    """A source-resolution bool mask -> 224 x 224 bool (area average >= 0.25, no crop, like the image)."""
    image = Image.fromarray(mask.astype(np.float32))
    return np.asarray(image.resize((size, size), resample=Image.Resampling.BOX)) >= 0.25


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=int(pixels))


def pointing_hit(error_map: np.ndarray, mask: np.ndarray, dilation: int = 8) -> bool:
    """Is the map's argmax inside the (dilated) mask? ``mask`` at the map's resolution."""
    row, col = np.unravel_index(int(np.argmax(error_map)), error_map.shape)
    return bool(dilate(mask, dilation)[row, col])


def pixel_auroc(error_map: np.ndarray, mask: np.ndarray) -> float:
    return auroc(np.asarray(error_map).ravel(), np.asarray(mask).ravel())


@dataclass
class LocalisationReport:
    """Per finding type: pointing game at several dilations, pixel AUROC, score AUROC against normal twins."""

    finding: str
    count: int
    pointing: dict[int, float]  # dilation px -> hit rate
    pixel_auroc: float
    score_auroc: float
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "count": self.count,
            "pointing_game": {str(k): v for k, v in self.pointing.items()},
            "pixel_auroc": self.pixel_auroc,
            "score_auroc": self.score_auroc,
            "per_kind": self.per_kind,
        }


def phantom_input(phantom: Phantom) -> Tensor:
    """The model input for a phantom, through the same path as a DICOM of it: [3, 224, 224]."""
    return normalise_uint8(torch.from_numpy(to_uint8_224(phantom.pixels)).unsqueeze(0))[0]


def evaluate_localisation(
    error_map: Callable[[Tensor], tuple[Tensor, Tensor]],
    finding: str,
    seeds: Sequence[int],
    *,
    kinds: Sequence[str] = KINDS,
    dilations: Sequence[int] = (0, 8, 16),
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> tuple[LocalisationReport, list[float]]:
    """Plant ``finding`` in phantoms of each kind and seed; returns the report and the normal twins' scores.

    ``error_map(x [B,3,224,224]) -> (maps [B,224,224], scores [B])`` (e.g. ``MAEModel.error_map`` with a seed).
    """
    cases: list[tuple[str, Phantom, Phantom]] = []
    for seed in seeds:
        for kind in kinds:
            lesion = generate(kind, seed, findings=[finding])
            if not lesion.lesion_mask.any():
                continue
            cases.append((kind, lesion, generate(kind, seed)))
    hits: dict[int, list[bool]] = {d: [] for d in dilations}
    by_kind: dict[str, list[bool]] = {}
    pix: list[float] = []
    lesion_scores: list[float] = []
    normal_scores: list[float] = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        x = torch.stack([phantom_input(c[1]) for c in chunk] + [phantom_input(c[2]) for c in chunk])
        maps, scores = error_map(x)
        maps_np = maps.numpy()
        for i, (kind, lesion, _) in enumerate(chunk):
            mask = mask_to_model(lesion.lesion_mask)
            if not mask.any():
                continue
            for d in dilations:
                hits[d].append(pointing_hit(maps_np[i], mask, d))
            by_kind.setdefault(kind, []).append(pointing_hit(maps_np[i], mask, 8))
            pix.append(pixel_auroc(maps_np[i], mask))
        lesion_scores.extend(scores[: len(chunk)].tolist())
        normal_scores.extend(scores[len(chunk) :].tolist())
        if progress is not None:
            progress(len(chunk))
    labels = np.r_[np.ones(len(lesion_scores)), np.zeros(len(normal_scores))]
    report = LocalisationReport(
        finding=finding,
        count=len(pix),
        pointing={d: float(np.mean(v)) if v else float("nan") for d, v in hits.items()},
        pixel_auroc=float(np.nanmean(pix)) if pix else float("nan"),
        score_auroc=auroc(np.r_[lesion_scores, normal_scores], labels),
        per_kind={k: {"pointing_game@8": float(np.mean(v)), "count": len(v)} for k, v in by_kind.items()},
    )
    return report, normal_scores


def head_metrics(probabilities: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """AUROC / accuracy for a sigmoid head ([N] or [N, 1]) or a softmax head ([N, K])."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets)
    if probabilities.ndim == 1 or probabilities.shape[1] == 1:
        p = probabilities.reshape(-1)
        return {"auroc": auroc(p, targets == 1), "accuracy": float(np.mean((p >= 0.5) == (targets == 1)))}
    predicted = probabilities.argmax(1)
    return {
        "accuracy": float(np.mean(predicted == targets)),
        "auroc_macro_ovr": macro_auroc(probabilities, targets),
        "mean_abs_error": float(np.mean(np.abs(predicted - targets))),
    }
