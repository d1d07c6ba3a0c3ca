"""Checkpoint loaders for OrthoDiffusion: the authors' ``model.pt`` and plain state dicts, checked key by key.

Formats (:func:`read_unet_checkpoint` names them in :attr:`UNetCheckpoint.format`):

- ``orthodiffusion-ema``: what med-ddpm's ``Trainer.save`` writes and OrthoDiffusion's scripts read
  (``checkpoint["ema"]``): the EMA copy of the whole ``GaussianDiffusion``, so UNet tensors under
  ``denoise_fn.module.`` (the UNet was wrapped in DistributedDataParallel) or ``denoise_fn.``, beside the schedule
  buffers (``betas``, ``sqrt_alphas_cumprod``, ...). The non-EMA ``"model"`` weights and ``"opt"`` state are ignored.
- ``state-dict``: a bare UNet state dict (our names = theirs without the prefix), optionally with the same schedule
  buffers; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped.

The authors load with ``strict=False``, which silently leaves any tensor it cannot match at its random
initialisation. We refuse instead: missing, unexpected and mis-shaped tensors are named (:class:`CheckpointMismatch`).
Files are read with ``torch.load(weights_only=True)``: tensors and containers only, never code.

Segmentation heads (``SegHead3D``) and fused linear heads are plain state dicts (``net.N...``), read by
:func:`read_state_dict` and checked the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from engines.orthodiffusion.network import NoiseSchedule, UNet3D, UNet3DConfig, cosine_betas

EMA_FORMAT = "orthodiffusion-ema"
STATE_DICT_FORMAT = "state-dict"
UNET_PREFIXES = ("module.denoise_fn.module.", "denoise_fn.module.", "module.denoise_fn.", "denoise_fn.", "module.")
# GaussianDiffusion's registered buffers (the schedule); only betas is needed to rebuild what q_sample uses.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_mean_coef3",
)


class CheckpointMismatch(ValueError):
    """A checkpoint whose tensors do not fit the configured network: names what is missing, extra or mis-shaped."""


@dataclass
class UNetCheckpoint:
    """A UNet loaded from disk, its schedule, and how it was read."""

    unet: UNet3D
    schedule: NoiseSchedule
    format: str
    schedule_source: str  # "checkpoint" (its betas) or "cosine" (recomputed: the file had none)
    notes: list[str] = field(default_factory=list)


def load_tensor_file(path: Path) -> dict[str, object]:
    """A ``.pt`` / ``.pth`` (``weights_only``) or ``.safetensors`` file as a dict; unreadable files named."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        return dict(load_file(str(path)))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets one clear message
        raise CheckpointMismatch(f"{path.name}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, Mapping):
        raise CheckpointMismatch(f"{path.name}: expected a dict of tensors, found {type(data).__name__}")
    return dict(data)


def _describe(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def check_and_load(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module`` only if every tensor matches by name and shape; else name the differences."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_describe(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {len(misshaped)}: {_describe(misshaped)}")
    if problems:
        raise CheckpointMismatch(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)


def split_unet_state(raw: Mapping[str, object], source: str) -> tuple[str, dict[str, Tensor], dict[str, Tensor]]:
    """(format, UNet tensors without prefix, schedule buffers) from a loaded checkpoint dict."""
    fmt = STATE_DICT_FORMAT
    state: Mapping[str, object] = raw
    if "ema" in raw and isinstance(raw["ema"], Mapping):
        fmt, state = EMA_FORMAT, raw["ema"]  # type: ignore[assignment]
    else:
        for wrapper in ("state_dict", "model"):
            if wrapper in raw and isinstance(raw[wrapper], Mapping):
                state = raw[wrapper]  # type: ignore[assignment]
                break
    unet: dict[str, Tensor] = {}
    schedule: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointMismatch(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if key in SCHEDULE_BUFFERS:
            schedule[key] = value
            continue
        name = key
        for prefix in UNET_PREFIXES:
            if key.startswith(prefix):
                name = key[len(prefix):]
                break
        if name in unet:
            raise CheckpointMismatch(f"{source}: tensor {name!r} appears twice (under two prefixes)")
        unet[name] = value
    if not unet:
        raise CheckpointMismatch(f"{source}: no UNet tensors found (keys: {_describe(sorted(state))})")
    return fmt, unet, schedule


def read_unet_checkpoint(path: str | Path, config: UNet3DConfig | None = None) -> UNetCheckpoint:
    """Build a :class:`UNet3D` for ``config`` and load ``path`` into it (authors' ``model.pt`` or a state dict)."""
    path = Path(path)
    config = config or UNet3DConfig()
    fmt, state, buffers = split_unet_state(load_tensor_file(path), path.name)
    unet = UNet3D(config)
    check_and_load(unet, state, path.name)
    notes: list[str] = []
    if "betas" in buffers:
        betas = buffers["betas"].to(torch.float64).numpy()
        if betas.shape[0] != config.timesteps:
            raise CheckpointMismatch(
                f"{path.name}: schedule has {betas.shape[0]} steps, config says {config.timesteps}"
            )
        schedule = NoiseSchedule(betas=betas)
        for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):  # what q_sample reads, as stored
            if name in buffers:
                if tuple(buffers[name].shape) != tuple(getattr(schedule, name).shape):
                    raise CheckpointMismatch(f"{path.name}: {name} has shape {tuple(buffers[name].shape)}")
                getattr(schedule, name).copy_(buffers[name].to(torch.float32))
        source = "checkpoint"
        if not np.allclose(betas, cosine_betas(config.timesteps).astype(np.float32), atol=1e-6):
            notes.append("the checkpoint's betas are not the cosine schedule; its own betas are used")
    else:
        schedule = NoiseSchedule(timesteps=config.timesteps)
        source = "cosine"
    return UNetCheckpoint(unet.eval(), schedule, fmt, source, notes)


def read_state_dict(path: str | Path, module: nn.Module) -> nn.Module:
    """Load a plain state dict (``.pt`` / ``.pth`` / ``.safetensors``; ``state_dict`` / ``model`` wrappers and a
    ``module.`` prefix accepted) into ``module`` strictly."""
    path = Path(path)
    raw = load_tensor_file(path)
    for wrapper in ("state_dict", "model"):
        if wrapper in raw and isinstance(raw[wrapper], Mapping):
            raw = dict(raw[wrapper])  # type: ignore[arg-type]
            break
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in raw.items()}
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointMismatch(f"{path.name}: entries that are not tensors: {_describe(sorted(bad))}")
    check_and_load(module, state, path.name)  # type: ignore[arg-type]
    return module.eval()
