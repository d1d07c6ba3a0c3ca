"""Backend selection: ``tensorrt`` -> ``cuda`` -> ``cpu`` automatically, or exactly what the caller names.

The choice and the precision are logged and kept on the backend (``name``, ``precision``), so the worker can
show them in /healthz.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from engines.backends.base import Backend
from engines.mae.model import MaskedAutoencoderViT

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "cuda", "tensorrt")
DEFAULT_PRECISION = {"cpu": "fp32", "cuda": "fp16", "tensorrt": "fp16"}

__all__ = ["Backend", "BACKENDS", "select_backend", "resolve_backend_name", "tensorrt_available"]


def tensorrt_available() -> bool:
    """TensorRT's Python package is importable (the ``tensorrt`` extra) and a CUDA device is present."""
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def resolve_backend_name(backend: str | None = None, device: str = "cpu") -> str:
    """Which backend to build.

    ``backend="auto"``: tensorrt if importable with a CUDA device, else cuda if available, else cpu (``device`` is
    not consulted). ``backend=None`` follows ``device``: ``"cpu"`` -> cpu, ``"cuda[:n]"`` -> cuda, ``"auto"`` ->
    the auto chain. Any other name is taken as asked (and fails later if it cannot run).
    """
    if backend is None:
        if device == "auto":
            backend = "auto"
        else:
            return "cuda" if device.startswith("cuda") else "cpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if not torch.cuda.is_available():
        return "cpu"
    return "tensorrt" if tensorrt_available() else "cuda"


def select_backend(
    model: MaskedAutoencoderViT,
    backend: str | None = None,
    device: str = "cpu",
    precision: str | None = None,
    source: Path | None = None,
    plan_cache_dir: Path | None = None,
) -> Backend:
    """Build the backend for ``model``; an explicit choice that cannot run raises, auto falls back and says so."""
    from engines.backends.torch_backend import TorchBackend

    name = resolve_backend_name(backend, device)
    chosen: Backend
    if name == "tensorrt":
        try:
            from engines.backends.tensorrt_backend import TensorRTBackend

            chosen = TensorRTBackend.from_model(model, precision=precision or "fp16", cache_dir=plan_cache_dir)
        except Exception as exc:
            if backend == "tensorrt":
                raise  # asked for explicitly: say why it cannot run
            log.warning("TensorRT backend unavailable (%s); falling back to torch CUDA", exc)
            name = "cuda"
    if name == "cuda":
        cuda_device = device if device.startswith("cuda") else "cuda"
        chosen = TorchBackend(model, device=cuda_device, precision=precision or DEFAULT_PRECISION["cuda"])
    elif name == "cpu":
        chosen = TorchBackend(model, device="cpu", precision=precision or DEFAULT_PRECISION["cpu"])
    log.info("engine backend: %s (%s) on %s", chosen.name, chosen.precision, chosen.device)
    return chosen
