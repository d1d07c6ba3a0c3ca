"""Backend selection: ``tensorrt`` -> ``cuda`` -> ``cpu`` automatically, or exactly what the caller names.

The choice and the precision are logged and kept on the backend (``name``, ``precision``), so the worker can
show them in /healthz.

``triton`` is not chosen here but by :func:`triton_backend`: the model still loads in-process (its weights give
the encoder hash, its heads run on the embeddings) and its graphs run on a shared Triton Inference Server.

Backends know no model family: the torch backends run a module that offers the graphs of
:class:`~engines.backends.base.TorchGraphs`, and a family that can run under TensorRT passes a factory that
exports its own ONNX graphs (``engines.mae.backend``). So this package imports nothing from a family.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch

from engines.backends import torch_backend
from engines.backends.base import Backend, BackendUnavailable, TorchGraphs
from engines.backends.triton import TritonBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "cuda", "tensorrt")
REMOTE_BACKENDS = ("triton",)
DEFAULT_PRECISION = {"cpu": "fp32", "cuda": "fp16", "tensorrt": "fp16"}

__all__ = ["Backend", "BackendUnavailable", "BACKENDS", "REMOTE_BACKENDS", "TorchGraphs", "select_backend",
           "resolve_backend_name", "tensorrt_available", "triton_backend"]


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
    graphs: TorchGraphs,
    backend: str | None = None,
    device: str = "cpu",
    precision: str | None = None,
    tensorrt: Callable[[str], Backend] | None = None,
) -> Backend:
    """Build the backend that runs ``graphs``; an explicit choice that cannot run raises, auto falls back and says so.

    ``tensorrt(precision)`` builds the TensorRT backend (the family exports its graphs); None: the family has no
    TensorRT graphs, so ``tensorrt`` is refused (explicit) or skipped (auto).
    """
    TorchBackend = torch_backend.TorchBackend  # looked up at call time, so tests can stand in for CUDA
    name = resolve_backend_name(backend, device)
    chosen: Backend
    if name == "tensorrt":
        try:
            if tensorrt is None:
                raise RuntimeError("this model family has no TensorRT graphs")
            chosen = tensorrt(precision or DEFAULT_PRECISION["tensorrt"])
        except Exception as exc:
            if backend == "tensorrt":
                raise  # asked for explicitly: say why it cannot run
            log.warning("TensorRT backend unavailable (%s); falling back to torch CUDA", exc)
            name = "cuda"
    if name == "cuda":
        cuda_device = device if device.startswith("cuda") else "cuda"
        chosen = TorchBackend(graphs, device=cuda_device, precision=precision or DEFAULT_PRECISION["cuda"])
    elif name == "cpu":
        chosen = TorchBackend(graphs, device="cpu", precision=precision or DEFAULT_PRECISION["cpu"])
    log.info("engine backend: %s (%s) on %s", chosen.name, chosen.precision, chosen.device)
    return chosen


def triton_backend(
    url: str,
    model_name: str,
    encoder_hash: str,
    *,
    protocol: str = "grpc",
    timeout_seconds: float = 60.0,
    needs_reconstruct: bool = True,
) -> TritonBackend:
    """The backend that sends batches to the Triton server at ``url`` (``host:port``), models ``<model_name>_embed``
    and ``<model_name>_reconstruct``; a served model whose encoder hash is not ``encoder_hash`` is refused.

    Nothing is contacted here: a server that is down makes the worker wait, not fail (``BackendUnavailable``).
    """
    backend = TritonBackend(url, model_name, protocol=protocol, timeout_seconds=timeout_seconds,
                            expect_hash=encoder_hash, needs_reconstruct=needs_reconstruct)
    log.info("engine backend: triton (%s) at %s, models %s", protocol, url, ", ".join(backend.models.values()))
    return backend
