"""How the DINOv3 family hands its network to a backend: torch runs the module, TensorRT runs its exported graph.

The generic choice (auto chain, fallbacks, default precisions) is :func:`engines.backends.select_backend`; this
module supplies what is DINOv3-specific: the ONNX export (cached by the weights' hash and input size) and its shapes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from engines.backends import Backend, select_backend
from engines.backends.tensorrt_backend import DEFAULT_CACHE_DIR, BatchProfile, TensorRTBackend, import_tensorrt
from engines.dinov3.network import DINOv3ViT, encoder_sha256
from engines.dinov3.onnx_export import GRAPH_NAMES, export_onnx, graph_shapes


def tensorrt_backend(
    network: DINOv3ViT,
    height: int,
    width: int,
    precision: str = "fp16",
    cache_dir: Path | None = None,
    profile: BatchProfile | None = None,
    trt: ModuleType | None = None,
    progress: Callable[[str], None] | None = None,
) -> TensorRTBackend:
    """Export ONNX (cached by encoder hash, RoPE mode included, and input size), then load or build the plan."""
    trt = trt or import_tensorrt()
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs a CUDA device")
    directory = Path(cache_dir or DEFAULT_CACHE_DIR)
    profile = profile or BatchProfile()
    key = hashlib.sha256(json.dumps(["dinov3", encoder_sha256(network), height, width]).encode()).hexdigest()
    onnx_dir = directory / "onnx" / key[:24]
    if not all((onnx_dir / f"{g}.onnx").is_file() for g in GRAPH_NAMES):
        if progress:
            progress("exporting ONNX")
        export_onnx(network.cpu(), onnx_dir, height=height, width=width)
    inputs = {g: (onnx_dir / f"{g}.onnx", graph_shapes(profile, height, width, g)) for g in GRAPH_NAMES}
    return TensorRTBackend.from_onnx(
        inputs, precision=precision, cache_dir=directory, profile=profile, trt=trt, progress=progress
    )


def build_backend(
    network: DINOv3ViT,
    height: int,
    width: int,
    backend: str | None = None,
    device: str = "cpu",
    precision: str | None = None,
    plan_cache_dir: Path | None = None,
) -> Backend:
    """The backend for ``network``: see :func:`engines.backends.select_backend` for the choice and fallbacks."""
    return select_backend(
        network,
        backend=backend,
        device=device,
        precision=precision,
        tensorrt=lambda chosen: tensorrt_backend(network, height, width, precision=chosen, cache_dir=plan_cache_dir),
    )
