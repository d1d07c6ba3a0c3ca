"""Score calibration: where an abnormality score sits among a site's normal studies (used at inference).

:class:`Calibration` holds the sorted scores (``calibration.json`` beside the model, written by
``msknode model calibrate``); the worker and ``msknode infer`` report :func:`percentile` of each new score.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

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
