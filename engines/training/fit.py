"""Training on frozen or fresh encoders: MAE pre-training, linear-probe heads, score calibration.

Why here: the demo model (``models/demo-mae``) is trained in the repo on synthetic phantoms, and a site fits
its own heads and calibrates its own scores on its own studies. All three share the SKELEX input path
(``prepare_array``) so that what is trained is what the node later runs.

- :func:`pretrain_mae` - seeded MAE pre-training of :class:`~engines.mae.model.MaskedAutoencoderViT` on a pool of
  grey images (HF semantics: 75 % masking, MSE on masked patches in normalised pixel space).
- :func:`fit_linear_probe` - logistic (sigmoid, one label) or softmax regression on frozen CLS embeddings,
  with the feature standardisation folded back into the weights so the head runs on raw embeddings (format 3e).
- :class:`Calibration` / :func:`percentile` - the distribution of abnormality scores over a site's normal studies,
  stored as ``calibration.json`` beside the model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from engines.imaging.preprocess import prepare_array  # noqa: F401  (re-exported: the one SKELEX array path)
from engines.mae.model import MAEConfig, MaskedAutoencoderViT

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_SIZE = 224
CALIBRATION_FILE = "calibration.json"


# ---------------------------------------------------------------------------------------------------------
# The SKELEX input path on arrays
# ---------------------------------------------------------------------------------------------------------


def to_uint8_224(pixels: np.ndarray, size: int = MODEL_SIZE) -> np.ndarray:
    """SKELEX's first steps on a 2-D grey array, exactly as ``engines.imaging.preprocess`` does them: per-image
    min-max to uint8 (truncating), then PIL bilinear resize to 224 x 224 without crop."""
    from PIL import Image

    from engines.imaging.preprocess import to_uint8_minmax

    array = np.asarray(pixels)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {array.shape}")
    image = Image.fromarray(to_uint8_minmax(array))
    return np.array(image.resize((size, size), resample=Image.Resampling.BILINEAR))


def normalise_uint8(batch: Tensor) -> Tensor:
    """uint8 grey [B, H, W] -> ImageNet-normalised RGB float [B, 3, H, W] (grey copied to 3 channels)."""
    x = batch.float().mul_(np.float32(1 / 255)).unsqueeze(1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def denormalise(x: Tensor) -> Tensor:
    """Model input -> [0, 1] RGB (clamped), as the SKELEX error map compares pixels."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# MAE pre-training
# ---------------------------------------------------------------------------------------------------------


# The demo model: a narrow ViT (128 wide, 6 layers, 4 heads) with a 96 x 2 decoder; ~1.5 M parameters, ~6 MB
# in fp32. Sized for what 2 CPU cores shared by four engineers can train in about a quarter of an hour: the
# decoder runs on all 197 tokens, so it is kept the narrowest.
DEMO_CONFIG = MAEConfig(
    hidden_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    intermediate_size=512,
    decoder_hidden_size=96,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=3,
    decoder_intermediate_size=384,
    layer_norm_eps=1e-6,
    mask_ratio=0.75,
    norm_pix_loss=False,
)


@dataclass
class PretrainSettings:
    """Everything that decides a pre-training run (recorded in the model card / provenance)."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1.5e-3
    min_lr: float = 5e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05
    seed: int = 0
    threads: int = 2
    hflip: bool = True
    log_every: int = 50
    device: str = "cpu"  # "cuda" on a lent GPU; batches and masks are still drawn on the CPU (same seeds)


@dataclass
class PretrainResult:
    steps: int
    seconds: float
    final_loss: float  # mean loss over the last 5 % of steps
    losses: list[float] = field(default_factory=list)


def _lr_at(step: int, s: PretrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """MAE's rule: no weight decay on biases, norms and tokens."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(("cls_token", "mask_token")) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain_mae(
    model: MaskedAutoencoderViT,
    images: Tensor,
    settings: PretrainSettings,
    progress: Callable[[int, float], None] | None = None,
) -> PretrainResult:
    """Train ``model`` as an MAE on ``images`` (uint8 grey [N, 224, 224]); seeded batches, masks and flips.

    The loss is MSE on the masked patches in ImageNet-normalised pixel space (``norm_pix_loss`` off, as SKELEX:
    per-patch normalisation would blow up the flat black background). Batches, flips and mask noise come from a
    CPU generator whatever ``settings.device`` is, so a GPU run sees the same data and masks as a CPU run; the
    model is trained on ``settings.device`` and returned on the CPU.
    """
    if images.dtype != torch.uint8 or images.ndim != 3:
        raise ValueError("images must be uint8 [N, H, W]")
    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    model.to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95))
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    order = torch.randperm(images.shape[0], generator=generator)
    cursor = 0
    for step in range(settings.steps):
        if cursor + settings.batch_size > order.numel():
            order, cursor = torch.randperm(images.shape[0], generator=generator), 0
        index = order[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        batch = images[index]
        if settings.hflip:
            flip = torch.rand(batch.shape[0], generator=generator) < 0.5
            batch = torch.where(flip.view(-1, 1, 1), batch.flip(-1), batch)
        x = normalise_uint8(batch.to(device))
        noise = torch.rand(x.shape[0], model.config.num_patches, generator=generator).to(device)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings)
        loss, _, _ = model(x, noise=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
        elif settings.log_every and step % settings.log_every == 0:
            log.info("step %d/%d loss %.4f", step, settings.steps, losses[-1])
    model.eval()
    model.to("cpu")
    tail = losses[-max(1, len(losses) // 20) :]
    return PretrainResult(settings.steps, time.perf_counter() - start, float(np.mean(tail)), losses)


# ---------------------------------------------------------------------------------------------------------
# Embeddings and linear probes
# ---------------------------------------------------------------------------------------------------------


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


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN when one class is missing."""
    from scipy.stats import rankdata

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


def probe_to_head(fit: ProbeFit, name: str, encoder_sha256: str, provenance: dict[str, Any] | None = None):
    """A :class:`~engines.heads.LinearHead` (format 3e) from a fitted probe."""
    from engines.heads import LinearHead

    head = LinearHead(
        name,
        fit.weight.shape[1],
        fit.labels,
        fit.activation,
        encoder_sha256=encoder_sha256,
        provenance={
            "trainer": "engines.training.fit.fit_linear_probe",
            "train_size": fit.train_size,
            "test_size": fit.test_size,
            "held_out_metrics": fit.metrics,
            **(provenance or {}),
        },
    )
    with torch.no_grad():
        head.linear.weight.copy_(fit.weight)
        head.linear.bias.copy_(fit.bias)
    return head.eval()


# ---------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# DICOM files -> model input (for heads train / calibrate / infer)
# ---------------------------------------------------------------------------------------------------------


def dicom_inputs(path: Path | str) -> tuple[Tensor, Any, list[np.ndarray]]:
    """(tensor [F, 3, 224, 224], geometry, display images) for one DICOM file, via ``engines.imaging.preprocess``."""
    import pydicom

    from engines.imaging.preprocess import preprocess

    result = preprocess(pydicom.dcmread(str(path)))
    return result.tensor, result.geometry, list(result.display)
