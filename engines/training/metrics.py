"""Metrics of the training tools: AUROC (Mann-Whitney, ties count half) and its one-vs-rest macro average."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN when one class is missing."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positives).ravel().astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auroc(probs: np.ndarray, y: np.ndarray) -> float:
    """One-vs-rest AUROC averaged over the classes present in ``y``."""
    values = [auroc(probs[:, k], y == k) for k in range(probs.shape[1]) if 0 < np.sum(y == k) < len(y)]
    return float(np.mean(values)) if values else float("nan")
