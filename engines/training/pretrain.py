"""MAE pre-training on a pool of grey images (how the demo model ``models/demo-mae`` is trained).

:func:`pretrain_mae` - seeded MAE pre-training of :class:`~engines.mae.network.MaskedAutoencoderViT` (HF semantics:
75 % masking, MSE on masked patches in normalised pixel space); :data:`DEMO_CONFIG` - the demo model's sizes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from engines.mae.network import MAEConfig, MaskedAutoencoderViT
from engines.training.inputs import normalise_uint8

log = logging.getLogger(__name__)


# The demo model: a narrow ViT (192 wide, 6 layers, 6 heads) with a 192 x 2 decoder; ~4.0 M parameters, ~16 MB
# in fp32. Sized for what 2 CPU cores can train in about an hour (9,000 steps of 32). The first demo model
# (128 wide, decoder 96 x 2, 3,600 steps) reconstructed sharp edges (the distal radius at a hand's field edge, the
# knee's joint line) so poorly that their error outshone small lesions; the wider decoder is what sharpens them.
DEMO_CONFIG = MAEConfig(
    hidden_size=192,
    num_hidden_layers=6,
    num_attention_heads=6,
    intermediate_size=768,
    decoder_hidden_size=192,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=6,
    decoder_intermediate_size=768,
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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
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
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95))
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
