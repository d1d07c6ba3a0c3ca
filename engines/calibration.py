"""Calibration, two kinds, both written by ``msknode model calibrate``.

- **Scores** (families with an error map): where an abnormality score sits among a site's normal studies.
  :class:`Calibration` holds the sorted scores (``calibration.json`` beside the model); the worker and
  ``msknode infer`` report :func:`percentile` of each new score.
- **Head probabilities** (any family; the only kind for a family without an error map, e.g. DINOv3): a linear
  head fitted on one data set is often over- or under-confident on a site's data. :func:`fit_logit_calibration`
  fits temperature scaling (softmax heads: ``softmax(logits / T)``) or Platt scaling (one sigmoid label:
  ``sigmoid(a * logit + b)``) on a labelled set by minimising the log loss; the result is stored in the head's
  JSON (``calibration``) and :meth:`engines.heads.LinearHead.predict` applies it. Temperature scaling never
  changes which class is most probable, so accuracy and AUROC stay as fitted; Platt scaling keeps the ranking
  (AUROC) when ``a > 0``. :func:`expected_calibration_error` (top-label, equal-width bins) and
  :func:`log_loss` say how far probabilities are from observed frequencies, before and after.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"


@dataclass
class Calibration:
    """Abnormality scores over a site's normal studies, so a new score can be reported as a percentile."""

    scores: list[float]  # sorted ascending
    encoder_sha256: str = ""
    passes: int = 10
    seed: int | None = 0
    source: str = ""
    created: str = ""

    @classmethod
    def from_scores(cls, scores: Iterable[float], **kwargs: Any) -> "Calibration":
        values = sorted(float(s) for s in scores if np.isfinite(s))
        if not values:
            raise ValueError("calibration needs at least one finite score")
        return cls(scores=values, **kwargs)

    def percentile(self, score: float) -> float:
        """Share of normal scores below ``score`` (ties count half), in percent: 0..100."""
        values = np.asarray(self.scores)
        below = np.searchsorted(values, score, side="left")
        at_or_below = np.searchsorted(values, score, side="right")
        return float(100.0 * (below + at_or_below) / (2 * len(values)))

    def summary(self) -> dict[str, float]:
        values = np.asarray(self.scores)
        return {"n": int(values.size), "p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)), "p99": float(np.percentile(values, 99))}

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / CALIBRATION_FILE
        data = asdict(self)
        data["format"] = "msknode-calibration/1"
        data["summary"] = self.summary()
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path | str) -> "Calibration":
        path = Path(path)
        if path.is_dir():
            path = path / CALIBRATION_FILE
        data = json.loads(path.read_text())
        known = {k: data[k] for k in ("scores", "encoder_sha256", "passes", "seed", "source", "created") if k in data}
        return cls.from_scores(known.pop("scores"), **known)


def load_calibration(model_dir: Path | str, encoder_sha256: str | None = None) -> Calibration | None:
    """The calibration beside a model, or None; refuses (returns None and logs) one made for other weights."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    calibration = Calibration.load(path)
    if encoder_sha256 and calibration.encoder_sha256 and calibration.encoder_sha256 != encoder_sha256:
        log.warning("calibration %s was made for other encoder weights; ignoring it", path)
        return None
    return calibration


def percentile(score: float, calibration: Calibration | Path | str) -> float:
    """Percentile (0-100) of ``score`` among the calibration's normal scores (a Calibration or its path)."""
    if not isinstance(calibration, Calibration):
        calibration = Calibration.load(calibration)
    return calibration.percentile(score)


# ----------------------------------------------------------------------------------------------- head probabilities
LOGIT_CALIBRATION_METHODS = {"softmax": "temperature", "sigmoid": "platt"}


@dataclass(frozen=True)
class LogitCalibration:
    """``activation(scale * logits + offset)``: temperature (softmax; scale = 1 / T, offset 0) or Platt (sigmoid)."""

    method: str
    scale: float
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in LOGIT_CALIBRATION_METHODS.values():
            raise ValueError(f"calibration method must be one of {sorted(LOGIT_CALIBRATION_METHODS.values())}")
        if not (np.isfinite(self.scale) and self.scale > 0 and np.isfinite(self.offset)):
            raise ValueError(f"calibration scale must be finite and positive (got {self.scale}), offset finite")
        if self.method == "temperature" and self.offset != 0:
            raise ValueError("temperature scaling has no offset")

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def apply(self, logits: Tensor) -> Tensor:
        return logits * self.scale + self.offset


def _check_logits(logits: Tensor, targets: Tensor, activation: str) -> None:
    if activation not in LOGIT_CALIBRATION_METHODS:
        raise ValueError(f"only softmax and single-label sigmoid heads can be calibrated, not {activation!r}")
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"logits [N, K] and N targets needed, got {list(logits.shape)} and {list(targets.shape)}")
    if activation == "sigmoid" and logits.shape[1] != 1:
        raise ValueError("Platt scaling is for a head with one sigmoid label")
    classes = 2 if activation == "sigmoid" else logits.shape[1]
    if int(targets.min()) < 0 or int(targets.max()) >= classes:
        raise ValueError(f"targets must be class indices 0..{classes - 1}")


def class_probabilities(logits: Tensor, activation: str, calibration: LogitCalibration | None = None) -> Tensor:
    """Per-class probabilities [N, C] (a sigmoid label becomes [1 - p, p]), after ``calibration`` if given."""
    z = calibration.apply(logits.double()) if calibration is not None else logits.double()
    if activation == "softmax":
        return torch.softmax(z, dim=1)
    p = torch.sigmoid(z[:, :1])
    return torch.cat([1 - p, p], dim=1)


def expected_calibration_error(probabilities: Tensor, targets: Tensor, bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (share of cases) x |accuracy - mean confidence|."""
    probabilities = torch.as_tensor(probabilities, dtype=torch.float64)
    targets = torch.as_tensor(targets, dtype=torch.long)
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == targets).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1], right=True)  # bin i holds (edge_i, edge_i+1]
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += float(members.double().mean() * (correct[members].mean() - confidence[members].mean()).abs())
    return error


def log_loss(probabilities: Tensor, targets: Tensor) -> float:
    """Mean negative log probability of the true class (natural log; probabilities clipped at 1e-12)."""
    probabilities = torch.as_tensor(probabilities, dtype=torch.float64)
    targets = torch.as_tensor(targets, dtype=torch.long)
    return float(-probabilities.gather(1, targets[:, None]).clamp_min(1e-12).log().mean())


def fit_logit_calibration(logits: Tensor, targets: Tensor | np.ndarray, activation: str) -> LogitCalibration:
    """Temperature (softmax) or Platt (one sigmoid label) scaling that minimises the log loss on ``logits``.

    ``targets`` are class indices (0/1 for a sigmoid label). Never worse than no calibration on these data:
    if the fit does not lower the log loss, the identity (scale 1, offset 0) is returned.
    """
    logits = torch.as_tensor(logits).detach().double()
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    _check_logits(logits, targets, activation)
    method = LOGIT_CALIBRATION_METHODS[activation]
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)  # scale = exp(.) stays positive
    offset = torch.zeros((), dtype=torch.float64, requires_grad=True)
    params = [log_scale] + ([offset] if method == "platt" else [])
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        z = logits * log_scale.exp() + offset
        if activation == "softmax":
            return torch.nn.functional.cross_entropy(z, targets)
        return torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0], targets.double())

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    identity = LogitCalibration(method, 1.0, 0.0)
    with torch.no_grad():
        before = float(loss())
    optimizer.step(closure)
    with torch.no_grad():
        after = float(loss())
    scale, shift = float(log_scale.detach().exp()), float(offset.detach())
    if not (np.isfinite(after) and after < before and np.isfinite(scale) and scale > 0 and np.isfinite(shift)):
        return identity
    return LogitCalibration(method, scale, shift if method == "platt" else 0.0)
