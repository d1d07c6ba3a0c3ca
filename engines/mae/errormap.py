"""SKELEX's zero-shot reconstruction-error map, seeded and batched (its mapping back to the source image is
``engines.imaging.regions``).

The method (``zero_shot_heatmap.py`` in skhoha/SKELEX) for each image: K random masks at ratio 0.75; for each,
the squared error between reconstruction and input on de-normalised, clamped [0, 1] RGB, averaged over the
channels and kept only on masked pixels; summed over the passes and divided, per pixel, by the number of passes
in which that pixel was masked; the image score is the mean of the map.

Our deliberate differences (documented in docs/engine.md): masks come from a recorded seed (or from caller
``noise`` with Hugging Face semantics), all K passes run as one batch, and the reference's extra unmasked pass
is skipped. The arithmetic runs per patch (``patchify`` order), which is the same per-pixel computation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from engines.family import ErrorMapResult
from engines.imaging.preprocessor_config import IMAGENET_MEAN, IMAGENET_STD
from engines.mae.network import random_masking_ids

DEFAULT_SEED = 0  # used when neither noise nor seed is given, so a map is always reproducible


def noise_from_seed(seed: int, passes: int, num_patches: int) -> Tensor:
    """Deterministic noise [passes, L] (CPU generator, so it is the same on every machine and backend)."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(passes, num_patches, generator=generator)


def expand_noise(noise: Tensor, batch: int, passes: int | None = None) -> Tensor:
    """Accept HF-style noise [passes, L] (same masks for every image) or [B, passes, L]; return [B, passes, L]."""
    if noise.dim() == 2:
        noise = noise.unsqueeze(0).expand(batch, -1, -1)
    if noise.dim() != 3 or noise.shape[0] != batch:
        raise ValueError(f"noise must be [passes, L] or [{batch}, passes, L], got {list(noise.shape)}")
    if passes is not None and noise.shape[1] != passes:
        raise ValueError(f"noise has {noise.shape[1]} passes, {passes} were asked for")
    return noise.float()


def masks_from_noise(noise: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """[B, P, L] noise -> ``ids_keep`` [B*P, keep], ``ids_restore`` [B*P, L], ``mask`` [B*P, L] (image-major)."""
    batch, passes, length = noise.shape
    return random_masking_ids(noise.reshape(batch * passes, length), mask_ratio)


def _patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, L, p*p*C] in (row, column, channel) patch order, as HF/MAE."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * gw, patch_size * patch_size * c)


def _unpatchify_map(per_patch: Tensor, patch_size: int, grid: int) -> Tensor:
    """[B, L, p*p] single-channel values -> [B, H, W]."""
    b = per_patch.shape[0]
    x = per_patch.reshape(b, grid, grid, patch_size, patch_size).permute(0, 1, 3, 2, 4)
    return x.reshape(b, grid * patch_size, grid * patch_size)


def error_map_from_reconstruction(
    x: Tensor,
    pred: Tensor,
    mask: Tensor,
    patch_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> tuple[Tensor, Tensor]:
    """SKELEX's accumulation from K reconstructions per image.

    ``x`` [B, C, H, W] normalised input; ``pred`` [B*K, L, p*p*C] decoder output (image-major); ``mask``
    [B*K, L] with 1 = masked. Returns maps [B, H, W] and scores [B] in float32.
    """
    batch, channels = x.shape[0], x.shape[1]
    passes = pred.shape[0] // batch
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device)
    # Channel is the fastest axis in patch layout, so de-normalising broadcasts over the last dim of size C.
    target = _patchify(x.float(), patch_size).unflatten(-1, (-1, channels))  # [B, L, p*p, C]
    target = (target * std_t + mean_t).clamp(0, 1)
    rec = pred.float().unflatten(-1, (-1, channels))  # [B*K, L, p*p, C]
    rec = (rec * std_t + mean_t).clamp(0, 1)
    rec = rec.unflatten(0, (batch, passes))  # [B, K, L, p*p, C]
    per_pixel = ((rec - target.unsqueeze(1)) ** 2).mean(dim=-1)  # [B, K, L, p*p]
    mask_k = mask.float().reshape(batch, passes, -1, 1)
    err_sum = (per_pixel * mask_k).sum(dim=1)  # [B, L, p*p]
    hits = mask_k.sum(dim=1)  # [B, L, 1]
    per_patch = torch.where(hits > 0, err_sum / hits.clamp(min=1), torch.zeros_like(err_sum))
    grid = x.shape[-1] // patch_size
    maps = _unpatchify_map(per_patch, patch_size, grid)
    return maps, maps.mean(dim=(1, 2))


def compute_error_map(
    reconstruct: Callable[[Tensor, Tensor, Tensor], Tensor],
    x: Tensor,
    *,
    patch_size: int,
    num_patches: int,
    mask_ratio: float,
    noise: Tensor | None = None,
    seed: int | None = None,
    passes: int = 10,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> ErrorMapResult:
    """Draw the masks (noise or seed), run ``reconstruct(x, ids_keep, ids_restore)`` once for all passes.

    ``mean`` / ``std`` are the model's input normalisation (its ``preprocessor_config.json``), undone before
    pixels are compared."""
    batch = x.shape[0]
    if noise is not None:
        full_noise = expand_noise(noise.to(x.device), batch)
        passes, used_seed = full_noise.shape[1], None
    else:
        used_seed = DEFAULT_SEED if seed is None else int(seed)
        full_noise = expand_noise(noise_from_seed(used_seed, passes, num_patches).to(x.device), batch, passes)
    if full_noise.shape[-1] != num_patches:
        raise ValueError(f"noise has {full_noise.shape[-1]} patches, the model has {num_patches}")
    ids_keep, ids_restore, mask = masks_from_noise(full_noise, mask_ratio)
    pred = reconstruct(x, ids_keep, ids_restore)
    maps, scores = error_map_from_reconstruction(x, pred, mask, patch_size, mean, std)
    return ErrorMapResult(maps, scores, full_noise.cpu(), used_seed, passes)
