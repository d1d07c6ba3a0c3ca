"""Joint fine-tuning: an MAE encoder learns its heads while it keeps reconstructing normal anatomy.

Linear probes on a frozen small MAE read findings poorly (the demo MAE's CLS and mean patch tokens gave fracture
AUROC 0.54-0.57: reconstruction features average a 2-px fracture gap away). SKELEX's own classifier is the MAE
encoder fine-tuned with labels. The demo model cannot ship a second encoder for its heads (the heads and the error
map share one embedding pass), so :func:`train_jointly` fine-tunes the one encoder on two losses at each step:

- the MAE loss (at ``model.config.mask_ratio``; the demo sets 0.5; MSE on masked patches) on a batch of **normal**
  images, so the error map keeps predicting normal anatomy where a lesion is;
- the heads' losses on a batch of **labelled** images: a linear layer per head on the normed CLS token (what
  :meth:`MaskedAutoencoderViT.embed` returns), cross-entropy with balanced class weights (one sigmoid label: BCE
  with a positive weight); a target of -1 leaves an image out of that head (e.g. joint-space grade off the knee).

The heads come back as plain linear layers on ``embed``: format 3e (:class:`engines.heads.LinearHead`), so every
backend serves them as it serves a probe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from engines.mae.network import MaskedAutoencoderViT
from engines.training.inputs import normalise_uint8
from engines.training.pretrain import param_groups


@dataclass
class HeadTask:
    """One head to learn: its labels (one label = a sigmoid output) and a class index per labelled image."""

    name: str
    labels: Sequence[str]
    targets: np.ndarray  # [M] ints; -1 = this head does not apply to the image

    @property
    def outputs(self) -> int:
        return len(self.labels)


@dataclass
class JointSettings:
    """Everything that decides a joint run (recorded in the training report)."""

    steps: int = 1200
    batch_size: int = 32  # labelled images per step
    mae_batch_size: int = 16  # normal images per step for the reconstruction loss
    lr: float = 1e-3  # encoder and decoder (3e-4 learnt the heads too slowly: loss 3.7 -> 3.0 in 500 steps)
    head_lr: float = 1e-2
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05
    mae_weight: float = 4.0  # the error map must survive the heads' larger gradients
    seed: int = 0
    threads: int = 2
    hflip: bool = True
    device: str = "cpu"


@dataclass
class JointResult:
    heads: dict[str, nn.Linear]
    seconds: float
    losses: list[float] = field(default_factory=list)  # total per step
    mae_losses: list[float] = field(default_factory=list)


def _lr_scale(step: int, s: JointSettings) -> float:
    """Warm-up then cosine, as a factor of the peak rate (the floor ``min_lr / lr``)."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps))
    floor = s.min_lr / s.lr
    return floor + 0.5 * (1 - floor) * (1.0 + math.cos(math.pi * progress))


def _class_weights(targets: np.ndarray, classes: int) -> Tensor:
    counts = np.bincount(targets[targets >= 0], minlength=classes).astype(np.float64)
    counts = np.maximum(counts, 1.0)
    return torch.tensor(counts.sum() / (classes * counts), dtype=torch.float32)


def _flip(batch: Tensor, generator: torch.Generator) -> Tensor:
    flip = torch.rand(batch.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1), batch.flip(-1), batch)


def head_loss(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Balanced cross-entropy (one output: BCE with positive weight); rows with target -1 are left out."""
    keep = targets >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    logits, targets = logits[keep], targets[keep]
    if logits.shape[1] == 1:
        return nn.functional.binary_cross_entropy_with_logits(
            logits[:, 0], targets.float(), pos_weight=weights[1] / weights[0]
        )
    return nn.functional.cross_entropy(logits, targets, weight=weights)


def train_jointly(
    model: MaskedAutoencoderViT,
    normals: Tensor,
    labelled: Tensor,
    tasks: Sequence[HeadTask],
    settings: JointSettings,
    progress: Callable[[int, float], None] | None = None,
) -> JointResult:
    """Fine-tune ``model`` (in place) on the MAE loss over ``normals`` and the heads' losses over ``labelled``.

    ``normals`` and ``labelled`` are uint8 grey [N, 224, 224] as the model sees them; batches, flips and masks come
    from a seeded CPU generator. Returns the heads (linear layers on ``model.embed``) and the loss curves.
    """
    for name, images in (("normals", normals), ("labelled", labelled)):
        if images.dtype != torch.uint8 or images.ndim != 3:
            raise ValueError(f"{name} must be uint8 [N, H, W]")
    for task in tasks:
        if task.targets.shape != (labelled.shape[0],):
            raise ValueError(f"head {task.name!r}: {task.targets.shape[0]} targets for {labelled.shape[0]} images")
    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    width = model.config.hidden_size
    heads = {t.name: nn.Linear(width, t.outputs) for t in tasks}
    for head in heads.values():
        nn.init.zeros_(head.bias)
        nn.init.normal_(head.weight, std=0.01)
    weights = {t.name: _class_weights(t.targets, max(2, t.outputs)).to(device) for t in tasks}
    targets = {t.name: torch.as_tensor(t.targets, dtype=torch.long) for t in tasks}
    model.to(device)
    for head in heads.values():
        head.to(device)
    groups = param_groups(model, settings.weight_decay)
    for group in groups:
        group["peak"] = settings.lr
    head_params = [p for h in heads.values() for p in h.parameters()]
    groups.append({"params": head_params, "weight_decay": 1e-4, "peak": settings.head_lr})
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999))
    model.train()
    result = JointResult(heads={}, seconds=0.0)
    start = time.perf_counter()
    for step in range(settings.steps):
        scale = _lr_scale(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = group["peak"] * scale
        index = torch.randint(labelled.shape[0], (settings.batch_size,), generator=generator)
        batch = labelled[index]
        if settings.hflip:
            batch = _flip(batch, generator)
        embedding = model.embed(normalise_uint8(batch.to(device)))
        loss = torch.zeros((), device=device)
        for task in tasks:
            logits = heads[task.name](embedding)
            loss = loss + head_loss(logits, targets[task.name][index].to(device), weights[task.name])
        normal_index = torch.randint(normals.shape[0], (settings.mae_batch_size,), generator=generator)
        normal_batch = normals[normal_index]
        if settings.hflip:
            normal_batch = _flip(normal_batch, generator)
        noise = torch.rand(settings.mae_batch_size, model.config.num_patches, generator=generator).to(device)
        mae_loss, _, _ = model(normalise_uint8(normal_batch.to(device)), noise=noise)
        total = loss + settings.mae_weight * mae_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        result.losses.append(float(total.detach()))
        result.mae_losses.append(float(mae_loss.detach()))
        if progress is not None:
            progress(step, result.losses[-1])
    model.eval()
    model.to("cpu")
    result.heads = {name: head.to("cpu").eval() for name, head in heads.items()}
    result.seconds = time.perf_counter() - start
    return result
