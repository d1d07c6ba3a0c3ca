"""Linear probes on frozen embeddings: fit, held-out metrics, and the head (format 3e) they become.

:func:`fit_linear_probe` - logistic (sigmoid, one label) or softmax regression on frozen CLS embeddings, with the
feature standardisation folded back into the weights so the head runs on raw embeddings; :func:`probe_to_head`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from engines.heads import LinearHead
from engines.training.metrics import auroc, macro_auroc


@torch.no_grad()
def embed_batches(embed: Callable[[Tensor], Tensor], inputs: Iterable[Tensor], batch_size: int = 32) -> Tensor:
    """Run ``embed`` over model inputs [3, 224, 224] in batches; returns [N, D] float32 on the CPU."""
    chunks: list[Tensor] = []
    pending: list[Tensor] = []
    for x in inputs:
        pending.append(x)
        if len(pending) == batch_size:
            chunks.append(embed(torch.stack(pending)).float().cpu())
            pending = []
    if pending:
        chunks.append(embed(torch.stack(pending)).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


@dataclass
class ProbeFit:
    """A fitted probe: weights on raw embeddings, and how it did on the held-out split."""

    weight: Tensor  # [K, D]
    bias: Tensor  # [K]
    activation: str  # sigmoid | softmax
    labels: list[str]
    metrics: dict[str, float]
    train_size: int
    test_size: int


def fit_linear_probe(
    features: Tensor,
    targets: Sequence[int] | Tensor,
    labels: Sequence[str],
    *,
    test_fraction: float = 0.25,
    l2: float = 1e-3,
    seed: int = 0,
    max_iter: int = 200,
) -> ProbeFit:
    """Fit a logistic (one label: sigmoid) or softmax (several labels) regression on frozen embeddings.

    ``targets`` are class indices (0/1 for one sigmoid label). A stratified held-out split of ``test_fraction``
    is kept aside for the reported metrics. Features are standardised for the fit and the scaling is folded
    back into ``weight`` / ``bias`` so the saved head applies to the encoder's raw embedding.
    """
    x = features.double()
    y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} embeddings but {y.shape[0]} targets")
    binary = len(labels) == 1
    num_classes = 2 if binary else len(labels)
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"targets must be in 0..{num_classes - 1}")
    train_idx, test_idx = stratified_split(y.numpy(), test_fraction, seed)
    mean = x[train_idx].mean(0)
    std = x[train_idx].std(0).clamp_min(1e-6)
    z = (x - mean) / std
    outputs = 1 if binary else num_classes
    w = torch.zeros(outputs, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(outputs, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    zt, yt = z[train_idx], y[train_idx]
    # Balanced class weights, so a rare finding is not simply ignored.
    counts = torch.bincount(yt, minlength=num_classes).double().clamp_min(1)
    class_weight = counts.sum() / (num_classes * counts)

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = zt @ w.T + b
        if binary:
            per = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], yt.double(), reduction="none")
        else:
            per = torch.nn.functional.cross_entropy(logits, yt, reduction="none")
        loss = (per * class_weight[yt]).mean() + l2 * (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight = (w.detach() / std).float()
    bias = (b.detach() - (w.detach() * (mean / std)).sum(1)).float()
    with torch.no_grad():
        logits = features.float()[test_idx] @ weight.T + bias
    y_test = y[test_idx].numpy()
    if binary:
        scores = torch.sigmoid(logits[:, 0]).numpy()
        metrics = {"auroc": auroc(scores, y_test), "accuracy": float(np.mean((scores >= 0.5) == (y_test == 1)))}
    else:
        probs = torch.softmax(logits, dim=1).numpy()
        predicted = probs.argmax(1)
        metrics = {
            "accuracy": float(np.mean(predicted == y_test)),
            "auroc_macro_ovr": macro_auroc(probs, y_test),
            "mean_abs_error": float(np.mean(np.abs(predicted - y_test))),
        }
    return ProbeFit(weight, bias, "sigmoid" if binary else "softmax", list(labels), metrics, len(train_idx), len(test_idx))


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split; each class keeps at least one training example."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        n_test = int(round(len(members) * test_fraction))
        n_test = min(n_test, len(members) - 1)
        test.extend(members[:n_test])
        train.extend(members[n_test:])
    return np.sort(np.array(train, dtype=int)), np.sort(np.array(test, dtype=int))


def probe_to_head(
    fit: ProbeFit, name: str, encoder_sha256: str, provenance: dict[str, Any] | None = None, pooling: str = "cls"
) -> LinearHead:
    """A :class:`~engines.heads.LinearHead` (format 3e) from a fitted probe (``pooling``: the feature it was fitted on)."""
    head = LinearHead(
        name,
        fit.weight.shape[1],
        fit.labels,
        fit.activation,
        encoder_sha256=encoder_sha256,
        provenance={
            "trainer": "engines.training.probes.fit_linear_probe",
            "train_size": fit.train_size,
            "test_size": fit.test_size,
            "held_out_metrics": fit.metrics,
            **(provenance or {}),
        },
        pooling=pooling,
    )
    with torch.no_grad():
        head.linear.weight.copy_(fit.weight)
        head.linear.bias.copy_(fit.bias)
    return head.eval()
